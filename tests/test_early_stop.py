"""A validation round ends as soon as its miss is certain, and only then; the timing cache."""
import json

import numpy as np
import pytest

from caffe_compress import timing
from caffe_compress.plan import contract


def spec(kind, name="y"):
    return contract.OutputSpec(name, kind)


def softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("kind", ["class", "embedding", "image", "dense"])
def test_a_certain_miss_is_one_the_full_check_also_misses(kind):
    """On many random prefixes: certain_misses never fires for a model the full check passes, and every
    miss it reports is a miss of the full check (it is a bound, not an estimate)."""
    rng = np.random.default_rng(0)
    n = 64
    fired = 0
    for trial in range(60):
        if kind == "class":
            a = softmax(rng.normal(0, 4, (n, 5)))
            b = softmax(np.log(a) + rng.normal(0, 1.5 * (trial % 4), (n, 5)))
        elif kind == "embedding":
            a = rng.normal(size=(n, 128))
            b = a + rng.normal(0, 0.05 * (trial % 5), (n, 128))
        else:
            a = rng.normal(size=(n, 1, 8, 8))
            b = a + rng.normal(0, 0.04 * (trial % 6), a.shape)
        full = contract.check_all([spec(kind)], {"y": a}, {"y": b}, 0.95)
        for count in (8, 24, 56):
            lost = contract.certain_misses([spec(kind)], {"y": a}, {"y": b[:count]}, count, 0.95, total=n)
            if lost:
                fired += 1
                assert not all(c.passed for c in full), (trial, count, lost)
    assert fired > 0  # the bound does fire on the models that miss


@pytest.mark.parametrize("kind", ["image", "dense"])
def test_a_projected_miss_is_a_miss_when_the_rest_change_no_less_than_the_least_changed(kind):
    """The projection's premise, tested as such: when every later input changes each entry at least as much
    as the least-changed input seen (per entry), a projected miss is a miss of the full check. It fires
    earlier than the certain bound, and never before LIKELY_MIN_INPUTS inputs."""
    rng = np.random.default_rng(5)
    n, seen = 64, 8
    projected_first = fired = 0
    for trial in range(60):
        a = rng.normal(size=(n, 1, 8, 8))
        scale = 0.02 * (1 + trial % 6) * rng.uniform(0.5, 1.5, n)  # per-input change, varying
        noise = rng.normal(size=a.shape)
        noise /= np.sqrt(np.mean(noise ** 2, axis=(1, 2, 3), keepdims=True))  # unit RMS per input
        floor = scale[:seen].min()
        scale[seen:] = np.maximum(scale[seen:], floor)  # the premise: no later input changes less
        b = a + scale[:, None, None, None] * noise
        full = contract.check_all([spec(kind)], {"y": a}, {"y": b}, 0.95)
        likely = contract.certain_misses([spec(kind)], {"y": a}, {"y": b[:seen]}, seen, 0.95, total=n, likely=True)
        certain = contract.certain_misses([spec(kind)], {"y": a}, {"y": b[:seen]}, seen, 0.95, total=n)
        assert not certain or likely  # (at least as early as the bound)
        if likely:
            fired += 1
            projected_first += not certain
            assert not full[0].passed, (trial, likely, full)
            assert ("projected" in likely[0].metric) == (not certain)  # (a certain miss is reported as one)
        early = contract.certain_misses([spec(kind)], {"y": a}, {"y": b[:seen - 1]}, seen - 1, 0.95, total=n,
                                        likely=True)
        assert all("projected" not in c.metric for c in early)
    assert fired > 0 and projected_first > 0


