"""Fused straight-through quantize-and-score: the JPQ training op, forward and backward.

    x_hat[n, m*ds:(m+1)*ds] = centroids[m, codes[n, m]]              (never built on the fast paths)
    scores[b, n]            = <q[b], x_hat[n]>                        (metric "ip")
                            = || q[b] - x_hat[n] ||^2                 (metric "l2", a distance)
    given pairs             : scores[b, p] = the same with n = doc_index[b, p]
    recon_error[n]          = || x[n] - x_hat[n] ||^2                 (optional, needs x)

Gradients (g = dL/dscores, gr = dL/drecon_error; W[n, b] = g summed over the pairs that put
document n next to query b, i.e. W = g^T for all pairs):

    G[b, m, k] = sum over documents n with codes[n, m] = k of W[n, b]     (scatter-add by code)
    ip : dq[b, m] = sum_k G[b, m, k] C[m, k]          dC[m, k] = sum_b G[b, m, k] q[b, m]
    l2 : dq[b, m] = 2 (rowsum(g)[b] q[b, m] - sum_k G[b, m, k] C[m, k])
         dC[m, k] = 2 (sum_b G[b, m, k] C[m, k] - sum_b G[b, m, k] q[b, m])
    recon: dC[m, k] -= 2 sum over n with codes[n, m] = k of gr[n] (x[n, m] - C[m, k])
    dx (straight-through): dx = dL/dx_hat from the scores (ip: W q; l2: 2 (rowsum(W) x_hat - W q))
         + 2 gr (x - x_hat), the reconstruction term's own gradient w.r.t. x. (Passing the recon
         term's x_hat gradient through as well would cancel it exactly, so it is not passed.)
    (q[b, m] is the sub-vector q[b, m*ds:(m+1)*ds].) Codes are integers: no gradient.

Every gradient of q and C goes through the (B, M, K) table G, so the backward costs one
scatter-add of B*N*M numbers plus two small batched GEMMs; neither the (N, D) reconstruction
nor the (B, M, K)-per-document distances of the composed-PyTorch JPQ formulation exist. Only
dx is (N, D), because it is an output.

Paths (`backend=`):
- reference: NumPy float64 forward (`quantize_and_score_reference`) and explicit backward
  (`quantize_and_score_backward_reference`); the oracle, gradchecked in tests/test_ste.py.
- cpu (default on CPU): LUTs by torch.bmm, then numba kernels: a document-major LUT
  gather-sum for the scores, a scatter-add by code for G, fused reconstruction-error /
  dC / dx epilogues. float32 and float64 (so gradcheck runs on it too).
- triton (CUDA; the CPU interpreter in tests): kernels in ste_triton.py, float32.

Measured on the 2-core dev CPU (Xeon, AVX-512), B=64, N=12800, M=96, K=256, ds=8, forward +
backward of a cross-entropy step: bench/results/ste_cpu.md (this path vs the composed PyTorch
JPQ formulation: time ratio 0.27, peak-memory ratio 0.20, on a busy machine) and
`python bench/bench_ste.py --alternatives` for the kernel variants behind the choices below.
The numba kernels share 2 cores with torch's own OpenMP pool: when other processes load the
machine, the two runtimes' spin-waiting barriers cost up to 10x (fused step 260 ms vs 32 ms
with OMP_WAIT_POLICY=PASSIVE at load average 3; 17-25 ms on a quieter machine).
"""
from __future__ import annotations

import numba as nb
import numpy as np
import torch

from .arrays import FASTMATH, array_kind, check_codes, check_metric
from .assign import assign, check_centroids, check_vectors_for
from .dispatch import resolve_backend


