"""Inverted-list ADC scan (jpq.kernels.ivf.ivf_topk): the CPU path against the NumPy reference,
on random lists with empty ones, -1 probes, k larger than what is scanned, both metrics; and
equal to adc_topk when every list is probed."""
import numpy as np
import pytest

from jpq.kernels import adc_topk
from jpq.kernels.adc import adc_scores_reference
from jpq.kernels.ivf import ivf_topk
from kernel_cases import assert_topk_matches


def lists(rng, N, n_lists):
    leaf = rng.integers(0, n_lists, N)
    ids = np.argsort(leaf, kind="stable")
    offsets = np.concatenate([[0], np.cumsum(np.bincount(leaf, minlength=n_lists))])
    return offsets, ids, leaf


@pytest.mark.parametrize("metric", ["ip", "l2"])
@pytest.mark.parametrize("M,K,N,n_lists,nq,w,k", [(8, 16, 300, 10, 7, 3, 5), (3, 7, 50, 20, 4, 5, 100),
                                                   (16, 256, 2000, 64, 33, 6, 20), (1, 256, 1, 3, 2, 3, 1)])
def test_cpu_matches_reference(metric, M, K, N, n_lists, nq, w, k):
    rng = np.random.default_rng(M + N + nq)
    lut = rng.standard_normal((nq, M, K)).astype(np.float32)
    codes = rng.integers(0, K, (N, M)).astype(np.uint8)
    offsets, ids, leaf = lists(rng, N, n_lists)
    probes = np.stack([rng.choice(n_lists, w, replace=False) for _ in range(nq)]).astype(np.int64)
    probes[0, -1] = -1  # fewer lists for some queries
    probes[-1, :] = -1  # a query that scans nothing
    D_ref, I_ref = ivf_topk(lut, codes, offsets, ids, probes, k, metric, backend="reference")
    D, I = ivf_topk(lut, codes, offsets, ids, probes, k, metric, backend="cpu")
    assert D.dtype == np.float32 and I.dtype == np.int64 and D.shape == I.shape == (nq, k)
    assert (I[-1] == -1).all()
    # scores of every document (only the scanned ones can be returned)
    scores = adc_scores_reference(lut, codes)
    for q in range(nq):
        scanned = np.isin(leaf, probes[q][probes[q] >= 0])
        scores[q, ~scanned] = -np.inf if metric == "ip" else np.inf
    assert_topk_matches(D, I, D_ref, I_ref, scores, atol=4e-6 * M * np.abs(lut).max(), metric=metric)


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_all_lists_probed_equals_adc_topk_bitwise(metric):
    rng = np.random.default_rng(3)
    lut = rng.standard_normal((9, 12, 64)).astype(np.float32)
    codes = rng.integers(0, 64, (700, 12)).astype(np.uint8)
    offsets, ids, _ = lists(rng, 700, 8)
    probes = np.tile(np.arange(8), (9, 1))
    D, I = ivf_topk(lut, codes, offsets, ids, probes, 15, metric)
    D_ref, I_ref = adc_topk(lut, codes, 15, metric=metric, backend="cpu")
    np.testing.assert_array_equal(I, I_ref)
    np.testing.assert_array_equal(D, D_ref)


def test_bad_inputs_raise():
    rng = np.random.default_rng(0)
    lut = rng.standard_normal((2, 4, 16)).astype(np.float32)
    codes = rng.integers(0, 16, (10, 4)).astype(np.uint8)
    offsets, ids = np.array([0, 4, 10]), np.arange(10)
    ok = np.array([[0, 1], [1, -1]])
    with pytest.raises(ValueError, match="probes"):
        ivf_topk(lut, codes, offsets, ids, np.array([[0, 2], [1, 0]]), 3)
    with pytest.raises(ValueError, match="rows"):
        ivf_topk(lut, codes, offsets, ids, ok[:1], 3)
    with pytest.raises(ValueError, match="list_offsets"):
        ivf_topk(lut, codes, np.array([0, 4, 9]), ids, ok, 3)
    with pytest.raises(ValueError, match="list_ids"):
        ivf_topk(lut, codes, offsets, np.arange(10) + 1, ok, 3)
    with pytest.raises(RuntimeError, match="no Triton path"):
        ivf_topk(lut, codes, offsets, ids, ok, 3, backend="triton")
    with pytest.raises(ValueError, match="backend"):
        ivf_topk(lut, codes, offsets, ids, ok, 3, backend="gpu")
    with pytest.raises(ValueError, match="codes must have shape"):  # check=False still checks shapes
        ivf_topk(lut, codes[:, :3], offsets, ids, ok, 3, check=False)
    D, I = ivf_topk(lut, codes, offsets, ids, ok, 3, check=False)
    D_ref, I_ref = ivf_topk(lut, codes, offsets, ids, ok, 3, backend="reference")
    np.testing.assert_array_equal(I, I_ref)
