"""The pure-numpy decompositions: exact recovery, stability, error falling with rank."""
import numpy as np
import pytest

from caffe_compress.decompose import cp_conv, cp_reconstruct, spectral_basis, svd, truncated_svd
from caffe_compress.errors import RankError
from nets import cp_kernel, low_rank_matrix


@pytest.mark.parametrize("shape,rank", [((16, 8, 3, 3), 5), ((32, 16, 5, 5), 12), ((8, 4, 7, 7), 6),
                                        ((12, 6, 5, 3), 4), ((10, 6, 1, 1), 3)])
def test_cp_recovers_exact_rank(shape, rank):
    kernel = cp_kernel(*shape, rank, seed=3)
    f = cp_conv(kernel, rank, n_iter_max=3000)
    rel = np.linalg.norm(cp_reconstruct(f) - kernel) / np.linalg.norm(kernel)
    assert rel <= 1e-4
    assert f.first.shape == (rank, shape[1], 1, 1) and f.last.shape == (shape[0], rank, 1, 1)
    assert f.vertical.shape == (rank, 1, shape[2], 1) and f.horizontal.shape == (rank, 1, 1, shape[3])
    assert all(a.dtype == np.float32 for a in (f.first, f.vertical, f.horizontal, f.last))


def test_cp_is_deterministic_and_finite_on_degenerate_input():
    rng = np.random.default_rng(0)
    kernel = rng.standard_normal((16, 8, 3, 3)).astype(np.float32)
    a = cp_conv(kernel, 40, seed=7, n_iter_max=60)
    b = cp_conv(kernel, 40, seed=7, n_iter_max=60)
    assert np.array_equal(a.first, b.first) and np.array_equal(a.last, b.last)
    for f in (a.first, a.vertical, a.horizontal, a.last):
        assert np.all(np.isfinite(f)) and np.max(np.abs(f)) < 1e3
    zero = cp_conv(np.zeros((4, 3, 3, 3), np.float32), 2)
    assert zero.relative_error == 0.0 and np.all(np.isfinite(zero.first))


def test_cp_error_falls_with_rank():
    kernel = np.random.default_rng(1).standard_normal((32, 16, 3, 3)).astype(np.float32)
    errors = [cp_conv(kernel, r, n_iter_max=100).relative_error for r in (2, 8, 32, 96)]
    assert errors == sorted(errors, reverse=True) and errors[-1] < errors[0]


def test_svd_exact_rank_and_balance():
    w = low_rank_matrix(40, 90, 7, seed=2)
    f = truncated_svd(w, 7)
    assert np.linalg.norm(f.second @ f.first - w) / np.linalg.norm(w) <= 1e-5
    assert f.relative_error <= 1e-5
    # balanced sqrt(S) split: both factors carry the same column/row norms
    assert np.allclose(np.linalg.norm(f.second, axis=0), np.linalg.norm(f.first, axis=1), rtol=1e-3)


def _known_spectrum(n: int, k: int, s: np.ndarray, seed: int) -> np.ndarray:
    """An (n, k) float32 matrix with singular values ``s`` (len <= n <= k) and random singular vectors."""
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.standard_normal((n, s.size)))
    v, _ = np.linalg.qr(rng.standard_normal((k, s.size)))
    return ((u * s) @ v.T).astype(np.float32)


@pytest.mark.parametrize("transpose", [False, True])
def test_a_partial_basis_of_a_wide_matrix_recovers_its_true_rank(transpose):
    """Past PARTIAL_ABOVE only the wanted leading triplets are computed: still exact at the true rank."""
    n = svd.PARTIAL_ABOVE + 16
    w = _known_spectrum(n, n + 40, np.linspace(3.0, 1.0, 30), seed=4)
    w = w.T.copy() if transpose else w
    basis = spectral_basis(w, keep=64)
    assert not basis.complete and basis.s.size == 64
    assert np.allclose(basis.s[:30], np.linspace(3.0, 1.0, 30), rtol=1e-4) and np.all(basis.s[30:] < 1e-3)
    f = basis.factors(30)
    assert f.second.shape == (w.shape[0], 30) and f.first.shape == (30, w.shape[1])
    assert np.linalg.norm(f.second @ f.first - w) / np.linalg.norm(w) <= 1e-4 and f.relative_error <= 1e-3
    with pytest.raises(RankError):
        basis.factors(65)  # beyond what was computed


