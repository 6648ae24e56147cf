"""Triton ADC score kernel: scores[q, n] = sum_m lut[q, m, codes[n, m]].

Kept apart from adc.py so that `import jpq` never needs triton; adc.py imports this lazily.

Layout choice. Codes stay in their native (N, M) row-major layout and every program loads a
2-D tile codes[n0:n0+BLOCK_N, m0:m0+BLOCK_M]: each document row contributes BLOCK_M
contiguous bytes, so with BLOCK_M = 32 a warp reads whole 32-byte sectors (rows start on
M-byte boundaries; M = 96 is a multiple of 32). Transposing to (M, N) in the launcher would
make a one-subspace load contiguous too, but costs an extra read + write of all N * M code
bytes per call: 3x the code traffic of the kernel itself at nq = 1, the bandwidth-bound case.
The tile is then gathered from the LUT for BLOCK_Q queries at once, (BLOCK_Q, BLOCK_N,
BLOCK_M) floats, and summed over the subspace axis; with BLOCK_M = 1 this is exactly the
textbook "load the codes of subspace m, gather, accumulate, loop over m".

Grid: (document blocks, query blocks), documents on axis 0 (launched fastest), so consecutive
programs share one query block's LUT (BLOCK_Q * M * K * 4 bytes: 384 KB at BLOCK_Q=4, M=96,
K=256), which stays in L2 while the codes stream through once per query block.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# Block sizes: untuned guesses (written on a machine without a GPU); bench/gpu.py times them.
# ELEMS_PER_TILE bounds the gathered (BLOCK_Q, BLOCK_N, BLOCK_M) tile at 4096 floats, i.e.
# 32 registers per thread at num_warps=4, leaving room for the offsets and the accumulator.
ELEMS_PER_TILE = 4096
MAX_BLOCK_M = 32  # one 32-byte sector of codes per document row per step
MAX_BLOCK_Q = 4  # LUT rows of 4 queries share each loaded code tile
MIN_BLOCK_N = 32  # a 32-float (128-byte) output row segment per query
MAX_BLOCK_N = 256
MAX_GRID_Y = 65535  # CUDA limit on grid axis 1; queries beyond it are launched in chunks


@triton.jit
def _adc_scores_kernel(
    lut_ptr,
    codes_ptr,
    out_ptr,
    nq,
    N,
    M,
    K,
    BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """One (BLOCK_Q queries) x (BLOCK_N documents) tile of ADC scores.

    Args:
        lut_ptr: pointer to the look-up tables, shape=(nq, M, K), float32, contiguous.
        codes_ptr: pointer to the PQ codes, shape=(N, M), uint8, contiguous, values < K.
        out_ptr: pointer to the scores, shape=(nq, N), float32, contiguous (written).
        nq, N, M, K: sizes.
        BLOCK_Q, BLOCK_N, BLOCK_M: queries, documents and subspaces per tile.
    """
    pid_n = tl.program_id(0)
    pid_q = tl.program_id(1)
    offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    mask_q = offs_q < nq
    mask_n = offs_n < N
    # int64 offsets: nq * N and N * M can pass 2**31 at a million documents
    rows_q = offs_q.to(tl.int64)
    rows_n = offs_n.to(tl.int64)
    lut_q = lut_ptr + rows_q[:, None, None] * (M * K)  # (BLOCK_Q, 1, 1) pointers

    acc = tl.zeros((BLOCK_Q, BLOCK_N), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        m = m0 + offs_m
        tile_mask = mask_n[:, None] & (m < M)[None, :]  # (BLOCK_N, BLOCK_M)
        codes = tl.load(codes_ptr + rows_n[:, None] * M + m[None, :], mask=tile_mask, other=0)
        lut_off = m[None, :] * K + codes.to(tl.int32)  # (BLOCK_N, BLOCK_M), < M * K
        vals = tl.load(
            lut_q + lut_off[None, :, :],
            mask=mask_q[:, None, None] & tile_mask[None, :, :],
            other=0.0,
        )  # (BLOCK_Q, BLOCK_N, BLOCK_M); masked entries add 0
        acc += tl.sum(vals, axis=2)

    out = out_ptr + rows_q[:, None] * N + rows_n[None, :]
    tl.store(out, acc, mask=mask_q[:, None] & mask_n[None, :])


def _block_sizes(nq: int, M: int) -> tuple[int, int, int]:
    """(BLOCK_Q, BLOCK_N, BLOCK_M) for a call; see the constants above for the reasoning."""
    block_m = min(MAX_BLOCK_M, triton.next_power_of_2(M))
    block_q = min(MAX_BLOCK_Q, triton.next_power_of_2(nq))
    block_n = ELEMS_PER_TILE // (block_q * block_m)
    block_n = max(MIN_BLOCK_N, min(MAX_BLOCK_N, block_n))
    return block_q, block_n, block_m


def adc_scores_triton(lut: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """ADC scores of every query against every code, on the tensors' device.

    Args:
        lut: shape=(nq, M, K), float32, contiguous, K <= 256.
        codes: shape=(N, M), uint8, contiguous, values < K (checked by the caller).

    Returns:
        scores: shape=(nq, N), float32: scores[q, n] = sum_m lut[q, m, codes[n, m]].
    """
    if lut.ndim != 3 or codes.ndim != 2 or codes.shape[1] != lut.shape[1]:
        raise ValueError(
            f"expected lut (nq, M, K) and codes (N, M), got {tuple(lut.shape)} and {tuple(codes.shape)}"
        )
    if lut.dtype != torch.float32 or codes.dtype != torch.uint8:
        raise TypeError(f"expected float32 lut and uint8 codes, got {lut.dtype} and {codes.dtype}")
    if lut.device != codes.device:
        raise ValueError(f"lut is on {lut.device} but codes are on {codes.device}")
    lut = lut.contiguous()
    codes = codes.contiguous()
    nq, M, K = lut.shape
    N = codes.shape[0]
    out = torch.empty((nq, N), dtype=torch.float32, device=lut.device)
    if nq == 0 or N == 0:
        return out
    block_q, block_n, block_m = _block_sizes(nq, M)
    q_chunk = MAX_GRID_Y * block_q
    for q0 in range(0, nq, q_chunk):  # one iteration unless nq > 262k queries
        q1 = min(nq, q0 + q_chunk)
        grid = (triton.cdiv(N, block_n), triton.cdiv(q1 - q0, block_q))
        _adc_scores_kernel[grid](
            lut[q0:q1], codes, out[q0:q1], q1 - q0, N, M, K,
            BLOCK_Q=block_q, BLOCK_N=block_n, BLOCK_M=block_m,
        )
    return out
