"""Inverted-list ADC scan with top-k: each query scores only the documents of its probed lists.

    D, I = ivf_topk(lut, codes, list_offsets, list_ids, probes, k, metric="ip")

lut (nq, M, K) float32 (as `build_lut` makes it); codes (N, M) uint8; the lists as CSR:
list_ids (N',) int64 global ids grouped by list, list l = list_ids[list_offsets[l]:list_offsets[l+1]];
probes (nq, w) int64: the lists each query scans, -1 for none. Returns D (nq, k) float32 and
I (nq, k) int64, best first (largest inner product / smallest L2 distance), ties by smaller id,
-1 ids and -FLT_MAX / +FLT_MAX scores when fewer than k documents were scanned. A document in two
probed lists is counted once per list it is in (the tree and IVF lists hold each document once).

Loop form (the reference):
    for q: docs = concatenation of the probed lists; s = sum_m lut[q, m, codes[docs, m]];
           the k best of (s, docs)

Paths: "reference" (NumPy), "cpu" (numba, one query per parallel iteration: its LUT rows stay
in cache, the scan, the heap and the final order are fused, no per-list Python work; the sum
runs over m in order in float32, as `adc_topk`'s CPU path, so scores are bitwise equal to it).
There is no Triton path: "auto" is "cpu", and "triton" raises.

Why a kernel: `TreeIndex.search` used to call `adc_scores` once per reached list over the queries
that reached it (a LUT transpose per list and call, a finite-check per call) and merged per query
in Python. 300 SciFact test queries, 64 leaves, M = 96, 2 threads, one run: beam 3 / 6 / 12 took
80 / 169 / 304 ms that way and 50 / 54 / 65 ms with this kernel (faiss IndexIVFPQ at the same
nprobe 10-15 ms); most of what is left is the LUT GEMM and the routing, not the scan.
`python bench/tree_speed.py` (bench/results/tree_speed.md) keeps the comparison: 2.2-2.7x the
time of faiss IndexIVFPQ at beam = nprobe = 3 / 6 / 12.
"""
from __future__ import annotations

import numba as nb
import numpy as np

from .adc import _heap_replace_root, _merge_heaps, _worse, adc_scores_reference
from .arrays import FLOAT_MAX, check_codes, check_float_matrix, check_k, check_metric
from .arrays import to_numpy_codes, to_numpy_f32


def ivf_topk_reference(lut, codes, list_offsets, list_ids, probes, k: int, metric: str = "ip"):
    """NumPy oracle (see the module docstring)."""
    nq = lut.shape[0]
    D = np.full((nq, k), -FLOAT_MAX if metric == "ip" else FLOAT_MAX, np.float32)
    I = np.full((nq, k), -1, np.int64)
    for q in range(nq):
        docs = [list_ids[list_offsets[l] : list_offsets[l + 1]] for l in probes[q] if l >= 0]
        docs = np.concatenate(docs) if docs else np.empty(0, np.int64)
        if len(docs) == 0:
            continue
        s = adc_scores_reference(lut[q : q + 1], codes[docs])  # (1, n)
        order = np.lexsort((docs, -s[0] if metric == "ip" else s[0]))[:k]  # best, then smaller id
        D[q, : len(order)] = s[0, order]
        I[q, : len(order)] = docs[order]
    return D, I


# no fastmath: reassociation would let LLVM split the sum over m, and the scores would no longer
# be bitwise those of adc_topk's CPU path (the tree's full-beam search must equal PQIndex.search)
@nb.njit(parallel=True, cache=True)
def _ivf_topk_cpu(lut, codes, offsets, ids, probes, heap_v, heap_i):
    """lut (nq, M, K) f32, higher = better; heaps (nq, k) filled in place."""
    nq, w = probes.shape
    M = codes.shape[1]
    for q in nb.prange(nq):
        hv = heap_v[q]
        hi = heap_i[q]
        lq = lut[q]
        for j in range(w):
            l = probes[q, j]
            if l < 0:
                continue
            for t in range(offsets[l], offsets[l + 1]):
                i = ids[t]
                acc = np.float32(0.0)
                for m in range(M):
                    acc += lq[m, codes[i, m]]
                if _worse(hv[0], hi[0], acc, i):
                    _heap_replace_root(hv, hi, acc, i)