def test_a_partial_basis_reports_the_error_of_the_factors_it_makes():
    """On a slowly decaying spectrum the leading triplets are near-optimal, and the error each rank reports
    is the error of those factors (what the plan's weight error relies on), not of the optimal ones."""
    n = svd.PARTIAL_ABOVE + 16
    s = np.arange(1, n + 1) ** -0.5
    w = _known_spectrum(n, n + 100, s, seed=5)
    basis = spectral_basis(w, keep=256)
    for r in (8, 64, 256):
        f = basis.factors(r)
        actual = np.linalg.norm((f.second @ f.first - w).astype(np.float64)) / np.linalg.norm(w.astype(np.float64))
        optimal = np.sqrt(np.sum(s[r:] ** 2) / np.sum(s ** 2))
        assert abs(f.relative_error - actual) <= 1e-4
        assert optimal - 1e-5 <= actual <= optimal * 1.01
    full = spectral_basis(w)  # keep=None: every triplet, as before
    assert full.complete and full.s.size == n


def test_svd_error_falls_with_rank_and_matches_numpy():
    w = np.random.default_rng(3).standard_normal((30, 50)).astype(np.float32)
    basis = spectral_basis(w)
    assert np.allclose(basis.s, np.linalg.svd(w.astype(np.float64), compute_uv=False), rtol=1e-6)
    errs = [basis.relative_error(r) for r in range(1, 31)]
    assert all(a >= b for a, b in zip(errs, errs[1:])) and errs[-1] < 1e-6
    with pytest.raises(RankError):
        truncated_svd(w, 31)
    with pytest.raises(RankError):
        truncated_svd(w, 0)


def test_a_basis_cut_to_its_leading_vectors_gives_the_same_factors_and_errors():
    w = low_rank_matrix(96, 160, 40, seed=3) + 0.01 * np.random.default_rng(3).standard_normal((96, 160))
    full = spectral_basis(w)
    cut = full.leading(24)
    assert cut.u.shape == (96, 24) and cut.vt.shape == (24, 160) and cut.vt.dtype == np.float32
    for rank in (1, 8, 24):
        a, b = full.factors(rank), cut.factors(rank)
        assert b.relative_error == full.relative_error(rank) == a.relative_error
        np.testing.assert_allclose(b.second @ b.first, a.second @ a.first, rtol=0, atol=1e-5 * np.abs(w).max())
    with pytest.raises(RankError):
        cut.factors(25)


def test_the_analysis_keeps_spatial_bases_only_up_to_the_grids_top_rank():
    """A spatial-SVD basis is kept for the rewrite in float32 and only up to the largest rank its grid can
    choose (a 512 x 512 3 x 3 kernel's whole float64 basis is 38 MB): every candidate rank still rebuilds."""
    from caffe_compress.net import Layer
    from caffe_compress.plan import analyse

    rng = np.random.default_rng(0)
    kernel = (cp_kernel(64, 48, 3, 3, 20, seed=1) + 0.01 * rng.standard_normal((64, 48, 3, 3))).astype(np.float32)
    layer = Layer("c", "Convolution", ("x",), ("y",), {"convolution_param": {"num_output": 64, "kernel_size": [3], "bias_term": False}},
                  (kernel,))
    patches = rng.standard_normal((512, 48, 3, 3)).astype(np.float32)
    ws = analyse.Workspace()
    (cand,) = [analyse.analyse_convolution(layer, patches, (1, 48, 16, 16), (1, 64, 14, 14), analyse.METHOD_SPATIAL,
                                           min_rank_divisor=1, seed=0, ws=ws, cp_iterations=8)]
    (basis,) = ws.spatial["c"]
    assert basis.vt.shape[0] == max(cand.ranks) < min(48 * 3, 64 * 3) and basis.vt.dtype == np.float32
    for rank in cand.ranks:
        weight = analyse.approximate_weight(layer, cand, rank, ws)
        err = np.linalg.norm(weight - kernel) / np.linalg.norm(kernel)
        assert err == pytest.approx(cand.weight_error[rank], rel=1e-3, abs=1e-6)
