"""FP8 training: quantisation kernels, scaled GEMM, FP8Linear and recipes (``from xkernels.fp8 import ...``).

Scales are dequantisation scales (``x ≈ x_fp8 * scale``), see :mod:`xkernels.fp8.formats`.
"""

from xkernels.fp8.formats import BLOCK, E4M3, E5M2, GRANULARITIES, fp8_max, scale_shape
from xkernels.fp8.gemm import fp8_gemm, fp8_gemm_ref
from xkernels.fp8.linear import FP8Linear, convert_from_fp8, convert_to_fp8, te_available
from xkernels.fp8.quant import cast_transpose, cast_transpose_ref, dequantize, quantize, quantize_ref
from xkernels.fp8.recipe import FP8Recipe

__all__ = [
    "BLOCK",
    "E4M3",
    "E5M2",
    "FP8Linear",
    "FP8Recipe",
    "GRANULARITIES",
    "cast_transpose",
    "cast_transpose_ref",
    "convert_from_fp8",
    "convert_to_fp8",
    "dequantize",
    "fp8_gemm",
    "fp8_gemm_ref",
    "fp8_max",
    "quantize",
    "quantize_ref",
    "scale_shape",
    "te_available",
]
