"""Asymmetric distance computation (ADC) over PQ codes, with top-k.

    lut[q, m, k]  = <query[q, m*ds:(m+1)*ds], centroids[m, k]>          (metric "ip")
                  = || query[q, m*ds:(m+1)*ds] - centroids[m, k] ||^2   (metric "l2")
    score[q, n]   = sum_m lut[q, m, codes[n, m]]                         (times doc_scale[n],
                                                                         "ip", when given)
    top-k         = the k largest scores per query ("ip") or the k smallest ("l2"),
                    ties broken by the smaller document id; -1 ids past the end.

`doc_scale` (optional, `adc_topk`): one positive factor per document, applied to its summed
score before ranking. `jpq.PQIndex(unit_norm=True)` passes 1 / ||x_hat|| (the norm of each
document's reconstruction): the scores are then those of the reconstructions rescaled to unit norm.

Paths:
- reference (NumPy, float64): `build_lut_reference`, `adc_scores_reference`, `adc_topk_reference`.
- CPU fast path (numba): a document block's scores for a tile of queries are accumulated as
  `block[i, :] += lut[m, codes[i, m], :]` with the LUT laid out (M, K, Q), so every gathered row
  is Q contiguous floats (one SIMD add per 16 queries); top-k is fused: every thread keeps a
  k-heap per query over its share of documents, so memory is the score block plus the heaps,
  whatever N is. Up to FEW_QUERIES queries, scans parallel over documents keep each document's
  sums in registers instead, four queries per scan (one code byte addresses their four adjacent
  table entries) and one per query left over.
  Figures against faiss IndexPQ.search: bench/compare_faiss.py and bench/few_queries.py.
- Triton (CUDA; the CPU interpreter in tests): `adc_scores` is a gather kernel over (query,
  128-document) tiles. `adc_topk` fuses a first selection into it: each tile turns its scores
  into int64 keys (`order_keys`: score bits in the high half, the inverted id in the low half)
  and keeps its best min(k, 128) (tl.sort); torch.topk of the kept keys, merged across document
  chunks, gives the top-k. On keys, ties go to the smaller id exactly, as on the CPU, whichever
  tied entries torch.topk would have kept at the k-th place.
"""
from __future__ import annotations

import numba as nb
import numpy as np
import torch

from .arrays import (
    FASTMATH,
    FLOAT_MAX,
    array_kind,
    check_codes,
    check_float_matrix,
    check_k,
    check_metric,
    to_numpy_codes,
    to_numpy_f32,
)
from .assign import check_centroids, check_vectors_for
from .dispatch import resolve_backend


# --------------------------------------------------------------------------- reference
def build_lut_reference(q: np.ndarray, centroids: np.ndarray, metric: str = "ip") -> np.ndarray:
    """q: shape=(nq, D); centroids: shape=(M, K, ds) -> lut shape=(nq, M, K) float32.

    Loop form: for q, m, k: lut[q, m, k] = sum_j q[q, m*ds+j] * C[m, k, j]           ("ip")
                                          = sum_j (q[q, m*ds+j] - C[m, k, j]) ** 2   ("l2")
    """
    C = np.asarray(centroids, dtype=np.float64)
    M, K, ds = C.shape
    qs = np.asarray(q, dtype=np.float64).reshape(-1, M, 1, ds)
    if metric == "ip":
        lut = (qs * C[None]).sum(-1)
    else:
        lut = ((qs - C[None]) ** 2).sum(-1)
    return lut.astype(np.float32)


