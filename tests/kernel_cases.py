"""Shared helpers for kernel tests: backends to run, random PQ problems, tie-aware checks."""
import numpy as np
import pytest
import torch

from jpq.kernels.arrays import is_interpreter
from jpq.kernels.dispatch import triton_importable


def backend_params():
    """reference, cpu and (when triton imports) triton under the interpreter or on CUDA."""
    triton_mark = [pytest.mark.interpreter]
    if not triton_importable():
        triton_mark.append(pytest.mark.skip(reason="triton is not installed"))
    elif not (torch.cuda.is_available() or is_interpreter()):
        triton_mark.append(pytest.mark.skip(reason="no CUDA device and TRITON_INTERPRET is not set"))
    return [
        pytest.param("reference", id="reference"),
        pytest.param("cpu", id="cpu"),
        pytest.param("triton", id="triton", marks=triton_mark),
    ]


def shrink(n: int, backend: str, cap: int = 300) -> int:
    """Under the Triton interpreter every program runs in Python: keep sizes small."""
    if backend == "triton" and is_interpreter():
        return min(n, cap)
    return n


def random_pq(rng, M, K, ds, N, nq=1):
    """A random PQ problem: centroids (M, K, ds), codes (N, M) uint8, queries (nq, M*ds)."""
    C = rng.standard_normal((M, K, ds)).astype(np.float32)
    codes = rng.integers(0, K, size=(N, M)).astype(np.uint8)
    q = rng.standard_normal((nq, M * ds)).astype(np.float32)
    return C, codes, q


def to_kind(arrays, as_torch):
    if not as_torch:
        return arrays
    return [torch.from_numpy(np.ascontiguousarray(a)) for a in arrays]


def numpy_of(x):
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def assert_topk_matches(D, I, D_ref, I_ref, scores_ref, atol, metric="ip"):
    """Top-k equal up to ties: scores match; ids equal where the reference score is not tied
    within atol with a neighbour (or with the best dropped document); every returned id's true
    score equals its reported score."""
    D, I = numpy_of(D), numpy_of(I)
    assert D.shape == D_ref.shape and I.shape == I_ref.shape
    assert D.dtype == np.float32 and I.dtype == np.int64
    np.testing.assert_array_equal(I < 0, I_ref < 0)
    np.testing.assert_allclose(D, D_ref, rtol=1e-5, atol=atol)
    for qi in range(I.shape[0]):
        valid = I[qi] >= 0
        ids = I[qi][valid]
        assert len(set(ids.tolist())) == len(ids), "duplicate ids in top-k"
        np.testing.assert_allclose(D[qi][valid], scores_ref[qi, ids], rtol=1e-5, atol=atol)
        ref = D_ref[qi][valid]
        dropped = np.delete(scores_ref[qi], I_ref[qi][valid])
        if dropped.size:  # the best document left out bounds the last kept one
            ref = np.append(ref, dropped.max() if metric == "ip" else dropped.min())
        gaps = np.abs(np.diff(ref)) > 2 * atol
        untied = np.ones(len(ref), bool)
        untied[:-1] &= gaps
        untied[1:] &= gaps
        untied = untied[: valid.sum()]
        np.testing.assert_array_equal(ids[untied], I_ref[qi][valid][untied])
