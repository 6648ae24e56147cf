"""Inverted-list ADC search (jpq.kernels.ivf.ivf_search): the CPU and Triton paths (the latter
under TRITON_INTERPRET=1) against the NumPy reference, on random lists with empty ones, -1 probes,
k larger than what is scanned, ties, both metrics, query chunks; the CPU path bitwise equal to
adc_topk(build_lut(...)) when every list is probed (for more than FEW_QUERIES queries at a time; to
float32 rounding for fewer, where adc_topk's few-query scans reassociate their sums)."""
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


def _interpreter_on() -> bool:
    from jpq.kernels.arrays import is_interpreter
    from jpq.kernels.dispatch import triton_importable

    return triton_importable() and is_interpreter()


def needs_interpreter():
    if not _interpreter_on():
        pytest.skip("needs triton under TRITON_INTERPRET=1")


def problem(rng, M, K, ds, N, nq):
    q = rng.standard_normal((nq, M * ds)).astype(np.float32)
    C = rng.standard_normal((M, K, ds)).astype(np.float32)
    codes = rng.integers(0, K, (N, M)).astype(np.uint8)
    return q, C, codes


@pytest.mark.parametrize("metric", ["ip", "l2"])
@pytest.mark.parametrize("M,K,ds,N,n_lists,nq,w,k", [(8, 16, 3, 300, 10, 7, 3, 5), (3, 7, 1, 50, 20, 4, 5, 100),
                                                      (16, 256, 4, 2000, 64, 33, 6, 20), (1, 256, 5, 1, 3, 2, 3, 1)])