def adc_scores_reference(lut: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """lut: shape=(nq, M, K); codes: shape=(N, M) -> scores shape=(nq, N) float32.

    Loop form: for q, n: scores[q, n] = sum_m lut[q, m, codes[n, m]]
    """
    lut = np.asarray(lut, dtype=np.float64)
    codes = np.asarray(codes, dtype=np.int64)
    M = lut.shape[1]
    return lut[:, np.arange(M)[None, :], codes].sum(-1).astype(np.float32)


def topk_from_scores(scores: np.ndarray, k: int, metric: str):
    """Exact top-k of a (nq, N) score matrix: best first, ties by smaller id, -1 padding."""
    nq, N = scores.shape
    D = np.full((nq, k), -FLOAT_MAX if metric == "ip" else FLOAT_MAX, dtype=np.float32)
    I = np.full((nq, k), -1, dtype=np.int64)
    take = min(k, N)
    ids = np.arange(N)
    for qi in range(nq):
        key = -scores[qi] if metric == "ip" else scores[qi]
        order = np.lexsort((ids, key))[:take]  # sort by key, then by id
        D[qi, :take] = scores[qi, order]
        I[qi, :take] = order
    return D, I


def adc_topk_reference(lut: np.ndarray, codes: np.ndarray, k: int, metric: str = "ip",
                       doc_scale: np.ndarray | None = None):
    """Loop form: scores as `adc_scores_reference` (float64 sums), times doc_scale[n] when given,
    then `topk_from_scores`."""
    if doc_scale is None:
        return topk_from_scores(adc_scores_reference(lut, codes), k, metric)
    lut = np.asarray(lut, dtype=np.float64)
    codes = np.asarray(codes, dtype=np.int64)
    sums = lut[:, np.arange(lut.shape[1])[None, :], codes].sum(-1)
    return topk_from_scores((sums * np.asarray(doc_scale, np.float64)[None]).astype(np.float32), k, metric)


# --------------------------------------------------------------------------- CPU fast path
DOCS_PER_BLOCK = 256  # score block (256, Q) floats stays in L1/L2 per thread
QUERIES_PER_TILE = 64  # LUT tile (M, K, 64) = 6.3 MB at M=96; see bench/compare_faiss.py
# The multi-query kernels run SIMD over the queries of a tile: a tile width that is not a multiple
# of 4 leaves a scalar remainder loop per gathered row and costs more than the next multiple of 4
# (N=200k, M=96, 2 threads, top-k: 5 queries 30.3 ms, 7 queries 37.0, 8 queries 25.1; 11: 39.7,
# 12: 27.4; 15: 46.0, 16: 31.4). So a tile is padded with zero tables to a multiple of QUERY_LANES
# (the pad lanes are scored, never ranked or returned).
QUERY_LANES = 4
# Up to this many queries, scans parallel over documents with the sums in registers (four
# queries per scan, then one per query left: `_few_query_groups`) beat the multi-query kernel,
# whose rows of 4-12 lanes are read and written back once per sub-quantizer. adc_topk, k = 10,
# 2 threads, time against the multi-query kernel's (2026-12-04; `python bench/few_queries.py`
# measures it again, and against faiss): N=200k, M=96: 1 / 4 / 8 / 12 / 16 queries 0.20 / 0.45 / 0.79 /
# 0.96 / 1.05x; N=50k, M=96: 0.21 / 0.55 / 0.82 / 1.03 / 1.12x; N=200k, M=16: 11 queries 0.99x,
# 13: 0.98x, 14: 1.09x.
FEW_QUERIES = 12
# Row length of the few-query kernels' flat tables: the most codes a uint8 holds (K <= 256 is
# padded to it, `_flat_tables`), a constant so that m * LUT_ROW + code compiles to a shift.
LUT_ROW = 256


@nb.njit(cache=True, inline="always")
def _worse(v_a, i_a, v_b, i_b):
    """Heap order: a ranks below b (lower score, or equal score and larger id)."""
    return v_a < v_b or (v_a == v_b and i_a > i_b)


@nb.njit(cache=True)
def _heap_replace_root(hv, hi, v, i):
    """Replace the worst entry (root of the min-heap hv/hi) by (v, i) and restore the heap."""
    k = hv.shape[0]
    pos = 0
    while True:
        child = 2 * pos + 1
        if child >= k:
            break
        if child + 1 < k and _worse(hv[child + 1], hi[child + 1], hv[child], hi[child]):
            child += 1
        if _worse(hv[child], hi[child], v, i):
            hv[pos] = hv[child]
            hi[pos] = hi[child]
            pos = child
        else:
            break
    hv[pos] = v
    hi[pos] = i


@nb.njit(fastmath=FASTMATH, cache=True, inline="always")
def _score_block(codes, lut_mkq, start, rows, block):
    """block[i, :] = sum_m lut_mkq[m, codes[start + i, m], :] for i < rows (Q floats per gather)."""
    M = codes.shape[1]
    Q = lut_mkq.shape[2]
    block[:rows] = 0.0
    for m in range(M):
        lut_m = lut_mkq[m]
        for i in range(rows):
            lut_row = lut_m[codes[start + i, m]]
            acc = block[i]
            for q in range(Q):
                acc[q] += lut_row[q]


@nb.njit(fastmath=FASTMATH, cache=True, inline="always")
def _sum_one(codes, lut_flat, i):
    """sum_m lut_flat[m * 256 + codes[i, m]]: document i's score for one query's table, flat with
    rows of LUT_ROW (`_flat_tables`). A constant row length lets the loop vectorise: on one thread
    (N = 200k, M = 96) 4.7 ms per query, against 7.9 with the row length K an argument and 6.3 for
    the 2-D lut[m, code]."""
    acc = np.float32(0.0)
    for m in range(codes.shape[1]):
        acc += lut_flat[m * LUT_ROW + codes[i, m]]
    return acc


@nb.njit(fastmath=FASTMATH, cache=True, inline="always")
def _sum_four(codes, lut_flat4, i):
    """Document i's scores for four queries at once: lut_flat4 is their (M, LUT_ROW, 4) tables,
    flat (`_flat_tables`), so one code byte addresses four adjacent floats (one SIMD load and add)."""
    a0 = np.float32(0.0)
    a1 = np.float32(0.0)
    a2 = np.float32(0.0)
    a3 = np.float32(0.0)
    for m in range(codes.shape[1]):
        o = m * (4 * LUT_ROW) + 4 * codes[i, m]  # not 4 * (m * LUT_ROW + code): 1.3x slower
        a0 += lut_flat4[o]
        a1 += lut_flat4[o + 1]
        a2 += lut_flat4[o + 2]
        a3 += lut_flat4[o + 3]
    return a0, a1, a2, a3


@nb.njit(parallel=True, fastmath=FASTMATH, cache=True)
def _topk_many_queries(codes, lut_mkq, doc_scale, heap_v, heap_i):
    """codes (N, M) u8; lut_mkq (M, K, W) f32 (higher = better), W >= Q lanes (the lanes past Q
    padding, scored but not ranked); doc_scale (N,) f32, or empty for none; heap_v/heap_i (P, Q, k)."""
    scaled = doc_scale.shape[0] > 0
    n, M = codes.shape
    W = lut_mkq.shape[2]
    Q = heap_v.shape[1]
    P = heap_v.shape[0]
    for p in nb.prange(P):
        start, stop = _partition(n, P, p)
        block = np.empty((DOCS_PER_BLOCK, W), np.float32)
        for s in range(start, stop, DOCS_PER_BLOCK):
            rows = min(stop, s + DOCS_PER_BLOCK) - s
            _score_block(codes, lut_mkq, s, rows, block)
            if scaled:
                for i in range(rows):
                    f = doc_scale[s + i]
                    for q in range(W):
                        block[i, q] *= f
            for q in range(Q):
                hv = heap_v[p, q]
                hi = heap_i[p, q]
                for i in range(rows):
                    v = block[i, q]
                    _offer(hv, hi, v, s + i)


@nb.njit(cache=True, inline="always")
def _partition(n, P, p):
    """Documents [start, stop) of thread share p of P (each top-k kernel's per-thread heaps)."""
    share = (n + P - 1) // P
    return min(n, p * share), min(n, (p + 1) * share)


@nb.njit(cache=True, inline="always")
def _offer(hv, hi, v, i):
    """Offer (v, i) to the k-heap hv/hi: it enters when it ranks above the worst kept entry."""
    if _worse(hv[0], hi[0], v, i):
        _heap_replace_root(hv, hi, v, i)


@nb.njit(parallel=True, fastmath=FASTMATH, cache=True)
def _topk_one_query(codes, lut_flat, doc_scale, heap_v, heap_i):
    """codes (N, M) u8; lut_flat (M * LUT_ROW,) f32 (`_flat_tables`, higher = better);
    doc_scale (N,) f32, or empty for none; heap_v/heap_i (P, k)."""
    n = codes.shape[0]
    scaled = doc_scale.shape[0] > 0
    P = heap_v.shape[0]
    for p in nb.prange(P):
        hv = heap_v[p]
        hi = heap_i[p]
        start, stop = _partition(n, P, p)
        block = np.empty(DOCS_PER_BLOCK, np.float32)
        for s in range(start, stop, DOCS_PER_BLOCK):
            rows = min(stop, s + DOCS_PER_BLOCK) - s
            for r in range(rows):
                block[r] = _sum_one(codes, lut_flat, s + r)
            for r in range(rows):
                _offer(hv, hi, block[r] * doc_scale[s + r] if scaled else block[r], s + r)


@nb.njit(parallel=True, fastmath=FASTMATH, cache=True)
def _topk_four_queries(codes, lut_flat4, doc_scale, heap_v, heap_i):
    """codes (N, M) u8; lut_flat4 (M * LUT_ROW * 4,) f32, four queries' tables (`_flat_tables`,
    higher = better); doc_scale (N,) f32, or empty for none; heap_v/heap_i (P, 4, k)."""
    n = codes.shape[0]
    scaled = doc_scale.shape[0] > 0
    P = heap_v.shape[0]
    for p in nb.prange(P):
        hv = heap_v[p]
        hi = heap_i[p]
        start, stop = _partition(n, P, p)
        for i in range(start, stop):
            a0, a1, a2, a3 = _sum_four(codes, lut_flat4, i)
            if scaled:
                f = doc_scale[i]
                a0 *= f
                a1 *= f
                a2 *= f
                a3 *= f
            _offer(hv[0], hi[0], a0, i)
            _offer(hv[1], hi[1], a1, i)
            _offer(hv[2], hi[2], a2, i)
            _offer(hv[3], hi[3], a3, i)


@nb.njit(parallel=True, fastmath=FASTMATH, cache=True)
def _scores_many_queries(codes, lut_mkq, out):
    """codes (N, M) u8; lut_mkq (M, K, W), W >= Q lanes (those past Q padding); out (Q, N) f32."""
    n, M = codes.shape
    W = lut_mkq.shape[2]
    Q = out.shape[0]
    nblocks = (n + DOCS_PER_BLOCK - 1) // DOCS_PER_BLOCK
    for b in nb.prange(nblocks):
        s = b * DOCS_PER_BLOCK
        rows = min(n, s + DOCS_PER_BLOCK) - s
        block = np.empty((rows, W), np.float32)
        _score_block(codes, lut_mkq, s, rows, block)
        for i in range(rows):
            for q in range(Q):
                out[q, s + i] = block[i, q]


@nb.njit(parallel=True, fastmath=FASTMATH, cache=True)
def _scores_one_query(codes, lut_flat, out):
    """codes (N, M) u8; lut_flat (M * LUT_ROW,) f32 (`_flat_tables`); out (N,) f32: one scan,
    parallel over documents."""
    for i in nb.prange(codes.shape[0]):
        out[i] = _sum_one(codes, lut_flat, i)


@nb.njit(parallel=True, fastmath=FASTMATH, cache=True)
def _scores_four_queries(codes, lut_flat4, out):
    """codes (N, M) u8; lut_flat4 (M * LUT_ROW * 4,) f32 (`_flat_tables`); out (4, N) f32."""
    for i in nb.prange(codes.shape[0]):
        a0, a1, a2, a3 = _sum_four(codes, lut_flat4, i)
        out[0, i] = a0
        out[1, i] = a1
        out[2, i] = a2
        out[3, i] = a3


# No fastmath in the LUT: no reassociation, no fused multiply-add, so every entry is the same
# IEEE sum (j = 0, 1, ... in order) wherever the helper is inlined: `ivf_search` builds each
# query's table inside its scan and its scores stay bitwise those of `adc_topk` on `build_lut`
# (its multi-query kernel; the few-query scans reassociate their sums for speed: 1-12 queries).
@nb.njit(cache=True, inline="always")
def _lut_into(qrow, Ct, l2, out):
    """out (M, K) = the look-up table of one query qrow (M * ds,) for Ct (M, ds, K)."""
    M, ds, K = Ct.shape
    for m in range(M):
        o = out[m]
        c = Ct[m]
        base = m * ds
        for k in range(K):
            o[k] = np.float32(0.0)
        for j in range(ds):
            x = qrow[base + j]
            cj = c[j]
            if l2:
                for k in range(K):
                    diff = x - cj[k]
                    o[k] += diff * diff
            else:
                for k in range(K):
                    o[k] += x * cj[k]


@nb.njit(parallel=True, cache=True)
def _build_lut_cpu(q, Ct, l2, out):
    """q (nq, D) f32, Ct (M, ds, K) f32 -> out (nq, M, K), parallel over queries."""
    for i in nb.prange(q.shape[0]):
        _lut_into(q[i], Ct, l2, out[i])


def centroids_by_dim(C: np.ndarray) -> np.ndarray:
    """(M, K, ds) centroids -> the (M, ds, K) layout `_lut_into` reads (K contiguous: SIMD over K)."""
    return np.ascontiguousarray(C.transpose(0, 2, 1))


def _build_lut_numba(q: np.ndarray, C: np.ndarray, metric: str) -> np.ndarray:
    M, K, ds = C.shape
    out = np.empty((q.shape[0], M, K), np.float32)
    if q.shape[0]:
        _build_lut_cpu(q, centroids_by_dim(C), metric == "l2", out)
    return out


def _lane_tile(tile: np.ndarray) -> np.ndarray:
    """(Q, M, K) tables -> the (M, K, W) layout of the multi-query kernels, W = Q rounded up to
    a multiple of QUERY_LANES (zero tables in the pad lanes)."""
    Q, M, K = tile.shape
    W = -(-Q // QUERY_LANES) * QUERY_LANES
    out = np.zeros((M, K, W), np.float32)
    out[:, :, :Q] = tile.transpose(1, 2, 0)
    return out


def _flat_tables(tables: np.ndarray) -> np.ndarray:
    """(w, M, K) tables of w queries -> (M * LUT_ROW * w,) flat, query fastest, each row padded
    with zeros from K to LUT_ROW (never read: codes are < K): `_sum_one`'s (w = 1) and
    `_sum_four`'s (w = 4) layout. No copy for one contiguous table with K = LUT_ROW."""
    w, M, K = tables.shape
    if K == LUT_ROW:
        return np.ascontiguousarray(tables.transpose(1, 2, 0)).ravel()
    out = np.zeros((M, LUT_ROW, w), np.float32)
    out[:, :K, :] = tables.transpose(1, 2, 0)
    return out.ravel()


def _few_query_groups(nq: int) -> list[tuple[int, int]]:
    """(first query, width) of the scans for a tile of nq <= FEW_QUERIES queries: four-query scans,
    then one scan for each of the 1-3 left (a four-lane scan costs 4.4 ms per query against 4.7 for
    a one-lane scan, on one thread at N = 200k, M = 96; padding 3 queries to 4 lanes would cost more
    than 3 one-lane scans)."""
    fours = nq // 4 * 4
    return [(j, 4) for j in range(0, fours, 4)] + [(j, 1) for j in range(fours, nq)]


def _merge_heaps(heap_v: np.ndarray, heap_i: np.ndarray, k: int):
    """(P, Q, k) per-thread heaps -> (Q, k) best-first, ties by smaller id."""
    P, Q, _ = heap_v.shape
    v = heap_v.transpose(1, 0, 2).reshape(Q, P * k)
    i = heap_i.transpose(1, 0, 2).reshape(Q, P * k)
    # unused slots hold (-inf, -1): give them the largest id so they sort last among -inf
    i_key = np.where(i < 0, np.iinfo(np.int64).max, i)
    order = np.lexsort((i_key, -v), axis=-1)[:, :k]
    return np.take_along_axis(v, order, 1), np.take_along_axis(i, order, 1)


def _num_partitions(n: int) -> int:
    return max(1, min(nb.get_num_threads(), n))


def _adc_topk_cpu(lut: np.ndarray, codes: np.ndarray, k: int, metric: str, doc_scale: np.ndarray | None = None):
    """lut (nq, M, K) f32, codes (N, M) u8, doc_scale (N,) f32 or None -> D (nq, k) f32, I (nq, k) i64."""
    scale = np.empty(0, np.float32) if doc_scale is None else doc_scale
    nq, M, K = lut.shape
    N = codes.shape[0]
    # maximise always: for L2 the smallest distance is the largest negated distance
    sign = np.float32(1.0 if metric == "ip" else -1.0)  # applied to the tile and back to D
    D = np.empty((nq, k), np.float32)
    I = np.empty((nq, k), np.int64)
    P = _num_partitions(N)
    for q0 in range(0, nq, QUERIES_PER_TILE):
        q1 = min(nq, q0 + QUERIES_PER_TILE)
        tile = lut[q0:q1] if metric == "ip" else -lut[q0:q1]
        heap_v = np.full((P, q1 - q0, k), -np.inf, np.float32)
        heap_i = np.full((P, q1 - q0, k), -1, np.int64)
        if N:
            if q1 - q0 <= FEW_QUERIES:
                for j, width in _few_query_groups(q1 - q0):
                    if width == 4:
                        _topk_four_queries(codes, _flat_tables(tile[j:j + 4]), scale,
                                           heap_v[:, j:j + 4], heap_i[:, j:j + 4])
                    else:
                        _topk_one_query(codes, _flat_tables(tile[j:j + 1]), scale, heap_v[:, j], heap_i[:, j])
            else:
                _topk_many_queries(codes, _lane_tile(tile), scale, heap_v, heap_i)
        v, i = _merge_heaps(heap_v, heap_i, k)
        D[q0:q1] = sign * v
        I[q0:q1] = i
    missing = I < 0
    D[missing] = -FLOAT_MAX if metric == "ip" else FLOAT_MAX
    return D, I


def _adc_scores_cpu(lut: np.ndarray, codes: np.ndarray) -> np.ndarray:
    nq, M, K = lut.shape
    out = np.empty((nq, codes.shape[0]), np.float32)
    if codes.shape[0] == 0:
        return out
    for q0 in range(0, nq, QUERIES_PER_TILE):
        q1 = min(nq, q0 + QUERIES_PER_TILE)
        if q1 - q0 <= FEW_QUERIES:
            for j, width in _few_query_groups(q1 - q0):
                if width == 4:
                    _scores_four_queries(codes, _flat_tables(lut[q0 + j:q0 + j + 4]), out[q0 + j:q0 + j + 4])
                else:
                    _scores_one_query(codes, _flat_tables(lut[q0 + j:q0 + j + 1]), out[q0 + j])
        else:
            _scores_many_queries(codes, _lane_tile(lut[q0:q1]), out[q0:q1])
    return out


def _build_lut_torch(q: torch.Tensor, C: torch.Tensor, metric: str) -> torch.Tensor:
    """Batched GEMM over subspaces: (M, nq, ds) @ (M, ds, K) -> (nq, M, K), float32."""
    M, K, ds = C.shape
    qs = q.reshape(-1, M, ds).transpose(0, 1)  # (M, nq, ds)
    ip = torch.bmm(qs, C.transpose(1, 2))  # (M, nq, K)
    if metric == "l2":
        ip = (qs * qs).sum(-1, keepdim=True) - 2.0 * ip + (C * C).sum(-1).unsqueeze(1)
        ip = ip.clamp_min_(0.0)
    return ip.transpose(0, 1).contiguous()


# --------------------------------------------------------------------------- Triton
# The Triton kernels live in adc_triton.py so that `import jpq` never needs triton installed.
def _adc_scores_triton(lut: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    from .adc_triton import adc_scores_triton

    return adc_scores_triton(lut, codes)


# Keys per top-k chunk: a chunk of documents gives each query ceil(chunk / BLOCK_N) * min(k,
# BLOCK_N) candidate keys (adc_triton.adc_block_topk_keys: each 128-document block keeps its
# best min(k, 128)), at most TRITON_KEYS_PER_CHUNK for all queries together (512 MB of int64),
# and at least TRITON_MIN_DOCS_PER_CHUNK documents. With k = 10 one chunk covers 13 million
# documents at nq = 64 (0.8 million at 1024 queries): a search of a million documents is one
# kernel and one torch.topk of N / 12.8 keys per query.
# (Before the block top-k, every score became a key: the (nq, N) float32 scores, their int64
# keys, and a torch.topk over all N keys; at nq = 64, N = 10**6, M = 96 on an H200 the keys and
# their top-k cost 3.1 ms on top of the 3.5 ms scoring kernel, bench/results/gpu_profile.md.)
TRITON_KEYS_PER_CHUNK = 1 << 26
TRITON_MIN_DOCS_PER_CHUNK = 1 << 16


def order_keys(scores: torch.Tensor, ids: torch.Tensor, largest: bool) -> torch.Tensor:
    """int64 keys whose descending order is the top-k order: the better score first, then the
    smaller id (exact: no float tie is left to torch.topk's choice). The float32 score (negated
    for L2) is mapped to an int32 that orders like it (negative floats: low 31 bits flipped),
    shifted to the high half; the low half is 2**32 - 1 - id. ids: int64, 0 <= id < 2**32.
    The Triton top-k computes these keys inside its kernel (adc_triton._adc_block_topk_kernel);
    this torch form is what the tests compare it with, key for key."""
    s = (scores if largest else -scores) + 0.0  # + 0.0: -0.0 becomes +0.0, which it equals
    bits = s.view(torch.int32)
    ordered = torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).to(torch.int64)
    return (ordered << 32) | (0xFFFFFFFF - ids)


def scores_of_keys(keys: torch.Tensor, largest: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of `order_keys`: (scores float32, ids int64)."""
    ordered = (keys >> 32).to(torch.int32)
    s = torch.where(ordered >= 0, ordered, ordered ^ 0x7FFFFFFF).view(torch.float32)
    return (s if largest else -s + 0.0), 0xFFFFFFFF - (keys & 0xFFFFFFFF)  # + 0.0: no -0.0 distances


# Documents per top-k span: a key holds a document's id in 32 bits (`order_keys`), so a search of
# more documents than that (4.3 billion codes of 16 bytes fit on one H200) runs span by span and
# merges the spans' top-k by (score, id).
TRITON_MAX_SPAN_DOCS = (1 << 32) - 2


def _adc_topk_triton(lut: torch.Tensor, codes: torch.Tensor, k: int, metric: str,
                     doc_scale: torch.Tensor | None = None):
    nq = lut.shape[0]
    N = codes.shape[0]
    largest = metric == "ip"
    parts = []
    for a in range(0, N, TRITON_MAX_SPAN_DOCS):
        b = min(N, a + TRITON_MAX_SPAN_DOCS)
        v, i = _span_topk_triton(lut, codes[a:b], k, largest, None if doc_scale is None else doc_scale[a:b])
        parts.append((v, i + a))
    if len(parts) == 1:
        best_v, best_i = parts[0]
    elif parts:  # merge: better score first, then the smaller id (the order within a span)
        best_v, best_i = torch.cat([v for v, _ in parts], 1), torch.cat([i for _, i in parts], 1)
        by_id = torch.sort(best_i, dim=1, stable=True).indices
        best_v, best_i = best_v.gather(1, by_id), best_i.gather(1, by_id)
        by_score = torch.sort(best_v, dim=1, descending=largest, stable=True).indices[:, :k]
        best_v, best_i = best_v.gather(1, by_score), best_i.gather(1, by_score)
    else:
        best_v = torch.empty((nq, 0), device=lut.device)
        best_i = torch.empty((nq, 0), dtype=torch.int64, device=lut.device)
    pad = k - best_v.shape[1]
    if pad:
        fill = -FLOAT_MAX if largest else FLOAT_MAX
        best_v = torch.cat([best_v, torch.full((nq, pad), fill, device=lut.device)], 1)
        best_i = torch.cat([best_i, torch.full((nq, pad), -1, dtype=torch.int64, device=lut.device)], 1)
    return best_v, best_i


def _span_topk_triton(lut: torch.Tensor, codes: torch.Tensor, k: int, largest: bool,
                      doc_scale: torch.Tensor | None):
    """(scores, ids) of the top min(k, N) of N <= TRITON_MAX_SPAN_DOCS documents, best first,
    ties by the smaller id (ids count from 0 in this span), unpadded."""
    from .adc_triton import BLOCK_N, adc_block_topk_keys, block_keep

    nq = lut.shape[0]
    N = codes.shape[0]
    best = torch.empty((nq, 0), dtype=torch.int64, device=lut.device)
    per_doc = block_keep(k) / BLOCK_N  # candidate keys per document and query
    chunk = max(TRITON_MIN_DOCS_PER_CHUNK, int(TRITON_KEYS_PER_CHUNK / (per_doc * max(1, nq))))
    for s in range(0, N, chunk):
        e = min(N, s + chunk)
        scale = None if doc_scale is None else doc_scale[s:e]
        keys = torch.cat([best, adc_block_topk_keys(lut, codes[s:e], k, largest, scale, id_base=s)], 1)
        # the top min(k, e) keys are real documents' (each block keeps min(k, its documents))
        best = torch.topk(keys, min(k, e), dim=1, sorted=False).values
        del keys
    best = torch.sort(best, dim=1, descending=True).values  # best first, ties by smaller id
    return scores_of_keys(best, largest)


# --------------------------------------------------------------------------- public
def _check_lut(lut, values: bool = True):
    check_float_matrix("lut", lut, ndim=3, values=values)
    nq, M, K = lut.shape
    if M < 1 or K < 1:
        raise ValueError(f"lut must have shape (nq, M, K) with M, K >= 1, got {tuple(lut.shape)}")
    if K > 256:
        raise ValueError(f"lut has K={K} entries per sub-quantizer; at most 256 (8-bit codes)")
    return lut


def _as_torch_f32(x, kind):
    return x.float().contiguous() if kind.is_torch else torch.from_numpy(to_numpy_f32(x))


def _as_torch_codes(codes, kind):
    return codes.to(torch.uint8).contiguous() if kind.is_torch else torch.from_numpy(to_numpy_codes(codes))


def build_lut(q, centroids, metric: str = "ip", backend: str = "auto", check: bool = True):
    """Query look-up tables.

    Args:
        q: shape=(nq, D), float32.
        centroids: shape=(M, K, ds), float32, D = M * ds.
        metric: "ip" (inner product) or "l2" (squared L2).
        backend: "auto" | "triton" | "cpu" | "reference". "triton" (CUDA tensors) is a batched
            GEMM, torch.bmm on the input's device. "cpu" is a numba loop parallel over queries that
            writes the (nq, M, K) layout directly (the bmm's (M, nq, K) result needed a transpose
            copy as long as the GEMM itself), with a fixed IEEE summation order (see `_lut_into`);
            CPU tensors that need a graph (requires_grad under grad mode) get the bmm instead.
        check: validate that q and centroids are finite, a pass over each (on CUDA tensors it
            waits for the device; skip only for inputs checked before); shapes and dtypes are
            checked either way.

    Returns:
        lut: shape=(nq, M, K), float32, in the kind of `q`.
    """
    kind = array_kind(q=q, centroids=centroids)
    check_metric(metric)
    check_centroids(centroids, values=check)
    check_vectors_for("q", q, centroids, values=check)
    path = resolve_backend(backend, kind)
    if path == "reference":
        return kind.wrap(build_lut_reference(to_numpy_f32(q), to_numpy_f32(centroids), metric))
    needs_graph = torch.is_grad_enabled() and any(getattr(x, "requires_grad", False) for x in (q, centroids))
    if path == "cpu" and not needs_graph:
        return kind.wrap(_build_lut_numba(to_numpy_f32(q), to_numpy_f32(centroids), metric))
    return kind.wrap(_build_lut_torch(_as_torch_f32(q, kind), _as_torch_f32(centroids, kind), metric))


def adc_scores(lut, codes, backend: str = "auto"):
    """All scores of every query against every code.

    Args:
        lut: shape=(nq, M, K), float32 (from `build_lut`).
        codes: shape=(N, M), uint8, values < K.

    Returns:
        scores: shape=(nq, N), float32: sum_m lut[q, m, codes[n, m]].
    """
    kind = array_kind(lut=lut, codes=codes)
    _check_lut(lut)
    check_codes(codes, lut.shape[1], lut.shape[2])
    path = resolve_backend(backend, kind)
    if path == "triton":
        return kind.wrap(_adc_scores_triton(_as_torch_f32(lut, kind), _as_torch_codes(codes, kind)))
    if path == "reference":
        return kind.wrap(adc_scores_reference(to_numpy_f32(lut), to_numpy_codes(codes)))
    return kind.wrap(_adc_scores_cpu(to_numpy_f32(lut), to_numpy_codes(codes)))


def _check_doc_scale(doc_scale, n: int, metric: str, values: bool = True):
    """doc_scale: None, or (n,) floating, finite and > 0 (the values only with `values`), with
    metric "ip"."""
    if doc_scale is None:
        return
    if metric != "ip":
        raise ValueError(f"doc_scale multiplies inner-product scores: it needs metric 'ip', got {metric!r}")
    check_float_matrix("doc_scale", doc_scale, ndim=1, values=values)
    if doc_scale.shape[0] != n:
        raise ValueError(f"doc_scale must have shape ({n},) (one factor per code row), got {tuple(doc_scale.shape)}")
    if values and n and not bool((doc_scale > 0).all()):
        raise ValueError("doc_scale must be > 0 everywhere (a factor <= 0 would reverse or erase a document's score)")


def adc_topk(lut, codes, k: int, metric: str = "ip", backend: str = "auto", check: bool = True,
             doc_scale=None):
    """Top-k documents per query by ADC score.

    Args:
        lut: shape=(nq, M, K), float32.
        codes: shape=(N, M), uint8, values < K.
        k: results per query; when k > N the tail is padded with id -1 and score -FLT_MAX
            ("ip") or +FLT_MAX ("l2"), as faiss does.
        metric: "ip" keeps the largest scores, "l2" the smallest.
        check: validate the values: the code range (a pass over all codes), and that lut and
            doc_scale are finite (and doc_scale > 0), each a pass that on CUDA tensors waits for
            the device. Skip only for inputs validated before, as PQIndex and JPQTrainer do;
            shapes and dtypes are checked either way.
        doc_scale: optional shape=(N,), float32, > 0: document n's score is multiplied by
            doc_scale[n] before ranking (metric "ip" only; D holds the scaled scores).
            `PQIndex(unit_norm=True)` passes 1 / ||reconstruction||.

    Returns:
        D: shape=(nq, k), float32, best first; I: shape=(nq, k), int64 (ties: smaller id first).
    """
    kind = array_kind(lut=lut, codes=codes, doc_scale=doc_scale)
    k = check_k(k)
    check_metric(metric)
    _check_lut(lut, values=check)
    check_codes(codes, lut.shape[1], lut.shape[2], values=check)
    _check_doc_scale(doc_scale, codes.shape[0], metric, values=check)
    path = resolve_backend(backend, kind)
    if path == "triton":
        scale = None if doc_scale is None else _as_torch_f32(doc_scale, kind)
        D, I = _adc_topk_triton(_as_torch_f32(lut, kind), _as_torch_codes(codes, kind), k, metric, scale)
    elif path == "reference":
        scale = None if doc_scale is None else to_numpy_f32(doc_scale)
        D, I = adc_topk_reference(to_numpy_f32(lut), to_numpy_codes(codes), k, metric, scale)
    else:
        scale = None if doc_scale is None else to_numpy_f32(doc_scale)
        D, I = _adc_topk_cpu(to_numpy_f32(lut), to_numpy_codes(codes), k, metric, scale)
    return kind.wrap(D), kind.wrap(I)