def test_a_projection_is_an_estimate_the_certain_bound_is_not():
    """Later inputs left unchanged can still make the full check pass after a projected miss (the rounds it
    ends reject a plan, never publish one); the certain bound never says miss there."""
    rng = np.random.default_rng(6)
    a = rng.normal(size=(32, 1, 8, 8))
    b = a.copy()
    b[:8] += 0.08 * rng.normal(size=(8, 1, 8, 8))  # relative error ~0.08 on a quarter: the whole set's ~0.04
    t = contract.targets(0.95)["relative"]
    assert contract.check_all([spec("dense")], {"y": a}, {"y": b}, 0.95)[0].value < t < 0.07
    assert contract.certain_misses([spec("dense")], {"y": a}, {"y": b[:8]}, 8, 0.95, total=32) == []
    assert contract.certain_misses([spec("dense")], {"y": a}, {"y": b[:8]}, 8, 0.95, total=32, likely=True)


def test_outputs_not_per_input_are_never_decided_early():
    a = np.ones((2, 2, 12), np.float32)  # SSD priors: one row per chunk, not per input
    lost = contract.certain_misses([spec("dense")], {"y": a}, {"y": np.zeros((16, 2, 12))}, 16, 0.95, total=16)
    assert lost == []


def test_decisive_order_puts_the_least_sure_counted_inputs_first():
    p = np.array([[0.95, 0.05], [0.6, 0.4], [0.99, 0.01], [0.91, 0.09]] * 4)
    order = contract.decisive_order([spec("class")], {"y": p})
    tops = p.max(axis=1)[order]
    counted = tops >= contract.CONFIDENT
    assert counted[:12].all() and not counted[12:].any()  # counted first, the rest last
    assert np.all(np.diff(tops[:12]) >= 0)  # least sure first


def test_timing_cache_survives_bad_files_and_retime(tmp_path):
    path = tmp_path / "t.json"
    path.write_text("{not json")
    cache = timing.DiskCache(path)
    assert cache.get("k") is None  # a corrupt file is ignored
    cache.put("k", 1.5)
    cache.save()
    assert json.loads(path.read_text()) == {"k": 1.5}
    assert timing.DiskCache(path).get("k") == 1.5
    fresh = timing.DiskCache(path, reuse=False)  # --retime: measured again, and stored
    assert fresh.get("k") is None
    fresh.put("k", 2.0)
    fresh.save()
    assert timing.DiskCache(path).get("k") == 2.0
    (tmp_path / "ro").mkdir(mode=0o500)
    unwritable = timing.DiskCache(tmp_path / "ro" / "sub" / "t.json")
    unwritable.put("k", 1.0)
    unwritable.save()  # ignored, no exception


def test_identical_outputs_pass_every_kind_and_are_never_a_certain_miss():
    """An unchanged copy (--force) of an image-to-image net has PSNR = inf: a pass, not a miss."""
    rng = np.random.default_rng(1)
    for kind, shape in (("image", (8, 1, 6, 6)), ("class", (8, 4)), ("embedding", (8, 64)), ("dense", (8, 5))):
        a = rng.uniform(0.01, 1, shape)
        assert all(c.passed for c in contract.check_all([spec(kind)], {"y": a}, {"y": a.copy()}, 0.95)), kind
        assert contract.certain_misses([spec(kind)], {"y": a}, {"y": a[:4].copy()}, 4, 0.95, total=8) == []


def test_the_kept_network_is_loaded_once_until_forgotten(tmp_path, monkeypatch):
    """The original, run on the response, validation and planning probes, is parsed by OpenCV once."""
    from caffe_compress import runner, validate
    from caffe_compress.net import Layer, Net

    w = np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32)
    net = Net("k", (Layer("data", "Input", (), ("data",), {"input_param": {"shape": [{"dim": [1, 3, 8, 8]}]}}),
                    Layer("conv", "Convolution", ("data",), ("conv",),
                          {"convolution_param": {"num_output": 4, "kernel_size": [3], "bias_term": False}}, (w,))))
    loads = []
    real = validate.load_opencv_net
    monkeypatch.setattr(validate, "load_opencv_net", lambda *a, **k: loads.append(1) or real(*a, **k))
    cv = runner.OpenCVRunner(tmp_path)
    feed = {"data": np.random.default_rng(1).standard_normal((3, 3, 8, 8)).astype(np.float32)}
    src = [runner.Source("conv")]
    cv.keep(net)
    first = cv.run(net, feed, src)[src[0]]
    for _ in range(3):
        assert np.array_equal(cv.run(net, feed, src)[src[0]], first)
    assert len(loads) == 1
    other = Net("k", net.layers)  # equal, but not the kept object: loaded on its own
    cv.run(other, feed, src)
    assert len(loads) == 2
    cv.forget()
    assert np.array_equal(cv.run(net, feed, src)[src[0]], first) and len(loads) == 3


