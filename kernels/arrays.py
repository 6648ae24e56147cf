"""Input handling shared by every kernel: NumPy-or-torch in, the same kind out.

Following faiss' `contrib/torch_utils.py`, the arguments of one call are all NumPy arrays or all
torch tensors, never mixed. Kernels work internally on whichever representation their path needs;
`ArrayKind` remembers what the caller gave so the result is returned in kind (and on its device).
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import numpy as np
import torch

FLOAT_MAX = float(np.finfo(np.float32).max)
METRICS = ("ip", "l2")


def cuda_device_of(t):
    """Context that makes tensor t's CUDA device the current one (Triton launches a kernel on the
    current device, not on its arguments' device: on a multi-GPU machine a tensor on cuda:1 would
    otherwise be read from cuda:0). A no-op for CPU tensors."""
    if isinstance(t, torch.Tensor) and t.is_cuda:
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


# the values Triton's own boolean knobs read as true (triton.knobs, case-insensitive)
TRUE_ENV_VALUES = ("1", "true", "on", "yes")


def is_interpreter() -> bool:
    """True when Triton kernels run under the CPU interpreter (TRITON_INTERPRET=1): read as Triton
    reads it (`triton.knobs.runtime.interpret` where Triton has it), so TRITON_INTERPRET=false or 2,
    which Triton takes for off, is off here too."""
    try:
        from triton import knobs
        return bool(knobs.runtime.interpret)
    except (ImportError, AttributeError):  # no Triton, or one from before triton.knobs
        return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in TRUE_ENV_VALUES


@dataclass(frozen=True)
class ArrayKind:
    """What the caller passed: NumPy (device None) or torch on `device`."""

    is_torch: bool
    device: torch.device | None = None

    def wrap(self, array):
        """Return `array` (NumPy or torch) in the caller's kind."""
        if self.is_torch:
            if isinstance(array, np.ndarray):
                array = torch.from_numpy(array)
            return array.to(self.device)
        if isinstance(array, torch.Tensor):
            return array.detach().cpu().numpy()
        return array


def array_kind(**arrays) -> ArrayKind:
    """Check that the named arguments are all NumPy or all torch and return that kind."""
    kinds = {}
    for name, value in arrays.items():
        if value is None:
            continue
        if isinstance(value, torch.Tensor):
            kinds[name] = ("torch", value.device)
        elif isinstance(value, np.ndarray):
            kinds[name] = ("numpy", None)
        else:
            raise TypeError(
                f"{name} must be a numpy.ndarray or a torch.Tensor, got {type(value).__name__}"
            )
    found = {k for k, _ in kinds.values()}
    if len(found) > 1:
        desc = ", ".join(f"{n}={k}" for n, (k, _) in kinds.items())
        raise TypeError(f"arguments must be all NumPy arrays or all torch tensors, got {desc}")
    devices = {d for k, d in kinds.values() if k == "torch"}
    if len(devices) > 1:
        raise ValueError(f"torch arguments are on different devices: {sorted(map(str, devices))}")
    if found == {"torch"}:
        return ArrayKind(True, devices.pop())
    return ArrayKind(False)


def check_float_matrix(name: str, x, ndim: int = 2, values: bool = True):
    """Validate a floating array of `ndim` dims; returns it unchanged. With `values`, also that
    every value is finite: a pass over x, which on a CUDA tensor waits for the device (internal
    callers whose inputs are already checked pass values=False)."""
    if x.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
    if isinstance(x, torch.Tensor):
        if not x.dtype.is_floating_point:
            raise TypeError(f"{name} must be a floating tensor (float32 expected), got {x.dtype}")
        if values and x.numel() and not bool(torch.isfinite(x).all()):
            raise ValueError(f"{name} contains NaN or infinite values")
    else:
        if not np.issubdtype(x.dtype, np.floating):
            raise TypeError(f"{name} must be a floating array (float32 expected), got {x.dtype}")
        if values and x.size and not np.isfinite(x).all():
            raise ValueError(f"{name} contains NaN or infinite values")
    return x


TORCH_UNREDUCED_UINTS = tuple(getattr(torch, n) for n in ("uint16", "uint32", "uint64") if hasattr(torch, n))


def check_codes(codes, M: int, K: int, name: str = "codes", values: bool = True):
    """Validate PQ codes: integer (N, M) with every value in [0, K) (the value range, a pass over
    all codes, only with `values`, and only where the dtype allows a value out of range: uint8
    codes with K = 256 need none, other unsigned ones only their maximum)."""
    if codes.ndim != 2:
        raise ValueError(f"{name} must have shape (N, M), got shape {tuple(codes.shape)}")
    if codes.shape[1] != M:
        raise ValueError(f"{name} has {codes.shape[1]} sub-quantizers per row, expected M={M}")
    is_torch = isinstance(codes, torch.Tensor)
    if is_torch:
        if codes.dtype.is_floating_point or codes.dtype == torch.bool:
            raise TypeError(f"{name} must be an integer tensor (uint8 expected), got {codes.dtype}")
        unsigned = codes.dtype == torch.uint8  # the one unsigned integer type torch reduces on every device
        bits = 8 if unsigned else None
    else:
        if not np.issubdtype(codes.dtype, np.integer):
            raise TypeError(f"{name} must be an integer array (uint8 expected), got {codes.dtype}")
        unsigned = np.issubdtype(codes.dtype, np.unsignedinteger)
        bits = 8 * codes.dtype.itemsize
    if not values or (codes.numel() if is_torch else codes.size) == 0:
        return codes
    if unsigned and K >= 2 ** bits:
        return codes  # every value the dtype holds is a valid code
    # torch's uint16 / uint32 / uint64 have no max / min: check a copy as int64 (where a uint64 code of
    # 2**63 or more turns negative, still out of range)
    checked = codes.to(torch.int64) if is_torch and codes.dtype in TORCH_UNREDUCED_UINTS else codes
    hi = int(checked.max())
    if unsigned:
        if hi >= K:
            raise ValueError(f"{name} values must lie in [0, {K}), found a maximum of {hi}")
        return codes
    lo = int(checked.min())
    if lo < 0 or hi >= K:
        raise ValueError(f"{name} values must lie in [0, {K}), found range [{lo}, {hi}]")
    return codes


def check_metric(metric: str) -> str:
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    return metric


def check_int(name: str, value, minimum: int | None = None) -> int:
    """An int (Python or NumPy, not bool or float: nothing is truncated) >= minimum, as int."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_k(k) -> int:
    return check_int("k", k, 1)


def to_numpy_f32(x) -> np.ndarray:
    """C-contiguous float32 NumPy view/copy of a NumPy array or CPU tensor."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        x = (x.float() if x.dtype == torch.bfloat16 else x).numpy()  # NumPy has no bfloat16
    return np.ascontiguousarray(x, dtype=np.float32)


def to_numpy_codes(codes) -> np.ndarray:
    """C-contiguous uint8 NumPy codes (values already checked to fit)."""
    if isinstance(codes, torch.Tensor):
        codes = codes.detach().cpu().numpy()
    return np.ascontiguousarray(codes, dtype=np.uint8)

# numba fast-math flags for every CPU kernel: reassociation and contraction (FMA) let loops
# vectorise; "nnan"/"ninf" are left out on purpose, since heaps and running minima start at -inf/+inf.
FASTMATH = {"reassoc", "contract", "arcp", "nsz", "afn"}
