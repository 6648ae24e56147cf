"""Triton ADC gather kernel: scores[q, n] = sum_m lut[q, m, codes[n, m]].

Kept apart from adc.py so that `import jpq` never needs triton; adc.py imports this lazily. The
fused straight-through op (ste_triton.py) launches the same kernel for its forward, with given
(query, candidate) pairs.

One program scores one query against BLOCK_N documents (or BLOCK_N of the query's candidates):
it loads the code tile codes[docs, m0:m0+BLOCK_M] in the codes' native (N, M) row-major layout
(each row gives BLOCK_M contiguous bytes), gathers lut[q, m, code] for it and sums over the
subspace axis, BLOCK_M subspaces per step. Codes are never transposed: that would cost an extra
read and write of all N * M bytes per call, 3x the kernel's own code traffic at nq = 1.
Grid: (document blocks, queries), documents on axis 0 (launched fastest), so the programs
resident at one time share one query's LUT (M * K * 4 bytes: 96 KB at M = 96, K = 256), which
stays in L1.

Measured on an H100 (bench/results/gpu.md, 2026-11-28, Triton 3.6):
- This kernel at BLOCK_N = 128, BLOCK_M = 32, 4 warps is exact (float32 rounding) at M = 96, 48
  and 3: it is the forward of the fused straight-through op, checked there against float64.
- Two other tilings gave wrong scores on the card although the CPU interpreter found them exact:
  the first version's (4 queries x 256 documents x 4 subspaces) tile at M = 3, K = 256, and a
  1-D grouped launch order with (256 x 32) tiles at every M. An H200 run (2026-12-04) narrowed
  it down: wrong exactly when one thread holds several document rows of a tile with several
  subspaces (BLOCK_N > 32 * num_warps and BLOCK_M > 1), at every size tried; `_config` refuses
  those tilings. The block-size sweep in bench/gpu.py (`--sweep`) checks every tiling against
  float64 before timing it.
- Speed: run 2's sweep timed one-query-per-program tilings (in the 1-D grouped order, which was
  within 5% of this 2-D order; their results were not checked against float64 there):
  128 x 32 tiles, 1M codes, M = 96: 0.075 ms at 1 query, 3.6 ms at 64 queries (plain torch
  43 ms); 1024 queries 55-58 ms with 256 x 32 tiles (torch 963 ms). The first version
  (4 queries per program) took 24 ms and 385 ms there: 4 queries' LUTs do not fit L1.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .arrays import cuda_device_of, is_interpreter

BLOCK_N = 128  # documents (candidates) per program; 256 gave wrong results on an H100, see above
MAX_BLOCK_M = 32  # subspaces per step: one 32-byte sector of codes per document row
NUM_WARPS = 4
MAX_GRID_Y = 65535  # CUDA limit on grid axis 1; queries beyond it are launched in chunks


@triton.jit
def pair_rows(idx_ptr, P, PAIRS: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's query row b (int64: B * P and N * M can pass 2**31), its BLOCK_N candidate
    columns, their in-bounds mask and each candidate's document row (idx[b, p] when PAIRS, else
    p). Grid: (candidate blocks, queries); shared by every kernel `launch_pairs` launches."""
    b = tl.program_id(1).to(tl.int64)
    # int64 before the product: with P >= 2**31 candidates (2**31 documents of 16 bytes fit on one
    # GPU) an int32 block offset wraps negative, which the `< P` mask would not catch
    offs_p = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_p = offs_p < P
    if PAIRS:
        docs = tl.load(idx_ptr + b * P + offs_p, mask=mask_p, other=0)
    else:
        docs = offs_p.to(tl.int64)
    return b, offs_p, mask_p, docs


