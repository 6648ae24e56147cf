"""Triton kernels of the fused straight-through quantize-and-score (the op lives in ste.py).

Kept apart from ste.py so that `import jpq` never needs triton; ste.py imports this lazily and
calls the launchers below through the same interface as its CPU path (`_CpuOps`):

    scores(q, C, codes, doc_index, metric)     -> (B, N) or (B, P)   forward, LUT gather-sum
    recon_error(x, C, codes)                   -> (N,)               ||x - x_hat||^2, fused
    grad_table_plan(codes, K)                  -> plan or None       all pairs: documents by code
    grad_table(g, codes, doc_index, M, K, plan)-> (M, B, K) view     G: by code lists / atomics
    recon_dc_(dC, x, C, codes, gr)             in place              recon term of dC, atomic
    dx_epilogue_(dx, x, C, codes, a, r)        in place              dx += a x_hat + r (x - x_hat)

dq and dC are then two small batched GEMMs on G (torch.bmm, i.e. cuBLAS), and the (N, B) x
(B, D) product W q of dx is torch.mm; x_hat is rebuilt on the fly inside every kernel and
never stored. Everything is float32 (ste.py casts); tl.sum/atomics accumulate in float32.

Design notes:
- Forward: LUT lut[b, m, k] = q_m . C[m, k] (or ||q_m - C[m, k]||^2) by torch.bmm (adc.py's
  `_build_lut_torch`), then adc_triton's gather kernel (the ADC kernel itself): one program
  per (query b) x (128 candidates) gathers lut[b, m, codes[doc, m]] for BLOCK_M subspaces at
  a time. With given pairs (PAIRS) the document of each (b, p) comes from doc_index.
- Backward, given pairs: the same tiling, with tl.atomic_add(G[b, m, code], g[b, p]) in place
  of the load (B*P*M relaxed float atomics; a query's ~100 candidates rarely collide).
- Backward, all pairs: every (b, m, k) entry collects N / K documents, and one atomic per
  document was the bottleneck on an H200 (6.0 of 7.3 ms at 64 x 100,000, M = 96). Instead each
  subspace's documents are sorted by code once per backward (torch.sort of the (M, N) codes);
  a program takes 64 of them in that order x 64 queries, sums the rows of g.T per run of equal
  codes (tl.associative_scan) and adds each run's sum with one atomic per query. On the H200:
  2.8 ms forward + backward at 64 x 100,000, M = 96 (from 7.3; plain torch 3.6), exact to 3e-7
  relative against float64; peak 277 MB (the int64 order of the sorted codes) against 32 MB
  before and 835 MB for torch (bench/results/gpu.md, run 5).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .adc import _build_lut_torch
from .adc_triton import launch_gather, launch_pairs, pair_rows
from .arrays import cuda_device_of

# The scatter kernel (G) is launched by adc_triton.launch_pairs, with the tiling of the forward's
# gather kernel (one query x 128 candidates per program), which an H100 run verified.
BLOCK_N = 64  # documents per program of the reconstruction kernels
MAX_BLOCK_D = 64  # sub-vector columns per step of the reconstruction kernels
MAX_GRID_Y = 65535  # CUDA limit on grid axis 1
TILE = 256  # queries per G table in ste._fast_backward: (256, M, K) floats = 25 MB at M=96
SORTED_BLOCK_J = 64  # documents (in code order) per program of the all-pairs G kernel


@triton.jit
def _grad_table_kernel(
    g_ptr, codes_ptr, idx_ptr, G_ptr, B, P, M, K,
    PAIRS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """G[b, m, codes[doc(b, p), m]] += g[b, p] (the transposed gather of the forward).

    Args:
        g_ptr: dL/dscores, shape=(B, P), float32, contiguous.
        codes_ptr: shape=(N, M), uint8; idx_ptr: shape=(B, P), int64 (PAIRS only).
        G_ptr: the table, shape=(B, M, K), float32, zero-initialised (atomically added to).
    """
    b, offs_p, mask_p, docs = pair_rows(idx_ptr, P, PAIRS, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    g = tl.load(g_ptr + b * P + offs_p, mask=mask_p, other=0.0)
    vals = tl.broadcast_to(g[:, None], (BLOCK_N, BLOCK_M))
    G_b = G_ptr + b * M * K
    for m0 in range(0, M, BLOCK_M):
        m = m0 + offs_m
        mask = mask_p[:, None] & (m < M)[None, :]
        code = tl.load(codes_ptr + docs[:, None] * M + m[None, :], mask=mask, other=0)
        tl.atomic_add(G_b + m[None, :] * K + code.to(tl.int32), vals, mask=mask, sem="relaxed")


@triton.jit
def _segmented_add(v1, f1, v2, f2):
    """Segmented-sum operator for tl.associative_scan: f marks a row that starts a segment."""
    return tl.where(f2 != 0, v2, v1 + v2), f1 | f2


@triton.jit
def _grad_table_sorted_kernel(
    gT_ptr, perm_ptr, sorted_ptr, G_ptr, B, N, M, K,
    BLOCK_J: tl.constexpr, BLOCK_B: tl.constexpr,
):
    """G[b, m, k] += g[b, n] for all pairs, BLOCK_J documents of subspace m taken in code order
    (perm[m], sorted_codes[m]) x BLOCK_B queries per program: the tile's rows of g.T are summed
    per run of equal codes (a segmented scan down the tile) and each run adds its sum with one
    atomic per query, instead of one per document (N / K documents share each code: 390 at
    N = 100,000, K = 256).

    Args:
        gT_ptr: dL/dscores transposed, shape=(N, B), float32, contiguous.
        perm_ptr: shape=(M, N), int64: each subspace's document order by code.
        sorted_ptr: shape=(M, N), uint8: the codes in that order.
        G_ptr: the table, shape=(B, M, K), float32, zero-initialised (atomically added to).
    """
    j0 = tl.program_id(0) * BLOCK_J
    m = tl.program_id(1).to(tl.int64)
    offs_b = tl.program_id(2) * BLOCK_B + tl.arange(0, BLOCK_B)
    mask_b = offs_b < B
    j = j0 + tl.arange(0, BLOCK_J)
    mask_j = j < N
    row = m * N + j
    n = tl.load(perm_ptr + row, mask=mask_j, other=0)
    code = tl.load(sorted_ptr + row, mask=mask_j, other=0).to(tl.int32)
    before = tl.load(sorted_ptr + row - 1, mask=mask_j & (j > j0), other=0).to(tl.int32)
    after = tl.load(sorted_ptr + row + 1, mask=(j + 1 < N) & (j + 1 < j0 + BLOCK_J), other=0).to(tl.int32)
    starts = (j == j0) | (code != before)
    ends = mask_j & ((j + 1 == N) | (j + 1 == j0 + BLOCK_J) | (code != after))
    mask = mask_j[:, None] & mask_b[None, :]
    vals = tl.load(gT_ptr + n[:, None] * B + offs_b[None, :], mask=mask, other=0.0)
    flags = tl.broadcast_to(starts.to(tl.int32)[:, None], (BLOCK_J, BLOCK_B))
    sums, _ = tl.associative_scan((vals, flags), 0, _segmented_add)
    dst = G_ptr + offs_b[None, :].to(tl.int64) * (M * K) + m * K + code[:, None]
    tl.atomic_add(dst, sums, mask=ends[:, None] & mask_b[None, :], sem="relaxed")


@triton.jit
def _recon_error_kernel(x_ptr, c_ptr, codes_ptr, out_ptr, N, M, K, ds,
                        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[n] = ||x[n] - x_hat[n]||^2, x_hat rebuilt one sub-vector at a time.

    Args:
        x_ptr: shape=(N, M * ds), float32; c_ptr: centroids, shape=(M, K, ds), float32;
        codes_ptr: shape=(N, M), uint8; out_ptr: shape=(N,), float32 (written).
    """
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)  # int64: past 2**31 rows an int32 offset wraps
    mask_n = rows < N
    rows64 = rows.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for m in range(0, M):
        code = tl.load(codes_ptr + rows64 * M + m, mask=mask_n, other=0).to(tl.int64)
        c_rows = c_ptr + (m * K + code[:, None]) * ds
        x_rows = x_ptr + rows64[:, None] * (M * ds) + m * ds
        for d0 in range(0, ds, BLOCK_D):
            d = d0 + offs_d
            mask = mask_n[:, None] & (d < ds)[None, :]
            e = tl.load(x_rows + d[None, :], mask=mask, other=0.0) - tl.load(c_rows + d[None, :], mask=mask, other=0.0)
            acc += tl.sum(e * e, axis=1)
    tl.store(out_ptr + rows64, acc, mask=mask_n)


