"""Tucker-2 and spatial SVD: exact at their true ranks, in numpy and in OpenCV across the geometries."""

import numpy as np
import pytest

from caffe_compress.decompose import (
    spatial_reconstruct, spatial_svd_conv, tucker2_conv, tucker_ranks, tucker_reconstruct,
)
from caffe_compress.errors import UsageError
from caffe_compress.pipeline import compress
from nets import max_relative_difference, opencv_outputs, write_model
from test_geometry import CASES, S, T, _net_text, assert_rewrite_matches


def tucker_kernel(t, s, kh, kw, rank, seed=0):
    """A (t, s, kh, kw) kernel whose two channel-mode ranks are ``rank``."""
    rng = np.random.default_rng(seed)
    u_out, u_in = rng.standard_normal((t, rank)), rng.standard_normal((s, rank))
    core = rng.standard_normal((rank, rank, kh, kw))
    return (np.einsum("ta,abij,sb->tsij", u_out, core, u_in) / np.sqrt(rank * s * kh * kw)).astype(np.float32)


def spatial_kernel(t, s, kh, kw, rank, seed=0):
    """A kernel whose (S*kh) x (T*kw) unfolding has rank ``rank``."""
    rng = np.random.default_rng(seed)
    m = rng.standard_normal((s * kh, rank)) @ rng.standard_normal((rank, t * kw)) / np.sqrt(rank * s * kh)
    return m.reshape(s, kh, t, kw).transpose(2, 0, 1, 3).astype(np.float32)


FORMS = {"tucker2": (tucker_kernel, 3), "spatial-svd": (spatial_kernel, 2)}  # form: (kernel maker, conv layers)


@pytest.mark.parametrize("shape,rank", [((16, 8, 3, 3), 4), ((32, 16, 5, 5), 7), ((12, 6, 5, 3), 6),
                                        ((8, 4, 7, 7), 3), ((6, 10, 3, 3), 10)])
def test_tucker_recovers_exact_rank(shape, rank):
    kernel = tucker_kernel(*shape, rank, seed=2)
    f = tucker2_conv(kernel, rank)
    r_in, r_out = tucker_ranks(rank, shape[0], shape[1])
    assert f.first.shape == (r_in, shape[1], 1, 1) and f.last.shape == (shape[0], r_out, 1, 1)
    assert f.core.shape == (r_out, r_in, shape[2], shape[3])
    assert np.linalg.norm(tucker_reconstruct(f) - kernel) / np.linalg.norm(kernel) <= 1e-5
    assert f.relative_error <= 1e-5


def test_tucker_error_falls_with_rank_and_is_deterministic():
    kernel = np.random.default_rng(4).standard_normal((24, 16, 3, 3)).astype(np.float32)
    errors = [tucker2_conv(kernel, r).relative_error for r in (2, 4, 8, 16)]
    assert errors == sorted(errors, reverse=True) and errors[-1] < 0.5 * errors[0]
    assert np.array_equal(tucker2_conv(kernel, 5).core, tucker2_conv(kernel, 5).core)
    assert tucker2_conv(np.zeros((4, 3, 3, 3), np.float32), 2).relative_error == 0.0


@pytest.mark.parametrize("shape,rank", [((16, 8, 3, 3), 5), ((32, 16, 5, 5), 12), ((12, 6, 5, 3), 4)])
def test_spatial_svd_recovers_exact_rank(shape, rank):
    kernel = spatial_kernel(*shape, rank, seed=3)
    f = spatial_svd_conv(kernel, rank)
    assert f.vertical.shape == (rank, shape[1], shape[2], 1) and f.horizontal.shape == (shape[0], rank, 1, shape[3])
    assert np.linalg.norm(spatial_reconstruct(f) - kernel) / np.linalg.norm(kernel) <= 1e-5
    errors = [spatial_svd_conv(kernel, r).relative_error for r in range(1, rank + 1)]
    assert errors == sorted(errors, reverse=True) and errors[-1] <= 1e-5


