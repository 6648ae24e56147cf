"""Inverted-list ADC search (jpq.kernels.ivf.ivf_search): the CPU path against the NumPy
reference, on random lists with empty ones, -1 probes, k larger than what is scanned, ties, both
metrics; and bitwise equal to adc_topk(build_lut(...)) when every list is probed."""
import numpy as np
import pytest
import torch

from jpq.kernels import adc_topk, build_lut
from jpq.kernels.adc import adc_scores_reference, build_lut_reference
from jpq.kernels.ivf import ivf_search
from kernel_cases import assert_topk_matches


def lists(rng, N, n_lists):
    """CSR lists over N documents: (offsets, ids in list order, list of each document)."""
    leaf = rng.integers(0, n_lists, N)
    ids = np.argsort(leaf, kind="stable")
    offsets = np.concatenate([[0], np.cumsum(np.bincount(leaf, minlength=n_lists))])
    return offsets, ids, leaf


def problem(rng, M, K, ds, N, nq):
    q = rng.standard_normal((nq, M * ds)).astype(np.float32)
    C = rng.standard_normal((M, K, ds)).astype(np.float32)
    codes = rng.integers(0, K, (N, M)).astype(np.uint8)
    return q, C, codes


@pytest.mark.parametrize("metric", ["ip", "l2"])
@pytest.mark.parametrize("M,K,ds,N,n_lists,nq,w,k", [(8, 16, 3, 300, 10, 7, 3, 5), (3, 7, 1, 50, 20, 4, 5, 100),
                                                      (16, 256, 4, 2000, 64, 33, 6, 20), (1, 256, 5, 1, 3, 2, 3, 1)])
def test_cpu_matches_reference(metric, M, K, ds, N, n_lists, nq, w, k):
    rng = np.random.default_rng(M + N + nq)
    q, C, codes = problem(rng, M, K, ds, N, nq)
    offsets, ids, leaf = lists(rng, N, n_lists)
    probes = np.stack([rng.choice(n_lists, w, replace=False) for _ in range(nq)]).astype(np.int64)
    probes[0, -1] = -1  # fewer lists for some queries
    probes[-1, :] = -1  # a query that scans nothing
    args = (q, C, codes[ids], offsets, ids, probes, k, metric)
    D_ref, I_ref = ivf_search(*args, backend="reference")
    D, I = ivf_search(*args, backend="cpu")
    assert D.dtype == np.float32 and I.dtype == np.int64 and D.shape == I.shape == (nq, k)
    assert (I[-1] == -1).all()
    # scores of every document (only the scanned ones can be returned)
    lut = build_lut_reference(q, C, metric)
    scores = adc_scores_reference(lut, codes)
    for qi in range(nq):
        scanned = np.isin(leaf, probes[qi][probes[qi] >= 0])
        scores[qi, ~scanned] = -np.inf if metric == "ip" else np.inf
    assert_topk_matches(D, I, D_ref, I_ref, scores, atol=4e-6 * M * np.abs(lut).max(), metric=metric)


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_ties_go_to_the_smaller_id(metric):
    """Documents with equal codes score exactly alike: best first, then ascending ids, across lists
    (the in-kernel heapsort gives the reference's order, not only the same set)."""
    rng = np.random.default_rng(5)
    q, C, _ = problem(rng, 4, 8, 2, 1, 3)
    codes = np.repeat(rng.integers(0, 8, (5, 4)).astype(np.uint8), 8, axis=0)[rng.permutation(40)]
    offsets, ids, _ = lists(rng, 40, 4)
    probes = np.array([[0, 1, 2, 3], [3, 1, -1, -1], [2, -1, -1, -1]])
    for k in (1, 7, 40, 45):
        D, I = ivf_search(q, C, codes[ids], offsets, ids, probes, k, metric)
        D_ref, I_ref = ivf_search(q, C, codes[ids], offsets, ids, probes, k, metric, backend="reference")
        np.testing.assert_array_equal(I, I_ref)
        np.testing.assert_allclose(D, D_ref, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_all_lists_probed_equals_adc_topk_bitwise(metric):
    rng = np.random.default_rng(3)
    q, C, codes = problem(rng, 12, 64, 4, 700, 9)
    offsets, ids, _ = lists(rng, 700, 8)
    probes = np.tile(np.arange(8), (9, 1))
    D, I = ivf_search(q, C, codes[ids], offsets, ids, probes, 15, metric)
    D_ref, I_ref = adc_topk(build_lut(q, C, metric), codes, 15, metric=metric, backend="cpu")
    np.testing.assert_array_equal(I, I_ref)
    np.testing.assert_array_equal(D, D_ref)
    # torch tensors are read through NumPy; results come back as NumPy
    Dt, It = ivf_search(torch.from_numpy(q), torch.from_numpy(C), torch.from_numpy(codes[ids]), offsets, ids,
                        probes, 15, metric)
    np.testing.assert_array_equal(It, I_ref)


def test_bad_inputs_raise():
    rng = np.random.default_rng(0)
    q, C, codes = problem(rng, 4, 16, 2, 10, 2)
    offsets, ids = np.array([0, 4, 10]), np.arange(10)
    ok = np.array([[0, 1], [1, -1]])
    with pytest.raises(ValueError, match="probes"):
        ivf_search(q, C, codes, offsets, ids, np.array([[0, 2], [1, 0]]), 3)
    with pytest.raises(ValueError, match="rows"):
        ivf_search(q, C, codes, offsets, ids, ok[:1], 3)
    with pytest.raises(ValueError, match="list_offsets"):
        ivf_search(q, C, codes, np.array([0, 4, 9]), ids, ok, 3)
    with pytest.raises(ValueError, match="list_ids"):
        ivf_search(q, C, codes, offsets, np.arange(9), ok, 3)
    with pytest.raises(ValueError, match="list_ids"):
        ivf_search(q, C, codes, offsets, np.arange(10) - 1, ok, 3)
    with pytest.raises(ValueError, match="dimension"):
        ivf_search(q[:, :7], C, codes, offsets, ids, ok, 3)
    with pytest.raises(ValueError, match="codes"):
        ivf_search(q, C, codes + 16, offsets, ids, ok, 3)
    with pytest.raises(ValueError, match="finite"):
        ivf_search(np.full_like(q, np.nan), C, codes, offsets, ids, ok, 3)
    with pytest.raises(RuntimeError, match="no Triton path"):
        ivf_search(q, C, codes, offsets, ids, ok, 3, backend="triton")
    with pytest.raises(ValueError, match="backend"):
        ivf_search(q, C, codes, offsets, ids, ok, 3, backend="gpu")
    with pytest.raises(ValueError, match="list_codes must have shape"):  # check=False still checks shapes
        ivf_search(q, C, codes[:, :3], offsets, ids, ok, 3, check=False)
    with pytest.raises(ValueError, match="D = M"):
        ivf_search(q[:, :6], C, codes, offsets, ids, ok, 3, check=False)
    D, I = ivf_search(q, C, codes, offsets, ids, ok, 3, check=False)
    D_ref, I_ref = ivf_search(q, C, codes, offsets, ids, ok, 3, backend="reference")
    np.testing.assert_array_equal(I, I_ref)