# --------------------------------------------------------------------------- reference
def _reconstruct_reference(C: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """x_hat: shape=(N, M*ds), float64.  Loop form: x_hat[n, m*ds + j] = C[m, codes[n, m], j]."""
    M, _, ds = C.shape
    return C[np.arange(M)[None, :], codes.astype(np.int64)].reshape(codes.shape[0], M * ds)


def quantize_and_score_reference(q, centroids, codes, x=None, doc_index=None, metric="ip"):
    """NumPy float64 oracle of the forward.

    Args:
        q: shape=(B, D); centroids: shape=(M, K, ds); codes: shape=(N, M) integer, < K;
        x: shape=(N, D) or None; doc_index: shape=(B, P) integer, < N, or None (all pairs).

    Returns:
        scores: shape=(B, N) or (B, P), float64; recon_error: shape=(N,), float64, or None.

    Loop form:  for b, n: scores[b, n] = sum_j q[b, j] * x_hat[n, j]          ("ip")
                                       = sum_j (q[b, j] - x_hat[n, j]) ** 2    ("l2")
                for n:    recon[n]     = sum_j (x[n, j] - x_hat[n, j]) ** 2
    """
    q = np.asarray(q, dtype=np.float64)
    x_hat = _reconstruct_reference(np.asarray(centroids, dtype=np.float64), np.asarray(codes))
    if doc_index is None:
        if metric == "ip":
            scores = q @ x_hat.T
        else:
            scores = np.array([((x_hat - qb) ** 2).sum(-1) for qb in q]).reshape(len(q), len(x_hat))
    else:
        docs = x_hat[np.asarray(doc_index, dtype=np.int64)]  # (B, P, D)
        if metric == "ip":
            scores = np.einsum("bd,bpd->bp", q, docs)
        else:
            scores = ((q[:, None, :] - docs) ** 2).sum(-1)
    recon = None
    if x is not None:
        recon = ((np.asarray(x, dtype=np.float64) - x_hat) ** 2).sum(-1)
    return scores, recon


def quantize_and_score_backward_reference(g, gr, q, centroids, codes, x=None, doc_index=None,
                                          metric="ip", need_dx=True):
    """Explicit float64 gradients of the op (see the module docstring for the formulas).

    Args:
        g: dL/dscores, shape=(B, N) or (B, P), or None; gr: dL/drecon_error, shape=(N,), or None.
        q, centroids, codes, x, doc_index, metric: as in the forward.

    Returns:
        dq: shape=(B, D); dC: shape=(M, K, ds); dx: shape=(N, D) or None (x not given), float64.
    """
    q = np.asarray(q, dtype=np.float64)
    C = np.asarray(centroids, dtype=np.float64)
    codes = np.asarray(codes, dtype=np.int64)
    M, K, ds = C.shape
    B, N = q.shape[0], codes.shape[0]
    x_hat = _reconstruct_reference(C, codes)
    # W[n, b] = dL/dscore(q_b, x_hat_n): g^T for all pairs, summed over repeated pairs otherwise
    W = np.zeros((N, B))
    if g is not None:
        g = np.asarray(g, dtype=np.float64)
        if doc_index is None:
            W = g.T.copy()
        else:
            np.add.at(W, (np.asarray(doc_index, dtype=np.int64), np.arange(B)[:, None]), g)
    if metric == "ip":
        dq = W.T @ x_hat
        dx_hat = W @ q  # dL/dx_hat through the scores
    else:
        dq = 2.0 * (W.sum(0)[:, None] * q - W.T @ x_hat)
        dx_hat = 2.0 * (W.sum(1)[:, None] * x_hat - W @ q)
    dx = dx_hat.copy() if (x is not None and need_dx) else None  # straight-through
    dx_hat_total = dx_hat
    if gr is not None and x is not None:
        d_recon = 2.0 * np.asarray(gr, dtype=np.float64)[:, None] * (np.asarray(x, np.float64) - x_hat)
        dx_hat_total = dx_hat - d_recon  # d recon / d x_hat = -2 (x - x_hat)
        if dx is not None:
            dx += d_recon  # d recon / d x = 2 (x - x_hat)
    dC = np.zeros((M, K, ds))
    # for n, m: dC[m, codes[n, m]] += dx_hat_total[n, m*ds:(m+1)*ds]
    np.add.at(dC, (np.arange(M)[None, :], codes), dx_hat_total.reshape(N, M, ds))
    return dq, dC, dx


class _ReferenceOps:
    """Reference path: NumPy float64 on CPU, results in the caller's dtype and device."""

    @staticmethod
    def forward(q, C, codes, x, doc_index, metric, want_recon):
        np_ = lambda t: None if t is None else t.detach().cpu().numpy()  # noqa: E731
        scores, recon = quantize_and_score_reference(
            np_(q), np_(C), np_(codes), np_(x) if want_recon else None, np_(doc_index), metric
        )
        back = lambda a: torch.from_numpy(a).to(device=q.device, dtype=q.dtype)  # noqa: E731
        return back(scores), (back(recon) if want_recon else None)

    @staticmethod
    def backward(g, gr, q, C, codes, x, doc_index, metric, needs):
        np_ = lambda t: None if t is None else t.detach().cpu().numpy()  # noqa: E731
        dq, dC, dx = quantize_and_score_backward_reference(
            np_(g), np_(gr), np_(q), np_(C), np_(codes), np_(x), np_(doc_index), metric, needs[2]
        )
        back = lambda a, ref: None if a is None else torch.from_numpy(a).to(ref.device, ref.dtype)  # noqa: E731
        return (back(dq, q) if needs[0] else None, back(dC, C) if needs[1] else None,
                back(dx, x) if needs[2] else None)


# --------------------------------------------------------------------------- CPU fast path
# Query tile: the LUT and the G table of one tile are (M, K, TILE) floats = 6.3 MB at M=96,
# K=256, TILE=64 (as adc.QUERIES_PER_TILE); bigger batches loop over tiles, so memory stays
# bounded whatever B is, at the price of one more pass over the codes (1.2 MB) per tile.
QUERIES_PER_TILE = 64


DOCS_PER_TASK = 256  # documents per parallel task of _scores_all_pairs (one accumulator alloc each)


@nb.njit(parallel=True, fastmath=FASTMATH, cache=True)
def _scores_all_pairs(codes, lut_mkb, out):
    """codes (N, M) u8; lut_mkb (M, K, B) float; out (B, N) float, written.

    out[b, n] = sum_m lut_mkb[m, codes[n, m], b]: document-major, so the B accumulators of
    one document stay in registers (4 AVX-512 vectors at B=64) while M contiguous LUT rows are
    gathered, then go to column n of `out` (consecutive documents fill the same B cache lines).
    Measured (python bench/bench_ste.py --alternatives; N=12800, M=96, K=256, B=64) on the
    2-core dev CPU, which other jobs kept busy (load average 2-4.5) so only gaps of 2x or more
    mean anything: 2 threads, 6-7 ms vs 22-30 ms for document blocks of 256 as in
    adc._scores_many_queries (a (256, B) block spills out of L1 and the 6.3 MB LUT is re-read
    per block), 40-79 ms for a one-hot CSR sparse matmul, 370-755 ms for torch advanced
    indexing + sum. One thread at load 4.4: 16 ms vs 14 ms for an (N, B) output plus a
    transpose copy (kept anyway: no (N, B) buffer, 3.3 MB less peak memory), 16 ms for the
    adc blocks, 20 ms for CSR. Re-measured on the idle machine (load 0.9, 2 threads): at B=64
    `bench/bench_ste.py --alternatives` gives 10.9 ms here vs 8.8 ms for adc's blocks; calling the
    two kernels directly (median of 15, three rounds) adc's blocks are 1.1-1.3x faster at B=64
    (N=12800 and 50000, M=96) and this kernel 1.3-1.4x faster at B=32 (JPQ's batch size) and at
    M=16. Neither loop order wins everywhere, so the two stay
    separate (adc's block kernel also feeds its fused top-k).
    """
    N, M = codes.shape
    B = lut_mkb.shape[2]
    ntasks = (N + DOCS_PER_TASK - 1) // DOCS_PER_TASK
    for t in nb.prange(ntasks):
        acc = np.empty(B, lut_mkb.dtype)
        for n in range(t * DOCS_PER_TASK, min(N, (t + 1) * DOCS_PER_TASK)):
            acc[:] = 0.0
            for m in range(M):
                row = lut_mkb[m, codes[n, m]]
                for b in range(B):
                    acc[b] += row[b]
            for b in range(B):
                out[b, n] = acc[b]


@nb.njit(parallel=True, fastmath=FASTMATH, cache=True)
def _grad_table_all_pairs(codes, g, G_mkb, P):
    """codes (N, M) u8; g (B, N) float = dL/dscores; G_mkb (M, K, B), += ; P: thread count.

    G_mkb[m, codes[n, m], :] += g[:, n]. Each of the P tasks owns a range of subspaces m (no
    two threads write one row, no atomics, no per-thread copies of G) and streams all
    documents once, keeping the gradient column of a document in registers across its
    subspaces. Measured as for _scores_all_pairs: 2 threads, 6-24 ms, vs 21-50 ms for a
    prange over m (re-reads g, 3.3 MB, per subspace), 9-21 ms for per-thread private tables
    summed after (+6.3 MB per thread), 41-80 ms for a CSR sparse matmul, 364-447 ms for torch
    index_add_ per subspace (a single scatter_add_ would need a (N*M, B) int64 index, 630 MB).
    One thread at load 4.4 the numba variants are within noise of each other (14-18 ms), CSR
    15 ms, index_add_ 38 ms. Reading g in place instead of a transposed copy: same within
    noise, 3.3 MB less.
    """
    N, M = codes.shape
    B = g.shape[0]
    share = (M + P - 1) // P
    for p in nb.prange(P):
        m0 = p * share
        m1 = min(M, m0 + share)
        gn = np.empty(B, g.dtype)
        for n in range(N):
            for b in range(B):
                gn[b] = g[b, n]
            for m in range(m0, m1):
                row = G_mkb[m, codes[n, m]]
                for b in range(B):
                    row[b] += gn[b]


@nb.njit(parallel=True, fastmath=FASTMATH, cache=True)
def _scores_pairs(codes, doc_index, lut_mbk, out):
    """codes (N, M) u8; doc_index (B, P) i64; lut_mbk (M, B, K); out (B, P), written.

    out[b, p] = sum_m lut_mbk[m, b, codes[doc_index[b, p], m]]; parallel over queries.
    """
    B, P = doc_index.shape
    M = codes.shape[1]
    for b in nb.prange(B):
        for p in range(P):
            n = doc_index[b, p]
            acc = 0.0
            for m in range(M):
                acc += lut_mbk[m, b, codes[n, m]]
            out[b, p] = acc


@nb.njit(parallel=True, fastmath=FASTMATH, cache=True)
def _grad_table_pairs(codes, doc_index, g, G_mbk):
    """G_mbk (M, B, K) += : G_mbk[m, b, codes[doc_index[b, p], m]] += g[b, p]; a query per thread."""
    B, P = doc_index.shape
    M = codes.shape[1]
    for b in nb.prange(B):
        for p in range(P):
            n = doc_index[b, p]
            v = g[b, p]
            for m in range(M):
                G_mbk[m, b, codes[n, m]] += v


@nb.njit(parallel=True, fastmath=FASTMATH, cache=True)
def _recon_error(codes, C, x, out):
    """out[n] = || x[n] - x_hat[n] ||^2 with x_hat rebuilt one sub-vector at a time."""
    N, M = codes.shape
    ds = C.shape[2]
    for n in nb.prange(N):
        acc = 0.0
        for m in range(M):
            c = C[m, codes[n, m]]
            for j in range(ds):
                e = x[n, m * ds + j] - c[j]
                acc += e * e
        out[n] = acc


@nb.njit(parallel=True, fastmath=FASTMATH, cache=True)
def _recon_dc(codes, C, x, gr, dC, P):
    """dC[m, k] += -2 sum_{n: codes[n, m] = k} gr[n] (x[n, m] - C[m, k]); P threads own subspaces."""
    N, M = codes.shape
    ds = C.shape[2]
    share = (M + P - 1) // P
    for p in nb.prange(P):
        m0 = p * share
        m1 = min(M, m0 + share)
        for n in range(N):
            w = -2.0 * gr[n]
            for m in range(m0, m1):
                k = codes[n, m]
                for j in range(ds):
                    dC[m, k, j] += w * (x[n, m * ds + j] - C[m, k, j])


@nb.njit(parallel=True, fastmath=FASTMATH, cache=True)
def _dx_epilogue(codes, C, x, a, r, dx):
    """dx[n] += a[n] * x_hat[n] + r[n] * (x[n] - x_hat[n]) (a, r of length N, or empty: 0)."""
    N, M = codes.shape
    ds = C.shape[2]
    has_a = a.shape[0] > 0
    has_r = r.shape[0] > 0
    for n in nb.prange(N):
        an = a[n] if has_a else 0.0
        rn = r[n] if has_r else 0.0
        for m in range(M):
            c = C[m, codes[n, m]]
            for j in range(ds):
                dx[n, m * ds + j] += an * c[j] + rn * (x[n, m * ds + j] - c[j])


def _num_ranges(M: int) -> int:
    """Subspace ranges for the scatter kernels: one per numba thread (passed in: calling
    nb.get_num_threads() inside a kernel stops numba from caching it)."""
    return max(1, min(nb.get_num_threads(), M))


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().contiguous().numpy()


class _CpuOps:
    """CPU fast path: torch.bmm for the small GEMMs, numba for the gathers and scatters.

    Every function takes and returns CPU torch tensors (float32 or float64, uint8 codes).
    """

    TILE = QUERIES_PER_TILE

    @staticmethod
    def scores(q, C, codes, doc_index, metric):
        M, K, ds = C.shape
        B = q.shape[0]
        P = codes.shape[0] if doc_index is None else doc_index.shape[1]
        qs = q.reshape(B, M, ds).transpose(0, 1)  # (M, B, ds)
        cnorm = (C * C).sum(-1) if metric == "l2" else None  # (M, K)
        out = torch.empty((B, P), dtype=q.dtype)
        for b0 in range(0, B, QUERIES_PER_TILE):
            b1 = min(B, b0 + QUERIES_PER_TILE)
            qt = qs[:, b0:b1]  # (M, bt, ds)
            if doc_index is None:
                lut = torch.bmm(C, qt.transpose(1, 2))  # (M, K, bt) directly, no transpose copy
                if metric == "l2":  # ||q_m - c||^2 = ||q_m||^2 - 2 q_m.c + ||c||^2
                    lut = (qt * qt).sum(-1)[:, None, :] - 2.0 * lut + cnorm[:, :, None]
                _scores_all_pairs(_np(codes), _np(lut), out[b0:b1].numpy())
            else:
                lut = torch.bmm(qt, C.transpose(1, 2))  # (M, bt, K)
                if metric == "l2":
                    lut = (qt * qt).sum(-1)[:, :, None] - 2.0 * lut + cnorm[:, None, :]
                _scores_pairs(_np(codes), _np(doc_index[b0:b1]), _np(lut), out[b0:b1].numpy())
        return out

    @staticmethod
    def grad_table_plan(codes, K):
        return None  # the numba kernels need no preparation

    @staticmethod
    def grad_table(g, codes, doc_index, M, K, plan=None):
        """dL/dscores for a tile of queries -> G of shape (M, bt, K) (any strides)."""
        bt = g.shape[0]
        if doc_index is None:
            G = np.zeros((M, K, bt), dtype=_np(g).dtype)
            _grad_table_all_pairs(_np(codes), _np(g), G, _num_ranges(M))
            return torch.from_numpy(G).transpose(1, 2)
        G = np.zeros((M, bt, K), dtype=_np(g).dtype)
        _grad_table_pairs(_np(codes), _np(doc_index), _np(g), G)
        return torch.from_numpy(G)

    @staticmethod
    def recon_error(x, C, codes):
        out = np.empty(codes.shape[0], dtype=_np(x).dtype)
        _recon_error(_np(codes), _np(C), _np(x), out)
        return torch.from_numpy(out)

    @staticmethod
    def recon_dc_(dC, x, C, codes, gr):
        _recon_dc(_np(codes), _np(C), _np(x), _np(gr.to(dC.dtype)), dC.numpy(), _num_ranges(C.shape[0]))

    @staticmethod
    def dx_epilogue_(dx, x, C, codes, a, r):
        empty = np.empty(0, dtype=_np(x).dtype)
        _dx_epilogue(_np(codes), _np(C), _np(x), empty if a is None else _np(a),
                     empty if r is None else _np(r), dx.numpy())


def _triton_ops():
    from . import ste_triton  # Triton stays out of `import jpq`

    return ste_triton


# --------------------------------------------------------------------------- fast paths
def _fast_forward(ops, q, C, codes, x, doc_index, metric, want_recon):
    scores = ops.scores(q, C, codes, doc_index, metric)
    recon = ops.recon_error(x, C, codes) if want_recon else None
    return scores, recon


def _fast_backward(ops, g, gr, q, C, codes, x, doc_index, metric, needs):
    """Gradients of (q, C, x) from the (B, M, K) table G, tile by tile over queries."""
    M, K, ds = C.shape
    B, D = q.shape
    N = codes.shape[0]
    dq = torch.zeros((B, D), dtype=q.dtype, device=q.device) if needs[0] else None
    dC = torch.zeros((M, K, ds), dtype=C.dtype, device=C.device) if needs[1] else None
    if g is not None and (needs[0] or needs[1]):
        plan = ops.grad_table_plan(codes, K) if doc_index is None else None  # shared by the tiles
        for b0 in range(0, B, ops.TILE):
            b1 = min(B, b0 + ops.TILE)
            idx = None if doc_index is None else doc_index[b0:b1]
            G = ops.grad_table(g[b0:b1], codes, idx, M, K, plan)  # (M, bt, K)
            qs = q[b0:b1].reshape(b1 - b0, M, ds).transpose(0, 1)  # (M, bt, ds)
            sign = 1.0 if metric == "ip" else -2.0
            if needs[0]:
                dq_m = torch.bmm(G, C)  # (M, bt, ds): sum_k G[b, m, k] C[m, k]
                dq_m = dq_m.mul_(sign)
                if metric == "l2":
                    dq_m += 2.0 * g[b0:b1].sum(1)[None, :, None] * qs
                dq[b0:b1] = dq_m.transpose(0, 1).reshape(b1 - b0, D)
            if needs[1]:
                dC.baddbmm_(G.transpose(1, 2), qs, alpha=sign)  # += sign * sum_b G[b, m, k] q[b, m]
                if metric == "l2":
                    dC += 2.0 * G.sum(1)[:, :, None] * C
    if gr is not None and needs[1]:
        ops.recon_dc_(dC, x, C, codes, gr)
    dx = None
    if needs[2]:
        if g is not None:
            if doc_index is None:
                W = g.T  # (N, B)
            else:
                W = torch.zeros((N, B), dtype=g.dtype, device=g.device)
                b_of = torch.arange(B, device=g.device).repeat_interleave(doc_index.shape[1])
                W.index_put_((doc_index.reshape(-1), b_of), g.reshape(-1), accumulate=True)
            dx = W @ q  # (N, D); the only (N, D) tensor, and it is an output
            a = None
            if metric == "l2":
                dx.mul_(-2.0)
                a = 2.0 * W.sum(1)
        else:
            dx = torch.zeros((N, D), dtype=x.dtype, device=x.device)
            a = None
        r = 2.0 * gr.to(x.dtype) if gr is not None else None
        if a is not None or r is not None:
            ops.dx_epilogue_(dx, x, C, codes, a, r)
    return dq, dC, dx


# --------------------------------------------------------------------------- autograd
class QuantizeAndScoreFunction(torch.autograd.Function):
    """Autograd op over (q, centroids, x); codes and doc_index are integer inputs.

    The backward is explicit on every path (no autograd graph inside); it is not
    differentiable again (once_differentiable).
    """

    @staticmethod
    def forward(ctx, q, C, x, codes, doc_index, metric, want_recon, path):
        ctx.set_materialize_grads(False)
        ctx.metric, ctx.path, ctx.want_recon = metric, path, want_recon
        if path == "reference":
            scores, recon = _ReferenceOps.forward(q, C, codes, x, doc_index, metric, want_recon)
        else:
            ops = _CpuOps if path == "cpu" else _triton_ops()
            scores, recon = _fast_forward(ops, q, C, codes, x, doc_index, metric, want_recon)
        ctx.save_for_backward(q, C, x, codes, doc_index)
        if want_recon:
            return scores, recon
        return scores

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g, gr=None):
        q, C, x, codes, doc_index = ctx.saved_tensors
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2])
        if g is not None:
            g = g.to(q.dtype)
        if gr is not None:
            gr = gr.to(q.dtype)
        if ctx.path == "reference":
            dq, dC, dx = _ReferenceOps.backward(g, gr, q, C, codes, x, doc_index, ctx.metric, needs)
        else:
            ops = _CpuOps if ctx.path == "cpu" else _triton_ops()
            dq, dC, dx = _fast_backward(ops, g, gr, q, C, codes, x, doc_index, ctx.metric, needs)
        return dq, dC, dx, None, None, None, None, None


