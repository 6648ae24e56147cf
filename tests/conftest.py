"""Test setup: run Triton kernels under the CPU interpreter.

The kernel tests feed CPU arrays to every backend, so the Triton cases run under
TRITON_INTERPRET=1 on every machine, a CUDA one too (export TRITON_INTERPRET=0 to skip them
there); the check of the compiled kernels on a GPU is `python bench/gpu.py`. TRITON_INTERPRET
must be set before `import triton`, so it is set here, before any test module imports
jpq.kernels' Triton files.
"""
import os
from pathlib import Path

import pytest

os.environ.setdefault("TRITON_INTERPRET", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


def pytest_configure(config):
    config.addinivalue_line("markers", "interpreter: Triton kernel test run under TRITON_INTERPRET=1")
    config.addinivalue_line("markers", "slow: longer end-to-end tests")


@pytest.fixture
def rng():
    import numpy as np

    return np.random.default_rng(1234)
