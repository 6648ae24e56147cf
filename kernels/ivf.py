"""Inverted-list ADC search with top-k: each query scores only the documents of its probed lists.

    D, I = ivf_search(q, centroids, list_codes, list_offsets, list_ids, probes, k, metric="ip")

The lists are laid out as faiss' inverted lists, in CSR form: list l holds the documents
list_ids[list_offsets[l]:list_offsets[l+1]] (int64 global ids) and their PQ codes, the same rows
of list_codes (N', M) uint8. q (nq, D) float32 are the (already rotated) query vectors, centroids
(M, K, ds) float32 with D = M * ds; probes (nq, w) int64 are the lists each query scans, -1 for
none. Returns D (nq, k) float32 and I (nq, k) int64, best first (largest inner product / smallest
L2 distance), ties by smaller id, -1 ids and -FLT_MAX / +FLT_MAX scores when fewer than k
documents were scanned. A document in two probed lists is counted once per list it is in (the
tree and IVF lists hold each document once), and a list probed twice by one query is scanned
twice: its documents can then come back twice (every path alike; `TreeIndex` never repeats a
list in a query's probes).

Loop form (the reference):
    for q: lut = build_lut(q, centroids); docs = the probed lists' rows;
           s = sum_m lut[m, list_codes[docs, m]]; the k best of (s, list_ids[docs])

Paths: "reference" (NumPy) and "cpu" (numba, one query per parallel iteration: its look-up table
is built into a per-query (M, K) buffer that stays in cache, then the scan over the list-ordered
codes, the k-heap and a final heapsort, all in one kernel, with no (nq, M, K) table in memory and
no per-list Python work). The table is `build_lut`'s CPU table (the same inlined `_lut_into`,
fixed IEEE order) and the sum runs over m in order in float32 as `adc_topk`'s CPU path does for
more than FEW_QUERIES (12) queries at a time, so the scores are then bitwise those of
`adc_topk(build_lut(q, centroids), codes)`. For 1-12 queries (or a last tile of 1-12) `adc_topk`
uses its few-query scans, whose vectorised sums are reassociated: scores agree to float32
rounding there, and ids but for near-ties. "triton"
(ivf_triton.py: CUDA tensors, or the CPU interpreter in tests) lays each query's probed lists out
as one padded row of candidates, scores them with adc_triton's gather kernel and ranks them with
torch sorts on the device; "auto" takes it for CUDA query tensors, the CPU path otherwise.

Why fused: `TreeIndex.search` first called `adc_scores` per reached list (300 SciFact test
queries, 64 leaves, M = 96, 2 threads: beam 3 / 6 / 12 took 80 / 169 / 304 ms), then a scan over
a precomputed LUT (50 / 54 / 65 ms), where the (300, 96, 256) table (29 MB: the GEMM plus its
transpose copy) and the per-query merge cost as much as the scan. Fused, with four documents'
sums interleaved: 16 / 21 / 28 ms, 1.4-1.6x faiss IndexIVFPQ at the same nprobe (10 / 14 / 20 ms,
same run; it was 2.4-3.3x); 1.2-1.5x once the tree's routing stopped computing its log-probabilities
twice: `python bench/tree_speed.py` (bench/results/tree_speed.md has the current figures).
"""
from __future__ import annotations

import numba as nb
import numpy as np
import torch

from .adc import _heap_replace_root, _lut_into, _offer, build_lut_reference, centroids_by_dim
from .arrays import FLOAT_MAX, array_kind, check_codes, check_k, check_metric, to_numpy_codes, to_numpy_f32
from .assign import check_centroids, check_vectors_for
from .dispatch import resolve_backend


def ivf_search_reference(q, centroids, list_codes, list_offsets, list_ids, probes, k: int, metric: str = "ip"):
    """NumPy oracle (see the module docstring)."""
    nq = q.shape[0]
    M = centroids.shape[0]
    D = np.full((nq, k), -FLOAT_MAX if metric == "ip" else FLOAT_MAX, np.float32)
    I = np.full((nq, k), -1, np.int64)
    lut = build_lut_reference(q, centroids, metric)
    for qi in range(nq):
        rows = [np.arange(list_offsets[l], list_offsets[l + 1]) for l in probes[qi] if l >= 0]
        rows = np.concatenate(rows) if rows else np.empty(0, np.int64)
        if len(rows) == 0:
            continue
        s = lut[qi].astype(np.float64)[np.arange(M)[None, :], list_codes[rows].astype(np.int64)].sum(1)
        s = s.astype(np.float32)
        docs = list_ids[rows]
        order = np.lexsort((docs, -s if metric == "ip" else s))[:k]  # best, then smaller id
        D[qi, : len(order)] = s[order]
        I[qi, : len(order)] = docs[order]
    return D, I


