"""jpq.kernels: PQ hot paths (ADC scoring with top-k, codebook assignment, fused
straight-through quantize-and-score), each with a NumPy reference, a CPU fast path and a
Triton kernel, chosen by `backend="auto" | "triton" | "cpu" | "reference"`."""
from .adc import adc_scores, adc_topk, build_lut
from .assign import assign
from .dispatch import BACKENDS, available_backends
from .ste import quantize_and_score

__all__ = ["build_lut", "adc_scores", "adc_topk", "assign", "quantize_and_score", "BACKENDS",
           "available_backends"]