@triton.jit
def _subspace_rows(codes_ptr, N, M, BLOCK_N: tl.constexpr):
    """This program's documents (int64 rows and in-bounds mask; axis 0) in subspace m (axis 1)
    and their codes there (int64)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)  # int64: past 2**31 rows an int32 offset wraps
    m = tl.program_id(1)
    mask_n = rows < N
    rows64 = rows.to(tl.int64)
    code = tl.load(codes_ptr + rows64 * M + m, mask=mask_n, other=0).to(tl.int64)
    return rows64, mask_n, m, code


@triton.jit
def _recon_dc_kernel(x_ptr, c_ptr, codes_ptr, gr_ptr, dc_ptr, N, M, K, ds,
                     BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """dC[m, codes[n, m]] += -2 gr[n] (x[n, m] - C[m, codes[n, m]]) for one subspace m.

    Args:
        x_ptr: shape=(N, M * ds); c_ptr: shape=(M, K, ds); codes_ptr: shape=(N, M), uint8;
        gr_ptr: dL/drecon_error, shape=(N,); dc_ptr: shape=(M, K, ds) (atomically added to).
        All float32 but the codes.
    """
    rows64, mask_n, m, code = _subspace_rows(codes_ptr, N, M, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    w = -2.0 * tl.load(gr_ptr + rows64, mask=mask_n, other=0.0)
    c_off = (m * K + code[:, None]) * ds
    x_rows = x_ptr + rows64[:, None] * (M * ds) + m * ds
    for d0 in range(0, ds, BLOCK_D):
        d = d0 + offs_d
        mask = mask_n[:, None] & (d < ds)[None, :]
        e = tl.load(x_rows + d[None, :], mask=mask, other=0.0) - tl.load(c_ptr + c_off + d[None, :], mask=mask, other=0.0)
        tl.atomic_add(dc_ptr + c_off + d[None, :], w[:, None] * e, mask=mask, sem="relaxed")


@triton.jit
def _dx_epilogue_kernel(x_ptr, c_ptr, codes_ptr, a_ptr, r_ptr, dx_ptr, N, M, K, ds,
                        HAS_A: tl.constexpr, HAS_R: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """dx[n, m] += a[n] x_hat[n, m] + r[n] (x[n, m] - x_hat[n, m]) for one subspace m.

    Args:
        x_ptr: shape=(N, M * ds); c_ptr: shape=(M, K, ds); codes_ptr: shape=(N, M), uint8;
        a_ptr, r_ptr: shape=(N,) (read when HAS_A / HAS_R); dx_ptr: shape=(N, M * ds), updated.
    """
    rows64, mask_n, m, code = _subspace_rows(codes_ptr, N, M, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    c_rows = c_ptr + (m * K + code[:, None]) * ds
    row_off = rows64[:, None] * (M * ds) + m * ds
    if HAS_A:
        a = tl.load(a_ptr + rows64, mask=mask_n, other=0.0)
    if HAS_R:
        r = tl.load(r_ptr + rows64, mask=mask_n, other=0.0)
    for d0 in range(0, ds, BLOCK_D):
        d = d0 + offs_d
        mask = mask_n[:, None] & (d < ds)[None, :]
        c = tl.load(c_rows + d[None, :], mask=mask, other=0.0)
        out = tl.load(dx_ptr + row_off + d[None, :], mask=mask, other=0.0)
        if HAS_A:
            out += a[:, None] * c
        if HAS_R:
            out += r[:, None] * (tl.load(x_ptr + row_off + d[None, :], mask=mask, other=0.0) - c)
        tl.store(dx_ptr + row_off + d[None, :], out, mask=mask)


# --------------------------------------------------------------------------- launchers
def _on_first_tensors_device(fn):
    """Run the launcher with its first tensor argument's CUDA device current (`cuda_device_of`)."""
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        first = next((a for a in args if isinstance(a, torch.Tensor)), None)
        with cuda_device_of(first):
            return fn(*args, **kwargs)
    return wrapped