# --------------------------------------------------------------------------- public
def _check_doc_index(doc_index, B: int, N: int, values: bool = True):
    if doc_index.ndim != 2:
        raise ValueError(f"doc_index must have shape (B, P), got shape {tuple(doc_index.shape)}")
    if doc_index.dtype.is_floating_point or doc_index.dtype == torch.bool:
        raise TypeError(f"doc_index must be an integer tensor (int64 expected), got {doc_index.dtype}")
    if doc_index.shape[0] != B:
        raise ValueError(f"doc_index has {doc_index.shape[0]} rows, but q has B={B} queries")
    if values and doc_index.numel():
        lo, hi = int(doc_index.min()), int(doc_index.max())
        if lo < 0 or hi >= N:
            raise ValueError(f"doc_index values must lie in [0, {N}), found range [{lo}, {hi}]")


def quantize_and_score(q, centroids, codes=None, x=None, doc_index=None, metric: str = "ip",
                       return_recon_error: bool = False, backend: str = "auto", check: bool = True):
    """Score queries against PQ-quantized documents, with gradients for JPQ training.

    Args:
        q: shape=(B, D), float32 (or float64) torch tensor; gradient dq.
        centroids: shape=(M, K, ds), same dtype, D = M * ds, K <= 256; gradient dC.
        codes: shape=(N, M), integer (uint8 expected), values < K: fixed codes (JPQ). When
            both codes and x are given, codes are used and x only feeds the reconstruction
            error and the straight-through gradient.
        x: shape=(N, D), same dtype, or None. Without codes, x is assigned to its nearest
            centroids inside (the `assign` kernel). Its gradient is straight-through:
            dx = dL/dx_hat (from the scores) + 2 dL/drecon (x - x_hat).
        doc_index: shape=(B, P), int64, values < N, or None. Given pairs:
            scores[b, p] = score(q[b], x_hat[doc_index[b, p]]). None: all pairs.
        metric: "ip" (scores = q . x_hat) or "l2" (scores = ||q - x_hat||^2, a distance).
        return_recon_error: also return ||x - x_hat||^2 per document (needs x).
        backend: "auto" | "triton" | "cpu" | "reference". The triton path computes in float32;
            the CPU and reference paths keep float64 inputs in float64.
        check: validate the values: q, centroids and x finite, codes and doc_index in range;
            each a pass over the tensor that on CUDA waits for the device (four or five per
            call). Skip only for inputs built to be valid, as JPQTrainer's are: an out-of-range
            doc_index or code then reads outside its tensor. Shapes and dtypes are checked
            either way.

    Returns:
        scores: shape=(B, N) (all pairs) or (B, P) (given pairs), in q's dtype and device;
        with return_recon_error, (scores, recon_error) with recon_error shape=(N,).
    """
    kind = array_kind(q=q, centroids=centroids, codes=codes, x=x, doc_index=doc_index)
    if not kind.is_torch:
        raise TypeError("quantize_and_score is an autograd op: pass torch tensors, not NumPy arrays")
    check_metric(metric)
    check_centroids(centroids, values=check)
    check_vectors_for("q", q, centroids, values=check)
    M, K, ds = centroids.shape
    if codes is None and x is None:
        raise ValueError("pass codes=(N, M) PQ codes, or x=(N, D) to assign inside; got neither")
    if x is not None:
        check_vectors_for("x", x, centroids, values=check)
    if codes is not None:
        check_codes(codes, M, K, values=check)
        if x is not None and x.shape[0] != codes.shape[0]:
            raise ValueError(f"x has {x.shape[0]} rows but codes has {codes.shape[0]}")
    if return_recon_error and x is None:
        raise ValueError("return_recon_error=True needs x (the documents to reconstruct)")
    for name, t in (("centroids", centroids), ("x", x)):
        if t is not None and t.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but q has {q.dtype}; pass one float dtype")
    N = codes.shape[0] if codes is not None else x.shape[0]
    if doc_index is not None:
        _check_doc_index(doc_index, q.shape[0], N, values=check)
    path = resolve_backend(backend, kind)

    compute = torch.float64 if (q.dtype == torch.float64 and path != "triton") else torch.float32
    device = q.device if path == "triton" else torch.device("cpu")
    qc = q.to(device=device, dtype=compute)  # differentiable casts; no-ops in the common case
    Cc = centroids.to(device=device, dtype=compute)
    xc = None if x is None else x.to(device=device, dtype=compute)
    if codes is None:
        codes = assign(xc.detach(), Cc.detach(), backend=path)
    codes = codes.detach().to(device=device, dtype=torch.uint8).contiguous()
    if doc_index is not None:
        doc_index = doc_index.detach().to(device=device, dtype=torch.int64).contiguous()
    out = QuantizeAndScoreFunction.apply(
        qc.contiguous(), Cc.contiguous(), None if xc is None else xc.contiguous(),
        codes, doc_index, metric, bool(return_recon_error), path,
    )
    if return_recon_error:
        scores, recon = out
        return scores.to(q.device, q.dtype), recon.to(q.device, q.dtype)
    return out.to(q.device, q.dtype)
