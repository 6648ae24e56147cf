"""jpq: fast product-quantization kernels and JPQ training for compressed dense retrieval."""
__version__ = "0.1.0"

from . import kernels  # noqa: E402
from .index import PQIndex  # noqa: E402

__all__ = ["PQIndex", "kernels", "__version__"]
