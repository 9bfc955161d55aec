"""The pure-numpy decompositions: exact recovery, stability, error falling with rank."""
import numpy as np
import pytest

from caffe_compress.decompose import cp_conv, cp_reconstruct, spectral_basis, truncated_svd
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
