"""jpq.kernels: PQ hot paths (ADC scoring with top-k, codebook assignment, fused
straight-through quantize-and-score), each with a NumPy reference, a CPU fast path and a
Triton kernel, chosen by `backend="auto" | "triton" | "cpu" | "reference"`."""

if __name__ == "kernels":
    # This folder is installed as `jpq.kernels` only. It is imported as a top-level `kernels`
    # by accident alone: the repository root is on sys.path (`python -m jpq ...` or
    # `python -m pytest` run there, or a shell started there) and the folder then shadows the
    # PyPI package `kernels`, which transformers (so sentence-transformers, the default encoder)
    # imports. Hand that import over to the installed package, as if the root were not there.
    import importlib.machinery as _machinery
    import importlib.util as _util
    import os as _os
    import sys as _sys

    _root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    _path = [p for p in _sys.path if _os.path.abspath(p or _os.curdir) != _root]
    _spec = _machinery.PathFinder.find_spec("kernels", _path)
    if _spec is None:
        raise ImportError(
            f"'kernels' resolved to {_os.path.dirname(_os.path.abspath(__file__))}, the source of jpq.kernels "
            "(import it as jpq.kernels); no other package named 'kernels' is installed",
            name="kernels")
    _module = _util.module_from_spec(_spec)
    _sys.modules["kernels"] = _module  # the import statement returns what sys.modules holds
    _spec.loader.exec_module(_module)
else:
    from .adc import adc_scores, adc_topk, build_lut
    from .assign import assign
    from .dispatch import BACKENDS, available_backends
    from .ste import quantize_and_score

    __all__ = ["build_lut", "adc_scores", "adc_topk", "assign", "quantize_and_score", "BACKENDS",
               "available_backends"]