@pytest.mark.parametrize("objects", [True, False])
def test_detection_scores_and_boxes_bounds_never_fire_on_a_pass(objects):
    """SSD-like scores (2 classes, background 0) and their boxes: an early miss is always a miss of the
    full check, with objects (the positives' Jaccard) and without (RMS logit at the strongest)."""
    rng = np.random.default_rng(3)
    n, priors = 32, 300
    scores = contract.OutputSpec("conf", "scores", classes=2, background=0)
    boxes = contract.OutputSpec("loc", "boxes", pair="conf")
    fired = 0
    for trial in range(40):
        z = rng.normal(-6.0, 2.0, (n, priors))
        if objects:
            z[:, :6] = rng.normal(4.0, 1.0, (n, 6))  # a few sure positives per input
        noise = 0.7 * (trial % 5)
        zb = z + rng.normal(0, noise, z.shape)
        conf = np.stack([1 / (1 + np.exp(z)), 1 / (1 + np.exp(-z))], axis=2).reshape(n, -1)
        conf_b = np.stack([1 / (1 + np.exp(zb)), 1 / (1 + np.exp(-zb))], axis=2).reshape(n, -1)
        loc = rng.normal(size=(n, priors * 4))
        loc_b = loc + rng.normal(0, 0.02 * (trial % 4), loc.shape)
        original, compressed = {"conf": conf, "loc": loc}, {"conf": conf_b, "loc": loc_b}
        full = contract.check_all([scores, boxes], original, compressed, 0.95)
        for count in (4, 12, 28):
            lost = contract.certain_misses([scores, boxes], original, {k: v[:count] for k, v in compressed.items()},
                                           count, 0.95, total=n)
            for check in lost:
                fired += 1
                assert not next(c for c in full if c.output == check.output).passed, (trial, count, check)
    assert fired > 0


def test_a_screened_then_completed_verdict_is_the_full_verdict(tmp_path, monkeypatch):
    """Rounds are judged on a third of the validation inputs first and the chosen plan on the rest: the
    published plan, its checks and its agreement figures are those of judging every round in full."""
    from caffe_compress import compress, pipeline
    from test_contract import embedder

    deploy, model = embedder(tmp_path)
    completed = []
    real = pipeline._Run.complete
    monkeypatch.setattr(pipeline._Run, "complete", lambda self, *a: completed.append(a[3].screened) or real(self, *a))
    # (--objective size: measured timings, which vary between the two runs, play no part)
    screened = compress(deploy, model, tradeoff=0.95, output=tmp_path / "s", seed=0, progress=None, objective="size")
    monkeypatch.setattr(pipeline, "SCREEN_SHARE", 1)  # every round judged on every input
    full = compress(deploy, model, tradeoff=0.95, output=tmp_path / "f", seed=0, progress=None, objective="size")
    assert completed and all(0 < n < 128 for n in completed)
    assert screened.output_caffemodel and full.output_caffemodel
    assert [(lp.layer, lp.method, lp.rank) for lp in screened.layers] == \
        [(lp.layer, lp.method, lp.rank) for lp in full.layers]
    assert screened.contract == full.contract and screened.validation == full.validation
    assert (tmp_path / "s.caffemodel").read_bytes() == (tmp_path / "f.caffemodel").read_bytes()


class _Staged:
    def __init__(self, name):
        self.name, self.discarded = name, False

    def discard(self):
        self.discarded = True