@triton.jit
def _adc_gather_kernel(
    lut_ptr, codes_ptr, idx_ptr, out_ptr, B, P, M, K,
    PAIRS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """out[b, p] = sum_m lut[b, m, codes[doc(b, p), m]], doc(b, p) = idx[b, p] (PAIRS) or p;
    one program per (query b, BLOCK_N candidates).

    Args:
        lut_ptr: look-up tables, shape=(B, M, K), float32, contiguous.
        codes_ptr: PQ codes, shape=(N, M), uint8, contiguous, values < K.
        idx_ptr: doc_index, shape=(B, P), int64, contiguous (read only when PAIRS).
        out_ptr: scores, shape=(B, P), float32, contiguous (written); P = N without PAIRS.
        B, P, M, K: sizes.
        PAIRS: candidates given per query by idx (else every document, p = n).
        BLOCK_N, BLOCK_M: candidates per program and subspaces per step.
    """
    b, offs_p, mask_p, docs = pair_rows(idx_ptr, P, PAIRS, BLOCK_N)
    acc = _gather_sum(lut_ptr + b * M * K, codes_ptr, docs, mask_p, M, K, BLOCK_N, BLOCK_M)
    tl.store(out_ptr + b * P + offs_p, acc, mask=mask_p)


@triton.jit
def _gather_sum(lut_b, codes_ptr, docs, mask_n, M, K, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
    """(BLOCK_N,) float32: sum_m lut_b[m, codes[docs, m]] for one query's (M, K) table lut_b,
    BLOCK_M subspaces per step (0 where mask_n is off). The one summation order of the ADC
    kernels: `_adc_gather_kernel` and `_adc_block_topk_kernel` give bitwise the same scores."""
    offs_m = tl.arange(0, BLOCK_M)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        m = m0 + offs_m
        mask = mask_n[:, None] & (m < M)[None, :]  # (BLOCK_N, BLOCK_M)
        code = tl.load(codes_ptr + docs[:, None] * M + m[None, :], mask=mask, other=0)
        vals = tl.load(lut_b + m[None, :] * K + code.to(tl.int32), mask=mask, other=0.0)
        acc += tl.sum(vals, axis=1)
    return acc


@triton.jit
def _adc_block_topk_kernel(
    lut_ptr, codes_ptr, scale_ptr, keys_ptr, N, M, K, id_base, n_blocks, keep,
    LARGEST: tl.constexpr, HAS_SCALE: tl.constexpr, SORT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Top-`keep` order keys of each block of BLOCK_N documents, for one query per program.

    Scores as `_adc_gather_kernel` (`_gather_sum`: the same tile and summation order), times
    scale[doc] when HAS_SCALE, then the int64 key of `adc.order_keys` (the score's bits, made
    to order like the float, in the high half; 2**32 - 1 - (id_base + doc) in the low half), so
    descending key order is best score first, then smaller id. With SORT the block's keys are
    sorted (descending) and the first `keep` stored; else (keep = BLOCK_N) all are. A padding
    position past N gets INT64_MIN (no real key is that low: its low half is >= 1). The top-k of
    all blocks' kept keys is the exact top-k of all documents whenever keep >= min(k, BLOCK_N):
    a document of the top-k has fewer than k better documents, in its block too.

    Args:
        lut_ptr: shape=(B, M, K), float32; codes_ptr: shape=(N, M), uint8;
        scale_ptr: shape=(N,), float32 (read when HAS_SCALE);
        keys_ptr: shape=(B, n_blocks * keep), int64 (written).
    """
    b = tl.program_id(1).to(tl.int64)
    blk = tl.program_id(0)
    offs = tl.arange(0, BLOCK_N)
    docs = blk.to(tl.int64) * BLOCK_N + offs
    mask_n = docs < N
    acc = _gather_sum(lut_ptr + b * M * K, codes_ptr, docs, mask_n, M, K, BLOCK_N, BLOCK_M)
    if HAS_SCALE:
        acc = acc * tl.load(scale_ptr + docs, mask=mask_n, other=1.0)
    if not LARGEST:
        acc = -acc
    acc = acc + 0.0  # -0.0 becomes +0.0, which it equals
    bits = acc.to(tl.int32, bitcast=True)
    ordered = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).to(tl.int64)
    low = tl.full((BLOCK_N,), 4294967295, tl.int64) - (id_base + docs)
    pad = tl.full((BLOCK_N,), -9223372036854775807, tl.int64) - 1  # INT64_MIN: below every real key
    key = tl.where(mask_n, (ordered << 32) | low, pad)
    if SORT:
        key = tl.sort(key, descending=True)
    tl.store(keys_ptr + b * n_blocks * keep + blk * keep + offs, key, mask=offs < keep)


def _config(M: int, config: dict | None) -> dict:
    """Block sizes and warps of one launch; `config` overrides them (bench/gpu.py --sweep).

    Raises ValueError for a tiling the H200 computed wrong: more than one document row per
    thread (BLOCK_N > 32 * num_warps) with more than one subspace per step (BLOCK_M > 1). On
    2026-12-04 (Triton 3.6, bench/results/gpu_profile.md section 4, and the --sweep in
    gpu.md) every such tiling tried (128 x 32 and 128 x 8 with 2 warps, 64 x 32 with 1,
    256 x {2, 8, 16, 32} with 4, 512 x 32 with 8) gave wrong scores at every position, while
    the same BLOCK_N with BLOCK_M = 1, or with enough warps for one row per thread, was exact.
    The CPU interpreter finds all of them exact; the cause (our kernel or the compiler) was not
    isolated.
    """
    cfg = {"BLOCK_N": BLOCK_N, "BLOCK_M": min(MAX_BLOCK_M, triton.next_power_of_2(M)), "num_warps": NUM_WARPS}
    cfg.update(config or {})
    if cfg["BLOCK_N"] > 32 * cfg["num_warps"] and cfg["BLOCK_M"] > 1:
        raise ValueError(
            f"ADC tiling BLOCK_N={cfg['BLOCK_N']}, BLOCK_M={cfg['BLOCK_M']}, num_warps={cfg['num_warps']} "
            "puts several document rows on one thread with several subspaces per step, which gave wrong "
            "scores on an H200: use BLOCK_N <= 32 * num_warps or BLOCK_M = 1"
        )
    return cfg


def launch_pairs(kernel, src, codes, doc_index, dst, B, P, M, K, config: dict | None = None) -> None:
    """Launch a `pair_rows` kernel, signature (src, codes, idx, dst, B, P, M, K, PAIRS, BLOCK_N,
    BLOCK_M), for B queries x P candidates: every document (doc_index None, P = N) or the given
    doc_index (B, P) int64; src and dst have one row per query. Inputs contiguous, on one CUDA
    device (or the interpreter); sizes and dtypes are the callers' to check."""
    if B == 0 or P == 0:
        return
    cfg = _config(M, config)
    pairs = doc_index is not None
    idx = doc_index if pairs else codes  # never read without PAIRS
    with cuda_device_of(src):
        for b0 in range(0, B, MAX_GRID_Y):  # one iteration unless B > 65535 queries
            b1 = min(B, b0 + MAX_GRID_Y)
            grid = (triton.cdiv(P, cfg["BLOCK_N"]), b1 - b0)
            kernel[grid](
                src[b0:b1], codes, idx[b0:b1] if pairs else idx, dst[b0:b1], b1 - b0, P, M, K,
                PAIRS=pairs, BLOCK_N=cfg["BLOCK_N"], BLOCK_M=cfg["BLOCK_M"], num_warps=cfg["num_warps"],
            )


def launch_gather(lut, codes, doc_index, out, config: dict | None = None) -> None:
    """Fill out (B, P) with ADC scores of lut (B, M, K) (see `launch_pairs`)."""
    B, M, K = lut.shape
    launch_pairs(_adc_gather_kernel, lut, codes, doc_index, out, B, out.shape[1], M, K, config)


def adc_scores_triton(lut: torch.Tensor, codes: torch.Tensor, config: dict | None = None) -> torch.Tensor:
    """ADC scores of every query against every code, on the tensors' device.

    Args:
        lut: shape=(nq, M, K), float32, contiguous, K <= 256.
        codes: shape=(N, M), uint8, contiguous, values < K (checked by the caller).
        config: optional overrides of BLOCK_N, BLOCK_M, num_warps (benchmarks).

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
    out = torch.empty((lut.shape[0], codes.shape[0]), dtype=torch.float32, device=lut.device)
    launch_gather(lut, codes, None, out, config)
    return out


def block_keep(k: int, select: bool | None = None) -> int:
    """Keys each BLOCK_N-document block keeps in `adc_block_topk_keys` (see its `select`)."""
    if select is None:
        select = not is_interpreter()
    return min(k, BLOCK_N) if select else BLOCK_N


def adc_block_topk_keys(lut: torch.Tensor, codes: torch.Tensor, k: int, largest: bool,
                        doc_scale: torch.Tensor | None = None, id_base: int = 0,
                        select: bool | None = None) -> torch.Tensor:
    """Candidate top-k keys of every query against codes: each block of BLOCK_N documents keeps
    its best min(k, BLOCK_N) keys (`_adc_block_topk_kernel`; document ids count from id_base).

    Args:
        lut: shape=(nq, M, K), float32, contiguous; codes: shape=(N, M), uint8, contiguous.
        k: results wanted per query (>= 1); largest: True for "ip", False for "l2".
        doc_scale: optional shape=(N,), float32 factors of the scores.
        select: whether blocks keep only their best min(k, BLOCK_N) keys (tl.sort) rather than
            all BLOCK_N. None: yes, except under the CPU interpreter, whose tl.sort takes about
            0.1 s per program (a test of a few hundred programs took a minute); the result is
            the same either way, and tests select explicitly on small shapes.

    Returns:
        keys: shape=(nq, ceil(N / BLOCK_N) * keep), int64, keep = min(k, BLOCK_N) when
        selecting, else BLOCK_N; padding keys are INT64_MIN. Their top-min(k, N) (torch.topk)
        are the top-k documents' keys, exactly.
    """
    nq, M, K = lut.shape
    N = codes.shape[0]
    cfg = _config(M, None)
    keep = block_keep(k, select)
    n_blocks = triton.cdiv(N, cfg["BLOCK_N"])
    keys = torch.empty((nq, n_blocks * keep), dtype=torch.int64, device=lut.device)
    if nq == 0 or N == 0:
        return keys
    scale = doc_scale if doc_scale is not None else lut  # never read without HAS_SCALE
    with cuda_device_of(lut):
        for b0 in range(0, nq, MAX_GRID_Y):
            b1 = min(nq, b0 + MAX_GRID_Y)
            _adc_block_topk_kernel[(n_blocks, b1 - b0)](
                lut[b0:b1], codes, scale, keys[b0:b1], N, M, K, id_base, n_blocks, keep,
                LARGEST=largest, HAS_SCALE=doc_scale is not None, SORT=keep < BLOCK_N,
                BLOCK_N=cfg["BLOCK_N"], BLOCK_M=cfg["BLOCK_M"], num_warps=cfg["num_warps"],
            )
    return keys
