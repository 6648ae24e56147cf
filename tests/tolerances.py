"""One tolerance table for float comparisons, scaled by the reduction length (FlagGems style).

A float32 sum of n terms of magnitude ~1 carries an error of ~n * eps relative to its scale;
atol = base_atol * reduction_length, rtol fixed per dtype.
"""
import numpy as np
import torch

RTOL = {torch.float32: 1e-5, torch.float64: 1e-10, np.float32: 1e-5, np.float64: 1e-10}
ATOL_PER_TERM = {torch.float32: 2e-6, torch.float64: 1e-12, np.float32: 2e-6, np.float64: 1e-12}


def assert_close(actual, expected, reduction_length=1, dtype=np.float32, scale=1.0, msg=""):
    """Compare floats with atol = ATOL_PER_TERM * reduction_length * scale."""
    a = actual.detach().cpu().numpy() if isinstance(actual, torch.Tensor) else np.asarray(actual)
    e = expected.detach().cpu().numpy() if isinstance(expected, torch.Tensor) else np.asarray(expected)
    assert a.shape == e.shape, f"{msg} shape {a.shape} != {e.shape}"
    atol = ATOL_PER_TERM[dtype] * max(1, reduction_length) * scale
    np.testing.assert_allclose(a, e, rtol=RTOL[dtype], atol=atol, err_msg=msg)


def assert_equal(actual, expected, msg=""):
    a = actual.detach().cpu().numpy() if isinstance(actual, torch.Tensor) else np.asarray(actual)
    e = expected.detach().cpu().numpy() if isinstance(expected, torch.Tensor) else np.asarray(expected)
    assert a.shape == e.shape, f"{msg} shape {a.shape} != {e.shape}"
    np.testing.assert_array_equal(a, e, err_msg=msg)