def _confirm(chain, passes_in_full):
    """confirm() after a search whose screened passes were ``chain`` (oldest first); ``passes_in_full(name)``
    is a plan's verdict on the remaining inputs. Returns (the plans completed in order, the loop)."""
    from types import SimpleNamespace

    from caffe_compress import pipeline
    from caffe_compress.plan import contract

    completed, searched = [], []

    def complete(net, new_net, staged, verdict, *rest):
        completed.append(staged.name)
        ok = passes_in_full(staged.name)
        check = contract.Check("y", "dense", "relative error", 0.01 if ok else 1.0, 0.05, False)
        return pipeline._Verdict((check,), ())

    class Loop(pipeline._ClosedLoop):
        def search(self, ladder):
            searched.append(self.screening)

        def net_of(self, plan):
            return None

    run = SimpleNamespace(ranks={}, say=lambda *a: None, complete=complete)
    loop = Loop(run, None, None, [], {}, [], {}, None)
    for i, name in enumerate(chain):
        plan = SimpleNamespace(layers=[SimpleNamespace(layer="fc", method="svd", rank=len(chain) - i)])
        screened = pipeline._Verdict((), (), screened=48)
        loop.state.keep(_Staged(name), plan, screened, (("fc", ("svd", len(chain) - i)),), float(i))
        loop.state.tried[(("fc", ("svd", len(chain) - i)),)] = True
    stageds = [loop.state.best[0]] + [b[0][0] for b in loop.state.fallbacks]
    loop.confirm([1.0])
    return completed, searched, loop, {s.name: s.discarded for s in stageds}


def test_the_chosen_plan_is_judged_on_the_rest_and_the_earlier_passes_are_discarded():
    completed, searched, loop, discarded = _confirm(["a", "b", "c"], lambda name: True)
    assert completed == ["c"] and searched == []
    assert loop.state.best[0].name == "c" and loop.state.best[2].screened == 0  # the full verdict
    assert discarded == {"a": True, "b": True, "c": False} and not loop.state.fallbacks
    assert loop.screening is False  # every later round (speed drops, --force) is judged in full


def test_a_plan_that_misses_on_the_rest_falls_back_to_the_one_before():
    """The chosen plan passed its screened share but misses on the other inputs: the plan that passed before
    it is judged on the rest in turn, and kept when it passes there."""
    completed, searched, loop, discarded = _confirm(["a", "b", "c"], lambda name: name != "c")
    assert completed == ["c", "b"] and searched == []
    assert loop.state.best[0].name == "b" and loop.state.best_budget == 1.0
    assert discarded == {"a": True, "b": False, "c": True}
    assert loop.state.tried[(("fc", ("svd", 1)),)] is False  # c: not to be tried again as a pass
    assert loop.state.misses  # said, as any miss


def test_when_every_screened_pass_misses_on_the_rest_the_search_runs_again_in_full():
    completed, searched, loop, discarded = _confirm(["a", "b"], lambda name: False)
    assert completed == ["b", "a"] and all(discarded.values()) and loop.state.best is None
    assert searched == [False]  # once more, every round judged on every input
    assert True not in loop.state.tried.values()


def test_a_round_that_misses_on_its_screened_share_is_judged_on_every_input(tmp_path, monkeypatch):
    """Missing on a third of the inputs is an estimate (a certain miss ends a round on its own): such a
    round is judged on the rest at once, so the search decides on the full verdict, as without screening."""
    from caffe_compress import compress, pipeline
    from caffe_compress.plan import contract as contract_module
    from test_contract import embedder

    deploy, model = embedder(tmp_path)
    real_check_all = contract_module.check_all
    judged = []

    def check_all(specs, original, compressed, *a, **k):
        rows = next(iter(compressed.values())).shape[0]
        judged.append(rows)
        checks = real_check_all(specs, original, compressed, *a, **k)
        if rows < 128:  # every screened share misses
            checks = [pipeline.replace(c, value=-1.0 if c.higher_is_better else float("inf")) for c in checks]
        return checks

    monkeypatch.setattr(pipeline.contract, "check_all", check_all)
    report = compress(deploy, model, tradeoff=0.95, output=tmp_path / "o", seed=0, progress=None)
    assert any(n < 128 for n in judged) and judged[-1] == 128
    assert report.output_caffemodel and all(c.passed for c in report.contract)  # the full verdicts decided