@nb.njit(cache=True, inline="always")
def _push(hv, hi, acc, i, l2):
    """Offer document i with summed table entries acc to the k-heap (for l2, negated: exact)."""
    _offer(hv, hi, -acc if l2 else acc, i)


# no fastmath: reassociation would let LLVM split the sum over m, and the scores would no longer
# be bitwise those of adc_topk's multi-query CPU kernel (a full-beam tree search equals
# PQIndex.search bitwise for more than FEW_QUERIES (12) queries at a time; module docstring)
@nb.njit(parallel=True, cache=True)
def _ivf_search_cpu(q, Ct, l2, list_codes, offsets, ids, probes, heap_v, heap_i):
    """q (nq, D), Ct (M, ds, K) f32; heaps (nq, k) filled in place, best first on return (for l2
    the heap holds negated distances: larger = better)."""
    nq, w = probes.shape
    M, _, K = Ct.shape
    k = heap_v.shape[1]
    for qi in nb.prange(nq):
        lut = np.empty((M, K), np.float32)
        _lut_into(q[qi], Ct, l2, lut)
        hv = heap_v[qi]
        hi = heap_i[qi]
        for j in range(w):
            l = probes[qi, j]
            if l < 0:
                continue
            start = offsets[l]
            stop = offsets[l + 1]
            t = start
            # four documents at a time: four independent in-order sums keep the adder busy (one
            # sum alone waits on each add's latency); every sum still runs over m in order
            while t + 4 <= stop:
                a0 = np.float32(0.0)
                a1 = np.float32(0.0)
                a2 = np.float32(0.0)
                a3 = np.float32(0.0)
                for m in range(M):
                    lm = lut[m]
                    a0 += lm[list_codes[t, m]]
                    a1 += lm[list_codes[t + 1, m]]
                    a2 += lm[list_codes[t + 2, m]]
                    a3 += lm[list_codes[t + 3, m]]
                _push(hv, hi, a0, ids[t], l2)
                _push(hv, hi, a1, ids[t + 1], l2)
                _push(hv, hi, a2, ids[t + 2], l2)
                _push(hv, hi, a3, ids[t + 3], l2)
                t += 4
            while t < stop:
                acc = np.float32(0.0)
                for m in range(M):
                    acc += lut[m, list_codes[t, m]]
                _push(hv, hi, acc, ids[t], l2)
                t += 1
        # heapsort: move the worst entry (the root) to the end, k - 1 times -> best first
        for n in range(k - 1, 0, -1):
            worst_v = hv[0]
            worst_i = hi[0]
            _heap_replace_root(hv[:n], hi[:n], hv[n], hi[n])
            hv[n] = worst_v
            hi[n] = worst_i


def _is_int_array(x) -> bool:
    if isinstance(x, torch.Tensor):
        return x.dtype in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)
    return isinstance(x, np.ndarray) and np.issubdtype(x.dtype, np.integer)


def _check_lists(list_offsets, list_ids, probes, n_rows, ids_values: bool = True):
    """Shapes and dtypes of the lists; the offsets' and probes' values (small arrays, copied to
    the host when on a device); the ids' values (>= 0: a pass over all N' of them) only with
    `ids_values`. Returns the three arguments as NumPy or torch, as given (lists as NumPy)."""
    list_offsets, list_ids, probes = (x if isinstance(x, torch.Tensor) else np.asarray(x)
                                      for x in (list_offsets, list_ids, probes))
    if list_offsets.ndim != 1 or len(list_offsets) < 1 or not _is_int_array(list_offsets):
        raise ValueError(f"list_offsets must be a 1-D integer array (n_lists + 1,), got "
                         f"{tuple(list_offsets.shape)} {list_offsets.dtype}")
    offsets = np.asarray(_host(list_offsets), np.int64)
    if offsets[0] != 0 or (np.diff(offsets) < 0).any() or offsets[-1] != n_rows:
        raise ValueError(f"list_offsets must start at 0, never decrease and end at the number of list rows ({n_rows})")
    if list_ids.ndim != 1 or not _is_int_array(list_ids) or len(list_ids) != n_rows or (
            ids_values and len(list_ids) and int(list_ids.min()) < 0):
        raise ValueError(f"list_ids must be a 1-D integer array of {n_rows} ids >= 0 (one per row of list_codes)")
    if probes.ndim != 2 or not _is_int_array(probes):
        raise ValueError(f"probes must be a 2-D integer array (nq, w), got {tuple(probes.shape)} {probes.dtype}")
    if probes.numel() if isinstance(probes, torch.Tensor) else probes.size:
        if int(probes.max()) >= len(offsets) - 1 or int(probes.min()) < -1:
            raise ValueError(f"probes must hold list numbers in [0, {len(offsets) - 1}) or -1")
    return list_offsets, list_ids, probes