def _check_lists(list_offsets, list_ids, probes, N):
    offsets = np.asarray(list_offsets)
    ids = np.asarray(list_ids)
    probes = np.asarray(probes)
    if offsets.ndim != 1 or len(offsets) < 1 or not np.issubdtype(offsets.dtype, np.integer):
        raise ValueError(f"list_offsets must be a 1-D integer array (n_lists + 1,), got {offsets.shape} {offsets.dtype}")
    if offsets[0] != 0 or (np.diff(offsets) < 0).any() or offsets[-1] != len(ids):
        raise ValueError("list_offsets must start at 0, never decrease and end at len(list_ids)")
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer) or (len(ids) and (ids.min() < 0 or ids.max() >= N)):
        raise ValueError(f"list_ids must be a 1-D integer array of ids in [0, {N})")
    if probes.ndim != 2 or not np.issubdtype(probes.dtype, np.integer):
        raise ValueError(f"probes must be a 2-D integer array (nq, w), got {probes.shape} {probes.dtype}")
    if probes.size and (probes.max() >= len(offsets) - 1 or probes.min() < -1):
        raise ValueError(f"probes must hold list numbers in [0, {len(offsets) - 1}) or -1")
    return offsets.astype(np.int64), ids.astype(np.int64), probes.astype(np.int64)


def ivf_topk(lut, codes, list_offsets, list_ids, probes, k: int, metric: str = "ip", backend: str = "auto",
             check: bool = True):
    """k best documents of each query's probed lists by ADC (see the module docstring).

    NumPy in, NumPy out (torch tensors are read through NumPy on the CPU). check=False skips the
    full passes over lut (finite values) and codes (values < K), for callers that built them."""
    if check:
        check_float_matrix("lut", lut, ndim=3)
    elif lut.ndim != 3:
        raise ValueError(f"lut must have 3 dimensions, got shape {tuple(lut.shape)}")
    k = check_k(k)
    check_metric(metric)
    if backend not in ("auto", "cpu", "reference", "triton"):
        raise ValueError(f"backend must be one of ('auto', 'triton', 'cpu', 'reference'), got {backend!r}")
    if backend == "triton":
        raise RuntimeError("ivf_topk has no Triton path yet: use backend='cpu' (or 'auto')")
    lut = to_numpy_f32(lut)
    nq, M, K = lut.shape
    if check:
        check_codes(codes, M, K)
    elif codes.ndim != 2 or codes.shape[1] != M:  # shapes always: the kernel does not bound-check
        raise ValueError(f"codes must have shape (N, {M}), got {tuple(codes.shape)}")
    codes = to_numpy_codes(codes)
    offsets, ids, probes = _check_lists(list_offsets, list_ids, probes, codes.shape[0])
    if probes.shape[0] != nq:
        raise ValueError(f"probes has {probes.shape[0]} rows but lut has {nq} queries")
    if backend == "reference":
        return ivf_topk_reference(lut, codes, offsets, ids, probes, k, metric)
    tile = lut if metric == "ip" else -lut  # maximise always; negation is exact, so D is too
    heap_v = np.full((nq, k), -np.inf, np.float32)
    heap_i = np.full((nq, k), -1, np.int64)
    if nq and len(ids):
        _ivf_topk_cpu(np.ascontiguousarray(tile), codes, offsets, ids, probes, heap_v, heap_i)
    D, I = _merge_heaps(heap_v[None], heap_i[None], k)  # best first, ties by smaller id
    if metric != "ip":
        D = -D
    D[I < 0] = -FLOAT_MAX if metric == "ip" else FLOAT_MAX
    return D, I


__all__ = ["ivf_topk", "ivf_topk_reference"]