def test_layer_inputs_recorded_while_probing_give_the_plan_a_late_recording_gives(tmp_path, monkeypatch):
    """The probes that test the input convention are the planning probes: their layer inputs are recorded
    then, and planning reuses them (no second recording) -- the same plan, checks and model as recording
    them later (the path a model with large activations takes)."""
    from caffe_compress import compress, pipeline
    from caffe_compress.plan import search
    from test_contract import embedder

    deploy, model = embedder(tmp_path)
    feeds = []
    real = search.collect_inputs
    monkeypatch.setattr(search, "collect_inputs", lambda run, net, feed, *a, **k: feeds.append(feed) or
                        real(run, net, feed, *a, **k))
    early = compress(deploy, model, tradeoff=0.95, output=tmp_path / "e", seed=0, progress=None, objective="size")
    assert len(feeds) == 1 and not hasattr(feeds[0]["data"], "convention")  # recorded once, while probing
    feeds.clear()
    monkeypatch.setattr(pipeline, "KEEP_ORIGINAL_BYTES", 0)  # too large to record early
    late = compress(deploy, model, tradeoff=0.95, output=tmp_path / "l", seed=0, progress=None, objective="size")
    assert len(feeds) == 2 and hasattr(feeds[1]["data"], "convention")  # tried while probing, then recorded
    assert early.output_caffemodel and late.output_caffemodel
    assert [(lp.layer, lp.method, lp.rank, lp.output_error) for lp in early.layers] == \
        [(lp.layer, lp.method, lp.rank, lp.output_error) for lp in late.layers]
    assert early.contract == late.contract
    assert (tmp_path / "e.caffemodel").read_bytes() == (tmp_path / "l.caffemodel").read_bytes()
    # planned on --calibration images (validation probes still drawn): nothing is recorded while probing
    from test_tradeoff import _images

    feeds.clear()
    monkeypatch.setattr(pipeline, "KEEP_ORIGINAL_BYTES", 32 << 20)
    compress(deploy, model, tradeoff=0.95, output=tmp_path / "c", seed=0, progress=None, objective="size",
             calibration=_images(tmp_path / "calibration"))
    assert len(feeds) == 1 and not hasattr(feeds[0]["data"], "convention")  # the calibration images, once


@pytest.mark.slow
def test_inputs_an_earlier_plan_changed_are_judged_first_and_change_no_verdict(gendernet, monkeypatch):
    """A class output misses only by changed answers: the inputs an earlier round changed run first (a plan
    near it changes the same ones, so its miss shows after one chunk). Same plan, checks and figures as the
    plain decisive order, on fewer validation forwards (GenderNet data-free, T = 0.95)."""
    from caffe_compress import compress, pipeline
    from caffe_compress.runner import OpenCVRunner

    judged = []
    real = OpenCVRunner.run

    def run(self, net, inputs, sources, **kw):
        out = real(self, net, inputs, sources, **kw)
        if kw.get("files"):  # (a staged plan's validation)
            judged[-1] += next(iter(out.values())).shape[0]
        return out

    monkeypatch.setattr(OpenCVRunner, "run", run)
    reports = []
    for reorder in (True, False):
        if not reorder:
            monkeypatch.setattr(pipeline._Run, "run_order", lambda self, start, end: np.arange(start, end))
        judged.append(0)
        # (--objective size: measured timings, which vary between the two runs, play no part)
        reports.append(compress(gendernet.deploy, gendernet.weights, tradeoff=0.95, seed=0, progress=None,
                                objective="size", plan_only=True))
    first, plain = reports
    assert [(lp.layer, lp.method, lp.rank) for lp in first.layers] == \
        [(lp.layer, lp.method, lp.rank) for lp in plain.layers]
    assert first.bytes_after == plain.bytes_after
    assert first.contract == plain.contract and first.validation == plain.validation
    assert judged[0] < judged[1], judged