SPATIAL_CASES = [c for c, v in CASES.items() if v[0] != (1, 1)]


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("case", SPATIAL_CASES)
def test_form_exact_rank_in_opencv(tmp_path, case, form):
    """Forced form and true rank: the rewritten net matches the original in OpenCV (stride, pad, dilation,
    groups, non-square kernels, no bias)."""
    (kh, kw), param, group, rank = CASES[case]
    make, conv_layers = FORMS[form]
    rng = np.random.default_rng(11)
    weight = np.concatenate([make(T // group, S // group, kh, kw, rank // group, seed=g) for g in range(group)])
    blobs = [weight] if "bias_term: false" in param else [weight, rng.standard_normal(T).astype(np.float32)]
    deploy, model = write_model(tmp_path, "geo", _net_text(param, False), {"conv": blobs})
    report = compress(deploy, model, tradeoff=0.0, ranks={"conv": rank}, forms={"conv": form},
                      output=tmp_path / "out")
    assert_rewrite_matches(tmp_path, deploy, model, rng, conv_layers=conv_layers)
    conv = next(lp for lp in report.layers if lp.layer == "conv")
    assert conv.method == form and conv.rank == rank and conv.params_after < conv.params_before


def form_chain_model(tmp_path, rng):
    """Three k x k layers of true rank 2, one per form (strided/dilated/padded/grouped): (deploy, model,
    ranks, forms, input shape)."""
    specs = [("a", "cp", "kernel_size: 3 stride: 2 pad_h: 1 pad_w: 2"),
             ("b", "tucker2", "kernel_h: 5 kernel_w: 3 dilation: 2 pad: 3 group: 2"),
             ("c", "spatial-svd", "kernel_size: 3 stride_h: 1 stride_w: 2 pad: 1")]
    from nets import cp_kernel

    makers = {"cp": cp_kernel, "tucker2": tucker_kernel, "spatial-svd": spatial_kernel}
    layers, weights, bottom = [], {}, "data"
    for i, (name, form, param) in enumerate(specs):
        group = 2 if "group: 2" in param else 1
        kh, kw = (5, 3) if "kernel_h: 5" in param else (3, 3)
        weights[name] = [np.concatenate([makers[form](T // group, (S if i == 0 else T) // group, kh, kw, 2, seed=g)
                                         for g in range(group)]),
                         rng.standard_normal(T).astype(np.float32) * 0.1]
        layers.append(f'layer {{ name: "{name}" type: "Convolution" bottom: "{bottom}" top: "{name}" '
                      f'convolution_param {{ num_output: {T} {param} }} }}')
        bottom = name
    text = (f'layer {{ name: "data" type: "Input" top: "data" input_param {{ shape {{ dim: 1 dim: {S} dim: 41 dim: 37 }} }} }}\n'
            + "\n".join(layers) + "\n")
    deploy, model = write_model(tmp_path, "chain", text, weights)
    ranks = {"a": 2, "b": 4, "c": 2}  # b: rank 2 per group, 2 groups
    return deploy, model, ranks, {n: f for n, f, _ in specs}, (1, S, 41, 37)


def test_every_form_chained_in_one_network(tmp_path):
    """Three k x k layers, one per form, strided/dilated/padded, factored together at their true ranks."""
    rng = np.random.default_rng(12)
    deploy, model, ranks, forms, _ = form_chain_model(tmp_path, rng)
    compress(deploy, model, tradeoff=0.0, ranks=ranks, forms=forms, output=tmp_path / "o")
    x = {"data": rng.standard_normal((1, S, 41, 37)).astype(np.float32)}
    a = opencv_outputs(deploy, model, x)[0]
    b = opencv_outputs(tmp_path / "o.prototxt", tmp_path / "o.caffemodel", x)[0]
    assert max_relative_difference(a, b) <= 1e-4


def test_form_option_is_checked(tmp_path):
    (kh, kw), param, group, rank = CASES["k1x1"]
    w = np.random.default_rng(1).standard_normal((T, S, 1, 1)).astype(np.float32)
    deploy, model = write_model(tmp_path, "p", _net_text(param, False), {"conv": [w, np.zeros(T, np.float32)]})
    with pytest.raises(UsageError, match="--form conv=tucker2: .* takes svd-1x1"):
        compress(deploy, model, forms={"conv": "tucker2"}, output=tmp_path / "o")
    with pytest.raises(UsageError, match="--form: no layer named 'nope'"):
        compress(deploy, model, forms={"nope": "cp"}, output=tmp_path / "o")


@pytest.mark.parametrize("form", ["tucker2", "spatial-svd", "cp"])
@pytest.mark.parametrize("shape,groups", [((24, 16, 3, 3), 1), ((12, 10, 5, 3), 1), ((16, 8, 3, 3), 2)])
def test_analysis_errors_equal_the_truncated_kernels_outputs(form, shape, groups):
    """The analysis finds each grid rank's errors without forming the approximate kernel (the truncations
    sum what they drop block by block, CP runs the patches through its factors); every rank must give what
    the approximate kernel itself gives on the patches (output and weight error), groups included."""
    from caffe_compress.decompose import cp_reconstruct, spatial_factors, tucker2_conv
    from caffe_compress.net import Layer
    from caffe_compress.plan import analyse as A

    t, sg, kh, kw = shape[0], shape[1] // groups, shape[2], shape[3]
    rng = np.random.default_rng(5)
    weight = rng.standard_normal((t, sg, kh, kw)).astype(np.float32)
    conv = {"num_output": t, "kernel_h": kh, "kernel_w": kw, "group": groups}
    layer = Layer("c", "Convolution", ("x",), ("c",), {"convolution_param": conv},
                  (weight, rng.standard_normal(t).astype(np.float32)))
    data = A.conv_data(layer, np.abs(rng.standard_normal((300, shape[1], kh, kw))).astype(np.float32))
    ws = A.Workspace()
    if form == "cp":
        analysed = A._cp_errors(layer, data, ws, 1, t, None, seed=0, cp_iterations=20)
    else:
        analysed = (A._tucker_errors if form == "tucker2" else A._spatial_errors)(layer, data, ws, 1, t, None)
    assert len(analysed) >= 3
    for total, (out_err, w_err) in analysed.items():
        approx = []
        for i, k in enumerate(data.kernels):
            if form == "cp":
                approx.append(cp_reconstruct(ws.cp["c"][total][i]))
            elif form == "tucker2":
                approx.append(tucker_reconstruct(tucker2_conv(k, total // groups, sweeps=0, bases=ws.hosvd["c"][i])))
            else:
                approx.append(spatial_reconstruct(spatial_factors(ws.spatial["c"][i], k.shape, total // groups)))
        direct = data.errors(approx)
        assert out_err == pytest.approx(direct[0], rel=1e-4, abs=1e-6)
        assert w_err == pytest.approx(direct[1], rel=1e-4, abs=1e-6)


def test_a_cp_grid_stops_at_the_rank_its_cap_allows():
    """_Run.cp_rank_cap's contract with the analysis: the CP grid (total ranks, descending, groups included)
    is offered to the cap, only ranks up to the answer are analysed, the lowest always stays, and a forced
    rank is analysed as given whatever the cap says."""
    from caffe_compress.net import Layer
    from caffe_compress.plan import analyse as A

    rng = np.random.default_rng(2)
    t, s, groups = 32, 16, 2
    weight = rng.standard_normal((t, s // groups, 3, 3)).astype(np.float32)
    layer = Layer("c", "Convolution", ("x",), ("c",), {"convolution_param": {"num_output": t, "kernel_size": [3], "bias_term": False,
                                                                               "group": groups}}, (weight,))
    data = A.conv_data(layer, rng.standard_normal((200, s, 3, 3)).astype(np.float32))
    offered = []

    def analysed(cap, forced=None):
        def rank_cap(lay, ranks):
            offered.append(tuple(ranks))
            return cap
        return tuple(A._cp_errors(layer, data, A.Workspace(), 1, 0, forced, seed=0, cp_iterations=5,
                                  rank_cap=rank_cap))

    full = analysed(None)
    assert offered[-1] == full and list(full) == sorted(full, reverse=True) and all(r % groups == 0 for r in full)
    assert analysed(full[2]) == full[2:]
    assert analysed(0) == full[-1:]  # (nothing fast enough: the lowest rank stays)
    offered.clear()
    assert analysed(0, forced=full[0]) == (full[0],) and not offered


def test_the_cp_cap_is_the_largest_rank_measured_fast_enough():
    """fast_enough_cap interpolates the measured points as measure_times does (linear, extended above) and
    keeps the ranks the planner would offer: original / time >= required."""
    from caffe_compress.plan.search import fast_enough_cap

    ranks = (256, 128, 64, 32, 16)
    points = {256: 8.0, 16: 0.5}  # 1/32 ms per rank unit: 128 -> 4.0 ms, 64 -> 2.0 ms
    assert fast_enough_cap(ranks, 4.0, points, 1.0) == 128
    assert fast_enough_cap(ranks, 4.0, points, 1.1) == 64
    assert fast_enough_cap(ranks, 100.0, points, 1.1) == 256
    assert fast_enough_cap(ranks, 0.1, points, 0.97) == 16  # none: the lowest
