"""Triton PQ encoder: codes[n, m] = argmin_k || x[n, m*ds:(m+1)*ds] - centroids[m, k] ||^2.

Kept apart from assign.py so that `import jpq` never needs triton; assign.py imports it lazily.

Each program owns BLOCK_N rows of one subspace m (grid = (row blocks, M)); it keeps the
(BLOCK_N, BLOCK_D) sub-block of x in registers and walks the K centroids of subspace m in
chunks of BLOCK_K, scoring ||c||^2 - 2 x.c (||x||^2 is the same for every k, so it is left
out) and keeping a running minimum and argmin per row. Ties go to the smallest k: within a
chunk through `tl.min(..., return_indices_tie_break_left=True)`, across chunks because a later
chunk must be strictly better to win. Nothing of size (n, M, K) is ever materialised.

x.c uses `tl.dot` with input_precision="ieee" (plain float32, never TF32: TF32's 10-bit
mantissa flips codes between close centroids) when the padded sub-vector is at least 16 wide,
the smallest tl.dot accepts; shorter sub-vectors (ds <= 8) use a broadcast multiply-sum.
Sub-vectors longer than MAX_BLOCK_D are handled in BLOCK_D-wide column chunks (the first
chunk stays in registers; later ones are re-read per centroid chunk, from L1/L2).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .arrays import cuda_device_of

# Block sizes: untuned guesses (written on a machine without a GPU); bench/gpu.py times them.
BLOCK_N = 64  # rows per program: (64, BLOCK_D) x tile, (64, BLOCK_K) distance tile
MAX_BLOCK_D = 64  # widest x/centroid column chunk kept in registers
DOT_MIN_D = 16  # tl.dot needs every dimension >= 16
MAX_BLOCK_K_DOT = 64  # (64 x 64) float32 distance tile with the dot path
BROADCAST_ELEMS = 4096  # (BLOCK_N, BLOCK_K, BLOCK_D) product tile of the broadcast path
MAX_GRID_Y = 65535  # CUDA limit on grid axis 1 (here: M)


@triton.jit
def _partial_dot(x, c, USE_DOT: tl.constexpr):
    """x: (BLOCK_N, BLOCK_D), c: (BLOCK_K, BLOCK_D) -> x @ c.T, (BLOCK_N, BLOCK_K) float32."""
    if USE_DOT:
        xc = tl.dot(x, tl.trans(c), input_precision="ieee")
    else:
        xc = tl.sum(x[:, None, :] * c[None, :, :], axis=2)
    return xc


@triton.jit
def _assign_kernel(
    x_ptr,
    c_ptr,
    out_ptr,
    n,
    M,
    K,
    ds,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    USE_DOT: tl.constexpr,
):
    """Codes of BLOCK_N rows for one subspace.

    Args:
        x_ptr: pointer to the vectors, shape=(n, M * ds), float32, contiguous.
        c_ptr: pointer to the centroids, shape=(M, K, ds), float32, contiguous.
        out_ptr: pointer to the codes, shape=(n, M), uint8, contiguous (written).
        n, M, K, ds: sizes.
        BLOCK_N: rows per program; BLOCK_K: centroids per chunk; BLOCK_D: sub-vector columns
            per chunk (ds rounded up to a power of two, at most MAX_BLOCK_D);
        USE_DOT: tl.dot (BLOCK_D >= 16) or a broadcast multiply-sum.
    """
    pid_n = tl.program_id(0)
    m = tl.program_id(1)
    rows = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_r = rows < n
    rows64 = rows.to(tl.int64)  # n * D passes 2**31 at a few million rows
    offs_k = tl.arange(0, BLOCK_K)
    offs_d = tl.arange(0, BLOCK_D)
    D = M * ds
    x_rows = x_ptr + rows64[:, None] * D + m * ds  # (BLOCK_N, 1) pointers to x[rows, m*ds]
    c_m = c_ptr + m * K * ds  # centroids of subspace m, (K, ds)

    # first (usually only) column chunk of the x sub-block, loaded once
    x0 = tl.load(x_rows + offs_d[None, :], mask=mask_r[:, None] & (offs_d < ds)[None, :], other=0.0)

    best = tl.full((BLOCK_N,), float("inf"), dtype=tl.float32)
    best_k = tl.zeros((BLOCK_N,), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        mask_k = kk < K
        c_rows = c_m + kk[:, None] * ds  # (BLOCK_K, 1)
        c = tl.load(c_rows + offs_d[None, :], mask=mask_k[:, None] & (offs_d < ds)[None, :], other=0.0)
        cnorm = tl.sum(c * c, axis=1)  # (BLOCK_K,)
        xc = _partial_dot(x0, c, USE_DOT)  # (BLOCK_N, BLOCK_K)
        for d0 in range(BLOCK_D, ds, BLOCK_D):  # no iterations when ds <= BLOCK_D
            cols = d0 + offs_d
            mask_d = cols < ds
            xj = tl.load(x_rows + cols[None, :], mask=mask_r[:, None] & mask_d[None, :], other=0.0)
            cj = tl.load(c_rows + cols[None, :], mask=mask_k[:, None] & mask_d[None, :], other=0.0)
            cnorm += tl.sum(cj * cj, axis=1)
            xc += _partial_dot(xj, cj, USE_DOT)
        dist = cnorm[None, :] - 2.0 * xc  # ||x - c||^2 - ||x||^2
        dist = tl.where(mask_k[None, :], dist, float("inf"))  # padding centroids never win
        chunk_min, chunk_arg = tl.min(dist, axis=1, return_indices=True, return_indices_tie_break_left=True)
        better = chunk_min < best  # strict: an earlier chunk (smaller k) keeps a tie
        best = tl.where(better, chunk_min, best)
        best_k = tl.where(better, chunk_arg + k0, best_k)

    tl.store(out_ptr + rows64 * M + m, best_k.to(tl.uint8), mask=mask_r)


def _block_sizes(K: int, ds: int) -> tuple[int, int, bool]:
    """(BLOCK_K, BLOCK_D, USE_DOT) for a call; see the constants above."""
    block_d = min(MAX_BLOCK_D, triton.next_power_of_2(ds))
    use_dot = block_d >= DOT_MIN_D
    if use_dot:
        block_k = max(DOT_MIN_D, min(MAX_BLOCK_K_DOT, triton.next_power_of_2(K)))
    else:
        block_k = max(1, min(triton.next_power_of_2(K), BROADCAST_ELEMS // (BLOCK_N * block_d)))
    return block_k, block_d, use_dot


def assign_triton(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Nearest centroid per subspace, on the tensors' device.

    Args:
        x: shape=(n, D), float32.
        centroids: shape=(M, K, ds), float32, D = M * ds, K <= 256.

    Returns:
        codes: shape=(n, M), uint8 (ties: smallest k).
    """
    if x.ndim != 2 or centroids.ndim != 3 or x.shape[1] != centroids.shape[0] * centroids.shape[2]:
        raise ValueError(
            f"expected x (n, M * ds) and centroids (M, K, ds), got {tuple(x.shape)} and {tuple(centroids.shape)}"
        )
    if x.dtype != torch.float32 or centroids.dtype != torch.float32:
        raise TypeError(f"expected float32 x and centroids, got {x.dtype} and {centroids.dtype}")
    if x.device != centroids.device:
        raise ValueError(f"x is on {x.device} but centroids are on {centroids.device}")
    M, K, ds = centroids.shape
    if K > 256:
        raise ValueError(f"K={K} centroids per sub-quantizer do not fit uint8 codes (at most 256)")
    x = x.contiguous()
    centroids = centroids.contiguous()
    n = x.shape[0]
    out = torch.empty((n, M), dtype=torch.uint8, device=x.device)
    if n == 0:
        return out
    block_k, block_d, use_dot = _block_sizes(K, ds)
    with cuda_device_of(x):
        for m0 in range(0, M, MAX_GRID_Y):  # one iteration unless M > 65535
            m1 = min(M, m0 + MAX_GRID_Y)
            grid = (triton.cdiv(n, BLOCK_N), m1 - m0)
            _assign_kernel[grid](
                x[:, m0 * ds :], centroids[m0:m1], out[:, m0:],
                n, M, K, ds,
                BLOCK_N=BLOCK_N, BLOCK_K=block_k, BLOCK_D=block_d, USE_DOT=use_dot,
            )
    return out