def test_changed_answers_are_the_counted_inputs_whose_class_changed():
    p = np.array([[0.95, 0.05], [0.55, 0.45], [0.97, 0.03], [0.02, 0.98]] * 4)  # counted: all but the 0.55s
    q = p.copy()
    q[[0, 1, 3]] = q[[0, 1, 3]][:, ::-1]  # inputs 0, 1 and 3 change class; 1 is not counted
    changed = contract.changed_answers([spec("class")], {"y": p}, {"y": q[:6]}, 6)
    assert changed.tolist() == [True, False, False, True, False, False]
    assert contract.decided_by_changes([spec("class"), spec("class", "z")])
    assert not contract.decided_by_changes([spec("class"), spec("dense", "z")]) and not contract.decided_by_changes([])


def test_stage_times_are_exclusive_and_add_up_to_no_more_than_the_run():
    """A stage inside another (layers timed during the analysis) counts as its own only; one inside itself
    counts once."""
    import time

    from caffe_compress.pipeline import _Timer

    timer = _Timer()
    start = time.perf_counter()
    with timer.stage("analyse"):
        time.sleep(0.05)
        with timer.stage("timing"):
            time.sleep(0.1)
            with timer.stage("timing"):
                time.sleep(0.05)
        assert timer.current == "analyse"
        time.sleep(0.05)
    total = time.perf_counter() - start
    assert timer.timings["timing"] == pytest.approx(0.15, abs=0.04)
    assert timer.timings["analyse"] == pytest.approx(0.10, abs=0.04)
    assert sum(timer.timings.values()) <= total + 1e-6


def test_a_refinement_that_misses_on_its_screened_share_is_not_judged_on_the_rest(tmp_path, monkeypatch):
    """A refinement (a one-layer move from a plan that passed) is optional: a miss on its screened share is
    final (the move is not taken), while a round of the budget search that misses there is judged on every
    input. Here every screened share misses narrowly, and two moves are tried after the search: one
    optional (as refine() tries them), one not."""
    from caffe_compress import compress, pipeline
    from caffe_compress.plan import contract as contract_module
    from test_contract import embedder

    deploy, model = embedder(tmp_path)
    real_check_all = contract_module.check_all
    judged, moves = [], []

    def check_all(specs, original, compressed, *a, **k):
        rows = next(iter(compressed.values())).shape[0]
        judged.append(rows)
        checks = real_check_all(specs, original, compressed, *a, **k)
        if rows < 128:  # every screened share misses (narrowly)
            checks = [pipeline.replace(c, value=0.99 * c.target if c.higher_is_better else 1.2 * c.target)
                      for c in checks]
        return checks

    def refine(self):
        best = pipeline._chosen_of(self.state.best[1])
        fc = next(c for c in self.candidates if c.layer == "fc" and c.method == best["fc"][0])
        higher = [r for r in sorted(fc.ranks) if r > best["fc"][1]][:2]  # (moves that pass on every input)
        for rank, optional in zip(higher, (True, False)):
            judged.clear()
            passed = self.attempt(self.state.best_budget, {**best, "fc": (best["fc"][0], rank)}, optional=optional)
            moves.append((optional, passed, list(judged)))

    monkeypatch.setattr(pipeline.contract, "check_all", check_all)
    monkeypatch.setattr(pipeline._ClosedLoop, "refine", refine)
    report = compress(deploy, model, tradeoff=0.95, output=tmp_path / "o", seed=0, progress=None)
    (opt, opt_passed, opt_judged), (full, full_passed, full_judged) = moves
    assert opt and opt_passed is False and opt_judged and all(n < 128 for n in opt_judged)  # final on the share
    assert not full and full_passed and full_judged[-1] == 128  # settled on every input
    assert report.output_caffemodel and all(c.passed for c in report.contract)