def scores(q, C, codes, doc_index, metric):
    """Forward scores. q: (B, D) float32; C: (M, K, ds) float32; codes: (N, M) uint8;
    doc_index: (B, P) int64 or None -> (B, P) or (B, N), float32."""
    M, K, _ = C.shape
    lut = _build_lut_torch(q, C, metric)  # (B, M, K), contiguous
    P = codes.shape[0] if doc_index is None else doc_index.shape[1]
    out = torch.empty((q.shape[0], P), dtype=torch.float32, device=q.device)
    launch_gather(lut, codes, doc_index, out)
    return out


def grad_table_plan(codes, K):
    """Each subspace's documents in code order, for the all-pairs G: (perm (M, N) int64,
    sorted codes (M, N) uint8); see `_grad_table_sorted_kernel`. One sort of the codes per
    backward, shared by its query tiles."""
    sorted_codes, perm = torch.sort(codes.T.contiguous(), dim=1)
    return perm.contiguous(), sorted_codes.contiguous()


@_on_first_tensors_device
def grad_table(g, codes, doc_index, M, K, plan=None):
    """G[b, m, k] = sum of g[b, p] over the p whose document has code k in subspace m.
    g: (B, P) float32 -> (M, B, K) (a transposed view of a (B, M, K) table).

    Given pairs (doc_index): one float atomic per (query, candidate, subspace), one query x 128
    candidates per program. All pairs: documents in code order (`plan` from `grad_table_plan`,
    computed here when None), one atomic per run of equal codes in a 64-document tile. On an
    H200 the per-document atomics took 6.0 ms of a 7.3 ms forward + backward at 64 queries x
    100,000 documents, M = 96 (bench/results/gpu_profile.md): N / K = 390 documents add into
    each (b, m, k) entry there, where a training step's pairs (~100 per query) rarely collide."""
    g = g.contiguous().float()
    B, P = g.shape
    G = torch.zeros((B, M, K), dtype=torch.float32, device=g.device)
    if doc_index is not None:
        launch_pairs(_grad_table_kernel, g, codes, doc_index, G, B, P, M, K)
        return G.transpose(0, 1)
    if B == 0 or P == 0 or M == 0:
        return G.transpose(0, 1)
    perm, sorted_codes = plan if plan is not None else grad_table_plan(codes, K)
    gT = g.T.contiguous()  # (N, B): a document's gradients for all the tile's queries, contiguous
    block_b = min(64, triton.next_power_of_2(B))
    grid = (triton.cdiv(P, SORTED_BLOCK_J), M, triton.cdiv(B, block_b))
    _grad_table_sorted_kernel[grid](gT, perm, sorted_codes, G, B, P, M, K,
                                    BLOCK_J=SORTED_BLOCK_J, BLOCK_B=block_b)
    return G.transpose(0, 1)


