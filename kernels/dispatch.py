"""Pick the path a kernel call runs on.

`backend="auto"` takes Triton for CUDA tensors (when Triton imports) and the CPU fast path
otherwise; an automatic choice that cannot run falls back quietly to the next path. A path the
caller names ("triton", "cpu", "reference") raises if it cannot run.
"""
from __future__ import annotations

import functools

import torch

from .arrays import ArrayKind, is_interpreter

BACKENDS = ("auto", "triton", "cpu", "reference")


@functools.lru_cache(maxsize=None)
def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # ImportError, or a broken install raising at import time
        return False
    return True


def triton_can_run(kind: ArrayKind) -> bool:
    """Triton runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1."""
    if not triton_importable():
        return False
    if kind.is_torch and kind.device is not None and kind.device.type == "cuda":
        return True
    return is_interpreter()


def resolve_backend(backend: str, kind: ArrayKind) -> str:
    """Return the concrete path ("triton", "cpu" or "reference") for this call."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        on_cuda = kind.is_torch and kind.device is not None and kind.device.type == "cuda"
        if on_cuda and triton_can_run(kind):
            return "triton"
        return "cpu"
    if backend == "triton" and not triton_can_run(kind):
        if not triton_importable():
            raise RuntimeError("backend='triton' was requested but triton is not installed")
        raise RuntimeError(
            "backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for the CPU interpreter)"
        )
    return backend


def available_backends() -> list[str]:
    """Backends that can run in this process for CPU inputs (plus triton when CUDA is there)."""
    out = ["reference", "cpu"]
    if triton_importable() and (torch.cuda.is_available() or is_interpreter()):
        out.append("triton")
    return out