@pytest.mark.parametrize("backend", ["cpu", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_paths_match_reference(backend, metric, M, K, ds, N, n_lists, nq, w, k):
    if backend == "triton":
        needs_interpreter()
    rng = np.random.default_rng(M + N + nq)
    q, C, codes = problem(rng, M, K, ds, N, nq)
    offsets, ids, leaf = lists(rng, N, n_lists)
    probes = np.stack([rng.choice(n_lists, w, replace=False) for _ in range(nq)]).astype(np.int64)
    probes[0, -1] = -1  # fewer lists for some queries
    probes[-1, :] = -1  # a query that scans nothing
    args = (q, C, codes[ids], offsets, ids, probes, k, metric)
    D_ref, I_ref = ivf_search(*args, backend="reference")
    D, I = ivf_search(*args, backend=backend)
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
        D_ref, I_ref = ivf_search(q, C, codes[ids], offsets, ids, probes, k, metric, backend="reference")
        for backend in ("cpu", "triton"):
            if backend == "triton" and not _interpreter_on():
                continue
            D, I = ivf_search(q, C, codes[ids], offsets, ids, probes, k, metric, backend=backend)
            np.testing.assert_array_equal(I, I_ref)
            np.testing.assert_allclose(D, D_ref, rtol=1e-6, atol=1e-5)



@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_all_lists_probed_equals_adc_topk_bitwise(metric):
    from jpq.kernels.adc import FEW_QUERIES

    nq = 20
    assert nq > FEW_QUERIES  # adc_topk's multi-query kernel: the sum in order, as ivf_search's
    rng = np.random.default_rng(3)
    q, C, codes = problem(rng, 12, 64, 4, 700, nq)
    offsets, ids, _ = lists(rng, 700, 8)
    probes = np.tile(np.arange(8), (nq, 1))
    D, I = ivf_search(q, C, codes[ids], offsets, ids, probes, 15, metric)
    D_ref, I_ref = adc_topk(build_lut(q, C, metric), codes, 15, metric=metric, backend="cpu")
    np.testing.assert_array_equal(I, I_ref)
    np.testing.assert_array_equal(D, D_ref)
    # torch in (lists as NumPy or torch), torch out on q's device; same results
    Dt, It = ivf_search(torch.from_numpy(q), torch.from_numpy(C), torch.from_numpy(codes[ids]), offsets,
                        torch.from_numpy(ids), torch.from_numpy(probes), 15, metric, backend="cpu")
    assert isinstance(Dt, torch.Tensor) and isinstance(It, torch.Tensor) and It.dtype == torch.int64
    np.testing.assert_array_equal(It.numpy(), I_ref)
    np.testing.assert_array_equal(Dt.numpy(), D_ref)
    # 1 and 5 queries: adc_topk's few-query scans reassociate their sums -> same ids, scores to rounding
    for i, n in ((0, 1), (1, 1), (3, 5)):
        D1, I1 = ivf_search(q[i : i + n], C, codes[ids], offsets, ids, probes[:n], 15, metric)
        D1_ref, I1_ref = adc_topk(build_lut(q[i : i + n], C, metric), codes, 15, metric=metric, backend="cpu")
        np.testing.assert_array_equal(I1, I1_ref)
        np.testing.assert_allclose(D1, D1_ref, rtol=1e-5, atol=1e-5 * np.abs(D1_ref).max())


@pytest.mark.interpreter
@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_triton_query_chunks_and_torch_in_out(monkeypatch, metric):
    """The Triton path pads each query's candidates to the longest row of its chunk of queries:
    shrink the chunks so 20 queries with rows of unequal length take several, one query alone
    when its row is longer than a chunk; torch in, torch out."""
    needs_interpreter()
    from jpq.kernels import ivf_triton

    monkeypatch.setattr(ivf_triton, "SCORES_PER_CHUNK", 120)
    rng = np.random.default_rng(11)
    q, C, codes = problem(rng, 6, 16, 2, 400, 20)
    offsets, ids, leaf = lists(rng, 400, 12)
    probes = np.full((20, 6), -1, np.int64)
    for i in range(20):
        w = rng.integers(0, 7)
        probes[i, :w] = rng.choice(12, w, replace=False)
    args = (codes[ids], offsets, ids, probes, 25, metric)
    D_ref, I_ref = ivf_search(q, C, *args, backend="reference")
    D, I = ivf_search(torch.from_numpy(q), torch.from_numpy(C), *args, backend="triton")
    assert isinstance(D, torch.Tensor) and D.dtype == torch.float32 and I.dtype == torch.int64
    lut = build_lut_reference(q, C, metric)
    scores = adc_scores_reference(lut, codes)
    for qi in range(20):
        scanned = np.isin(leaf, probes[qi][probes[qi] >= 0])
        scores[qi, ~scanned] = -np.inf if metric == "ip" else np.inf
    assert_topk_matches(D.numpy(), I.numpy(), D_ref, I_ref, scores, atol=4e-6 * 6 * np.abs(lut).max(),
                        metric=metric)
    assert ivf_triton._query_chunks([100, 30, 30, 200, 0, 10]) == [(0, 1), (1, 3), (3, 4), (4, 6)]


def test_candidate_rows_lay_out_probed_lists_in_order():
    from jpq.kernels.ivf_triton import candidate_rows, probed_lengths

    offsets = torch.tensor([0, 3, 3, 7, 9])  # list 1 is empty
    probes = torch.tensor([[2, 0, -1], [1, -1, -1], [3, 2, 0]])
    rows, valid = candidate_rows(*probed_lengths(offsets, probes))
    assert rows.shape == (3, 9)
    assert rows[0][valid[0]].tolist() == [3, 4, 5, 6, 0, 1, 2]
    assert rows[1][valid[1]].tolist() == []
    assert rows[2][valid[2]].tolist() == [7, 8, 3, 4, 5, 6, 0, 1, 2]
    assert valid.sum(1).tolist() == [7, 0, 9]


def test_bad_inputs_raise(monkeypatch):
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
    with monkeypatch.context() as mp:  # triton named but unable to run: an error, not a fallback
        mp.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(RuntimeError, match="triton"):
            ivf_search(q, C, codes, offsets, ids, ok, 3, backend="triton")
    with pytest.raises(ValueError, match="backend"):
        ivf_search(q, C, codes, offsets, ids, ok, 3, backend="gpu")
    with pytest.raises(ValueError, match="list_codes has 3 sub-quantizers"):  # check=False still checks shapes
        ivf_search(q, C, codes[:, :3], offsets, ids, ok, 3, check=False)
    with pytest.raises(ValueError, match="D = M"):
        ivf_search(q[:, :6], C, codes, offsets, ids, ok, 3, check=False)
    D, I = ivf_search(q, C, codes, offsets, ids, ok, 3, check=False)
    D_ref, I_ref = ivf_search(q, C, codes, offsets, ids, ok, 3, backend="reference")
    np.testing.assert_array_equal(I, I_ref)


@pytest.mark.parametrize("backend", ["cpu", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_int32_lists_and_non_contiguous_inputs(backend):
    """Lists as int32 (NumPy or torch), a strided q, Fortran-ordered codes and a duplicated probe:
    the same results as the reference on the clean inputs (a list probed twice is scanned twice)."""
    if backend == "triton":
        needs_interpreter()
    rng = np.random.default_rng(21)
    q, C, codes = problem(rng, 6, 32, 3, 500, 10)
    offsets, ids, _ = lists(rng, 500, 9)
    probes = np.stack([rng.choice(9, 3, replace=False) for _ in range(10)]).astype(np.int64)
    probes[2, 1] = probes[2, 0]  # a duplicate probe
    D_ref, I_ref = ivf_search(q, C, codes[ids], offsets, ids, probes, 12, backend="reference")
    assert (np.bincount(I_ref[2][I_ref[2] >= 0]) > 1).any()  # the duplicated list's documents twice
    wide = np.zeros((10, 2 * q.shape[1]), np.float32)
    wide[:, ::2] = q
    q_strided = wide[:, ::2]  # same values, not contiguous
    codes_f = np.asfortranarray(codes[ids])
    for lists_kind in ("numpy", "torch"):
        as_kind = (lambda a: torch.from_numpy(a)) if lists_kind == "torch" else (lambda a: a)
        D, I = ivf_search(q_strided, C, codes_f, as_kind(offsets.astype(np.int32)), as_kind(ids.astype(np.int32)),
                          as_kind(probes.astype(np.int32)), 12, backend=backend)
        np.testing.assert_array_equal(I, I_ref)
        np.testing.assert_allclose(D, D_ref, rtol=1e-5, atol=1e-5 * np.abs(D_ref).max())
