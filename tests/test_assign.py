"""Codebook assignment: every path against the NumPy reference; near-ties compared by distance."""
import numpy as np
import pytest
import torch

from jpq.kernels import assign
from jpq.kernels.assign import assign_reference
from kernel_cases import backend_params, numpy_of, shrink

BACKENDS = backend_params()


def subspace_distances(x, C, codes):
    """(n, M) squared distance of each sub-vector to the centroid `codes` picks, float64."""
    M, K, ds = C.shape
    xs = x.astype(np.float64).reshape(-1, M, ds)
    chosen = C.astype(np.float64)[np.arange(M)[None, :], codes.astype(np.int64)]
    return ((xs - chosen) ** 2).sum(-1)


def assert_codes_match(codes, x, C):
    codes = numpy_of(codes)
    ref = assign_reference(x, C)
    assert codes.shape == ref.shape and codes.dtype == np.uint8
    differ = codes != ref
    if differ.any():
        # only exact near-ties may differ: the chosen centroid must be as close as the best
        d = subspace_distances(x, C, codes)
        d_ref = subspace_distances(x, C, ref)
        np.testing.assert_allclose(d[differ], d_ref[differ], rtol=1e-5, atol=1e-5)
        assert differ.mean() < 1e-3, f"{differ.sum()} codes differ from the reference"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "n,M,K,ds",
    [(0, 2, 16, 4), (1, 1, 256, 4), (17, 3, 7, 5), (1000, 8, 256, 2), (2049, 16, 16, 1),
     (300, 96, 256, 8), (129, 4, 1, 3), (64, 2, 256, 24), (33, 2, 32, 32)],
)
@pytest.mark.parametrize("as_torch", [False, True], ids=["numpy", "torch"])
def test_assign_matches_reference(backend, n, M, K, ds, as_torch):
    rng = np.random.default_rng(n + M + K + ds)
    n = shrink(n, backend, cap=200)
    C = rng.standard_normal((M, K, ds)).astype(np.float32)
    x = rng.standard_normal((n, M * ds)).astype(np.float32)
    args = (torch.from_numpy(x), torch.from_numpy(C)) if as_torch else (x, C)
    codes = assign(*args, backend=backend)
    assert isinstance(codes, torch.Tensor) == as_torch
    assert_codes_match(codes, x, C)


@pytest.mark.parametrize("backend", BACKENDS)
def test_assign_exact_on_points_that_are_centroids(backend):
    # each sub-vector equals one centroid exactly: the code must be that centroid's index
    rng = np.random.default_rng(5)
    M, K, ds = 4, 32, 6
    C = rng.standard_normal((M, K, ds)).astype(np.float32)
    truth = rng.integers(0, K, (shrink(500, backend, 64), M))
    x = C[np.arange(M)[None, :], truth].reshape(len(truth), M * ds)
    np.testing.assert_array_equal(numpy_of(assign(x, C, backend=backend)), truth)


def test_assign_float64_input_is_accepted_and_encoded_as_float32():
    rng = np.random.default_rng(1)
    C = rng.standard_normal((2, 8, 3))
    x = rng.standard_normal((20, 6))
    assert_codes_match(assign(x, C), x.astype(np.float32), C.astype(np.float32))


@pytest.mark.parametrize(
    "x_shape, c_shape, error, match",
    [
        ((5, 13), (4, 8, 3), ValueError, "D = M \\* ds = 12"),
        ((5, 12), (4, 300, 3), ValueError, "at most 256"),
        ((5,), (4, 8, 3), ValueError, "x must have 2 dimensions"),
        ((5, 12), (4, 8), ValueError, "centroids must have 3 dimensions"),
    ],
)
def test_assign_bad_shapes(x_shape, c_shape, error, match):
    with pytest.raises(error, match=match):
        assign(np.zeros(x_shape, np.float32), np.zeros(c_shape, np.float32))


def test_assign_bad_dtypes_and_values():
    C = np.zeros((2, 4, 3), np.float32)
    with pytest.raises(TypeError, match="x must be a floating"):
        assign(np.zeros((3, 6), np.int64), C)
    with pytest.raises(ValueError, match="x contains NaN"):
        assign(np.full((3, 6), np.nan, np.float32), C)
    with pytest.raises(TypeError, match="all NumPy arrays or all torch"):
        assign(torch.zeros(3, 6), C)
