"""Batched codebook assignment (PQ encode): the code of each sub-vector is its nearest centroid.

    codes[n, m] = argmin_k || x[n, m*ds:(m+1)*ds] - centroids[m, k] ||^2     (ties: smallest k)

Paths behind `assign()`:
- `assign_reference`: NumPy, float64, the oracle.
- `_assign_cpu`: numba, fused distance + argmin, vectorised across a block of rows (SIMD lanes
  hold rows, the loop runs over centroids), specialised per sub-vector length `ds` so the
  inner dot product unrolls. Never materialises the (n, M, K) distance block that made a torch
  `baddbmm + argmin` encoder 5.6x slower than faiss. Measured on the 2-core dev CPU
  (AVX-512), n=200k, D=768, M=96, K=256: 0.83 s vs faiss `compute_codes` 2.1 s.
- `_assign_triton`: Triton kernel for CUDA (and the CPU interpreter in tests).
"""
from __future__ import annotations

import functools

import numba as nb
import numpy as np
import torch

from .arrays import FASTMATH, array_kind, check_float_matrix, to_numpy_f32
from .dispatch import resolve_backend

MAX_K = 256  # codes are uint8


def check_centroids(centroids, name: str = "centroids", values: bool = True):
    """Validate centroids of shape (M, K, ds) with 1 <= K <= 256 (and finite, with `values`)."""
    check_float_matrix(name, centroids, ndim=3, values=values)
    M, K, ds = centroids.shape
    if M < 1 or K < 1 or ds < 1:
        raise ValueError(f"{name} must have shape (M, K, ds) with all sizes >= 1, got {tuple(centroids.shape)}")
    if K > MAX_K:
        raise ValueError(f"{name} has K={K} centroids per sub-quantizer; at most {MAX_K} (8-bit codes)")
    return centroids


def check_vectors_for(name: str, x, centroids, values: bool = True):
    """Validate x (n, D) against centroids (M, K, ds): D must equal M * ds (and x finite, with
    `values`)."""
    check_float_matrix(name, x, values=values)
    M, _, ds = centroids.shape
    if x.shape[1] != M * ds:
        raise ValueError(
            f"{name} has dimension {x.shape[1]}, but centroids (M={M}, ds={ds}) expect D = M * ds = {M * ds}"
        )
    return x


# --------------------------------------------------------------------------- reference
def assign_reference(x: np.ndarray, centroids: np.ndarray, chunk: int = 256) -> np.ndarray:
    """NumPy oracle. x: shape=(n, D) float; centroids: shape=(M, K, ds) float -> (n, M) uint8.

    Loop form:  for n, m: codes[n, m] = argmin_k sum_j (x[n, m*ds + j] - centroids[m, k, j])**2
    """
    x = np.asarray(x, dtype=np.float64)
    C = np.asarray(centroids, dtype=np.float64)
    M, K, ds = C.shape
    n = x.shape[0]
    codes = np.empty((n, M), dtype=np.uint8)
    for s in range(0, n, chunk):  # chunked only to bound memory at (chunk, M, K, ds)
        xs = x[s : s + chunk].reshape(-1, M, 1, ds)
        dist = ((xs - C[None]) ** 2).sum(-1)  # (chunk, M, K)
        codes[s : s + chunk] = dist.argmin(-1)  # argmin returns the first (smallest k) minimum
    return codes


# --------------------------------------------------------------------------- CPU fast path
ROWS_PER_BLOCK = 32  # SIMD lanes x 2 registers at AVX-512 float32; 16 and 64 measured slower


@functools.lru_cache(maxsize=None)
def _assign_kernel_for(ds: int):
    """numba kernel specialised for sub-vector length `ds` (a compile-time constant)."""
    R = ROWS_PER_BLOCK

    @nb.njit(parallel=True, fastmath=FASTMATH, cache=True)
    def kernel(x, centroids, cnorm, out):
        # x (n, M*ds) f32; centroids (M, K, ds) f32; cnorm (M, K) f32 = ||c||^2; out (n, M) u8
        n = x.shape[0]
        M, K, _ = centroids.shape
        nblocks = (n + R - 1) // R
        for b in nb.prange(nblocks):
            s = b * R
            rows = min(n, s + R) - s
            xb = np.zeros((ds, R), np.float32)  # -2 * x, rows in lanes
            best = np.empty(R, np.float32)
            best_k = np.empty(R, np.float32)  # float lanes keep the select vectorised
            for m in range(M):
                for j in range(ds):
                    for r in range(rows):
                        xb[j, r] = -2.0 * x[s + r, m * ds + j]
                best[:] = np.inf
                best_k[:] = 0.0
                for k in range(K):
                    cn = cnorm[m, k]
                    kf = np.float32(k)
                    for r in range(R):
                        # ||x - c||^2 - ||x||^2 = ||c||^2 - 2 x.c  (||x||^2 is the same for all k)
                        d = cn
                        for j in range(ds):
                            d += xb[j, r] * centroids[m, k, j]
                        better = d < best[r]
                        best[r] = d if better else best[r]
                        best_k[r] = kf if better else best_k[r]
                for r in range(rows):
                    out[s + r, m] = np.uint8(best_k[r])

    return kernel


def _assign_cpu(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    x = to_numpy_f32(x)
    C = to_numpy_f32(centroids)
    M, K, ds = C.shape
    out = np.empty((x.shape[0], M), dtype=np.uint8)
    if x.shape[0]:
        cnorm = np.ascontiguousarray((C.astype(np.float64) ** 2).sum(-1), dtype=np.float32)
        _assign_kernel_for(ds)(x, C, cnorm, out)
    return out


# --------------------------------------------------------------------------- Triton
def _assign_triton(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    from .assign_triton import assign_triton

    return assign_triton(x, centroids)


# --------------------------------------------------------------------------- public
def assign(x, centroids, backend: str = "auto"):
    """Encode vectors with a product quantizer.

    Args:
        x: shape=(n, D), float32 (NumPy array or torch tensor).
        centroids: shape=(M, K, ds), float32, with D = M * ds and K <= 256.
        backend: "auto" | "triton" | "cpu" | "reference".

    Returns:
        codes: shape=(n, M), uint8, in the kind (and on the device) of `x`.
    """
    kind = array_kind(x=x, centroids=centroids)
    check_centroids(centroids)
    check_vectors_for("x", x, centroids)
    path = resolve_backend(backend, kind)
    if path == "triton":
        xt = kind.wrap(x).float().contiguous() if kind.is_torch else torch.from_numpy(to_numpy_f32(x))
        ct = centroids.float().contiguous() if kind.is_torch else torch.from_numpy(to_numpy_f32(centroids))
        return kind.wrap(_assign_triton(xt, ct))
    if path == "reference":
        return kind.wrap(assign_reference(to_numpy_f32(x), to_numpy_f32(centroids)))
    return kind.wrap(_assign_cpu(x, centroids))