def ivf_search(q, centroids, list_codes, list_offsets, list_ids, probes, k: int, metric: str = "ip",
               backend: str = "auto", check: bool = True):
    """k best documents of each query's probed lists by ADC (see the module docstring).

    Results come back in the kind of `q`: NumPy for NumPy, torch on q's device for torch. The
    other arguments may be NumPy or torch on any device; the Triton path copies whatever is not on
    q's device there on every call, so keep list_codes (N' x M bytes) on the device between calls
    (TreeIndex.search caches its device copies).
    backend: "auto" (Triton for CUDA tensors, else the CPU path), "triton", "cpu", "reference".
    check=False skips the full passes over q and centroids (finite values), list_codes (values
    < K) and list_ids (>= 0), for callers that validated them; shapes, dtypes, the offsets and the
    probes are always checked (the kernels do not bound-check), and device-resident lists are
    then not copied to the host."""
    kind = array_kind(q=q)
    if check:
        check_centroids(centroids)
        check_vectors_for("q", q, centroids)
    elif q.ndim != 2 or centroids.ndim != 3 or q.shape[1] != centroids.shape[0] * centroids.shape[2]:
        raise ValueError(f"q (nq, D) and centroids (M, K, ds) need D = M * ds, got {tuple(q.shape)} and "
                         f"{tuple(centroids.shape)}")
    k = check_k(k)
    check_metric(metric)
    path = resolve_backend(backend, kind)
    M, K, _ = centroids.shape
    check_codes(list_codes, M, K, name="list_codes", values=check)
    offsets, ids, probes = _check_lists(list_offsets, list_ids, probes, list_codes.shape[0], ids_values=check)
    nq = q.shape[0]
    if probes.shape[0] != nq:
        raise ValueError(f"probes has {probes.shape[0]} rows but q has {nq} queries")
    if path == "triton":
        from .ivf_triton import ivf_search_triton

        dev = kind.device if kind.is_torch else torch.device("cpu")
        D, I = ivf_search_triton(
            _on(q, dev, torch.float32), _on(centroids, dev, torch.float32), _on(list_codes, dev, torch.uint8),
            _on(offsets, dev, torch.int64), _on(ids, dev, torch.int64), _on(probes, dev, torch.int64), k, metric)
        return kind.wrap(D), kind.wrap(I)
    q = to_numpy_f32(q)
    centroids = to_numpy_f32(centroids)
    list_codes = to_numpy_codes(list_codes)
    offsets, ids, probes = (np.ascontiguousarray(_host(x), dtype=np.int64) for x in (offsets, ids, probes))
    if path == "reference":
        D, I = ivf_search_reference(q, centroids, list_codes, offsets, ids, probes, k, metric)
        return kind.wrap(D), kind.wrap(I)
    heap_v = np.full((nq, k), -np.inf, np.float32)
    heap_i = np.full((nq, k), -1, np.int64)
    if nq:
        _ivf_search_cpu(q, centroids_by_dim(centroids), metric == "l2", list_codes, offsets, ids, probes,
                        heap_v, heap_i)
    D = heap_v if metric == "ip" else -heap_v
    D[heap_i < 0] = -FLOAT_MAX if metric == "ip" else FLOAT_MAX
    return kind.wrap(D), kind.wrap(heap_i)


def _host(x):
    """A list argument as NumPy (torch tensors copied from their device)."""
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x


def _on(x, device, dtype) -> torch.Tensor:
    """NumPy or torch -> a contiguous torch tensor of `dtype` on `device`."""
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))
    return t.to(device=device, dtype=dtype).contiguous()


__all__ = ["ivf_search", "ivf_search_reference"]