@pytest.mark.parametrize("smaller,speedup,objective,ranks,written", [
    (1.02, 1.01, "balanced", {}, False),  # within noise on both axes: not worth a model that may be slower
    (1.02, 1.01, "speed", {}, False),
    (1.02, 1.05, "balanced", {}, True),  # clearly faster
    (1.10, 0.98, "balanced", {}, True),  # clearly smaller
    (1.02, 1.01, "size", {}, True),  # size is all that is asked
    (1.02, 1.01, "balanced", {"fc": 4}, True),  # the user's ranks
])
def test_a_plan_that_gains_on_neither_axis_beyond_the_noise_allowance_is_not_written(
        tmp_path, smaller, speedup, objective, ranks, written):
    from types import SimpleNamespace

    from caffe_compress import pipeline, timing

    original, temp = tmp_path / "w.caffemodel", tmp_path / "t.caffemodel"
    original.write_bytes(b"x" * 10_000)
    temp.write_bytes(b"x" * round(10_000 / smaller))
    staged = _Staged("s")
    staged.temp_caffemodel = temp
    run = SimpleNamespace(weights=original, objective=objective, ranks=ranks)
    loop = pipeline._ClosedLoop(run, None, None, [], {}, [], {}, None)
    loop.state.best = (staged, None, None)
    loop.worth_writing(staged, timing.Latency(10.0 * speedup, 10.0))
    assert (loop.state.best is not None) == written and staged.discarded == (not written)
    assert bool(loop.state.unworthy) == (not written)
    if not written:
        assert f"only {smaller:.2f}x smaller" in loop.state.unworthy and "--objective size" in loop.state.unworthy


SR_NET = """
name: "sr"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 1 dim: 256 dim: 192 } } }
layer { name: "c1" type: "Convolution" bottom: "data" top: "c1" convolution_param { num_output: 8 kernel_size: 3 pad: 1 } }
layer { name: "c2" type: "Convolution" bottom: "c1" top: "c2" convolution_param { num_output: 1 kernel_size: 3 pad: 1 } }
"""


@pytest.mark.parametrize("reference_ms,side", [(1.0, (256, 192)), (40.0, (107, 80)), (1000.0, (96, 72)),
                                               (None, (96, 72))])
def test_a_fully_convolutional_net_is_timed_at_its_declared_size_when_a_forward_there_is_short(
        tmp_path, monkeypatch, reference_ms, side):
    """Its probes are smaller than declared; the whole-model timings (the never-slower check, the report) run
    at the declared size when one 1-thread forward there is estimated within LATENCY_SAMPLE_MS, else at the
    largest size within it, never below the probes' (and at theirs when nothing was measured)."""
    from types import SimpleNamespace

    from caffe_compress import io, pipeline
    from nets import write_model

    rng = np.random.default_rng(0)
    deploy, model = write_model(tmp_path, "sr", SR_NET, {
        "c1": [rng.standard_normal((8, 1, 3, 3)).astype(np.float32), np.zeros(8, np.float32)],
        "c2": [rng.standard_normal((1, 8, 3, 3)).astype(np.float32), np.zeros(1, np.float32)]})
    net = io.load(deploy, model)
    probes = rng.uniform(0, 1, (5, 1, 96, 72)).astype(np.float32)
    cached = {}

    def measured(key, measure):
        cached.setdefault(key, measure())
        return cached[key]

    monkeypatch.setattr(pipeline, "LATENCY_SAMPLE_MS", 100.0)
    run = SimpleNamespace(reference_ms=reference_ms, _measured=measured)
    run.latency_side = lambda n, p: pipeline._Run.latency_side(run, n, p)
    # area 256*192 / (96*72) = 7.1, one thread 2x: 1 ms -> 14 ms (declared); 40 ms -> 569 ms: sides x 0.42
    feed = pipeline._Run._latency_feed(run, net, SimpleNamespace(validation={"data": probes}))
    assert feed["data"].shape[:2] == (1, 1) and feed["data"].dtype == np.float32
    assert tuple(feed["data"].shape[2:]) == side
    assert set(np.unique(feed["data"])) <= set(np.unique(probes[0]))  # (the probe's values, resized)
    run.reference_ms = 1e-3 if reference_ms else None  # a later run on the same cache: the same size
    assert pipeline._Run._latency_feed(run, net, SimpleNamespace(validation={"data": probes}))["data"].shape == \
        feed["data"].shape