def _block_d(ds: int) -> int:
    return min(MAX_BLOCK_D, triton.next_power_of_2(ds))


@_on_first_tensors_device
def recon_error(x, C, codes):
    """||x[n] - x_hat[n]||^2: x (N, D) float32 -> (N,) float32."""
    M, K, ds = C.shape
    N = x.shape[0]
    out = torch.empty(N, dtype=torch.float32, device=x.device)
    if N:
        _recon_error_kernel[(triton.cdiv(N, BLOCK_N),)](
            x, C, codes, out, N, M, K, ds, BLOCK_N=BLOCK_N, BLOCK_D=_block_d(ds)
        )
    return out


@_on_first_tensors_device
def recon_dc_(dC, x, C, codes, gr):
    """dC += the reconstruction term's gradient (in place)."""
    M, K, ds = C.shape
    N = x.shape[0]
    for m0 in range(0, M, MAX_GRID_Y) if N else ():
        m1 = min(M, m0 + MAX_GRID_Y)
        _recon_dc_kernel[(triton.cdiv(N, BLOCK_N), m1 - m0)](
            x[:, m0 * ds:], C[m0:m1], codes[:, m0:], gr.contiguous().float(), dC[m0:m1],
            N, M, K, ds, BLOCK_N=BLOCK_N, BLOCK_D=_block_d(ds),
        )


@_on_first_tensors_device
def dx_epilogue_(dx, x, C, codes, a, r):
    """dx += a x_hat + r (x - x_hat) (in place); a, r: (N,) or None."""
    M, K, ds = C.shape
    N = x.shape[0]
    dummy = dx  # never read when the flag is off
    for m0 in range(0, M, MAX_GRID_Y) if N else ():
        m1 = min(M, m0 + MAX_GRID_Y)
        _dx_epilogue_kernel[(triton.cdiv(N, BLOCK_N), m1 - m0)](
            x[:, m0 * ds:], C[m0:m1], codes[:, m0:],
            dummy if a is None else a.contiguous(), dummy if r is None else r.contiguous(),
            dx[:, m0 * ds:], N, M, K, ds,
            HAS_A=a is not None, HAS_R=r is not None, BLOCK_N=BLOCK_N, BLOCK_D=_block_d(ds),
        )