def _decaying_small_model(tmp_path):
    """test_tradeoff's small net with a compressible fc1 (singular values ~ 1/i): moderate ranks meet the contract
    at T = 0.99, the lowest do not."""
    from nets import write_model
    from test_tradeoff import SMALL_NET

    rng = np.random.default_rng(11)

    def he(*shape):
        return (rng.standard_normal(shape) * np.sqrt(2.0 / int(np.prod(shape[1:])))).astype(np.float32)

    u, _ = np.linalg.qr(rng.standard_normal((64, 64)))
    v, _ = np.linalg.qr(rng.standard_normal((800, 64)))
    fc1 = (u * np.arange(1, 65) ** -1.0) @ v.T
    fc1 = (fc1 * np.sqrt(2.0 / 800) / np.sqrt(np.mean(fc1 * fc1))).astype(np.float32)
    return write_model(tmp_path, "decaying", SMALL_NET, {
        "conv1": [he(16, 3, 5, 5), np.zeros(16, np.float32)], "conv2": [he(32, 16, 3, 3), np.full(32, 0.01, np.float32)],
        "fc1": [fc1, np.zeros(64, np.float32)], "fc2": [he(10, 64), np.zeros(10, np.float32)]})


def test_gains_that_do_not_predict_the_misses_are_replaced_by_conservative_ones(tmp_path, monkeypatch):
    """A softmax saturated on the planning inputs hides every layer's change there (gains of 1e-80): each rung
    then plans the same deepest cuts, which miss. The search runs again with every gain at least 1 instead of
    writing nothing, and finds the plan real gains find."""
    from dataclasses import replace

    from caffe_compress import pipeline
    from caffe_compress.plan import search

    deploy, model = _decaying_small_model(tmp_path)
    real = search.measure_gains
    monkeypatch.setattr(search, "measure_gains", lambda *a, **k: [replace(c, gain=1e-80) for c in real(*a, **k)])
    report = pipeline.compress(deploy, model, tradeoff=0.99, output=tmp_path / "o", seed=0, objective="size",
                               progress=None)
    assert report.output_caffemodel and all(c.passed for c in report.contract)
    ranks = {lp.layer: lp.rank for lp in report.layers}
    assert ranks["fc1"] is not None and ranks["fc1"] > 8  # (a moderate rank, not the grid's lowest)
    assert report.rounds > 1


@pytest.mark.parametrize("gains,passed,forced,again", [
    ((1e-80, 0.5), False, {}, True),  # nothing passed, measured gains below 1: search again
    ((1.0, 1.3), False, {}, False),  # the gains are already conservative: nothing new to plan
    ((1e-80, 0.5), True, {}, False),  # a plan passed: the gains steered
    ((1e-80, 0.5), False, {"fc1": 4}, False),  # the user's ranks
])
def test_the_conservative_search_runs_only_when_nothing_passed_on_gains_below_1(gains, passed, forced, again):
    from types import SimpleNamespace

    from caffe_compress import pipeline
    from caffe_compress.plan.analyse import Candidate

    said = []
    run = SimpleNamespace(ranks=forced, say=said.append)
    cands = [Candidate(f"l{i}", "InnerProduct", "svd", (4, 4), 1, 16, 16, (2,), {2: 8}, {2: 8}, {2: 0.1}, {2: 0.1},
                       gain=g) for i, g in enumerate(gains)]
    loop = pipeline._ClosedLoop(run, None, None, cands, {}, [], {}, None)
    loop.state.misses.append("a miss")
    loop.state.best = ("staged", None, None) if passed else None
    assert loop.unpredicted() == again
    assert [c.gain for c in loop.candidates] == ([max(g, 1.0) for g in gains] if again else list(gains))
    assert bool(said) == again
    assert not loop.unpredicted() or not again  # (once: the gains are then all at least 1)
