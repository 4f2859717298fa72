"""FP8 formats, granularities and the scale convention shared by every FP8 op.

Scale convention (the one ``torch._scaled_mm`` and Transformer Engine's ``scale_inv`` use): a quantised
tensor is the pair ``(q, s)`` with ``x ≈ q.float() * s``; ``s = max(amax, AMAX_EPS) / fp8_max`` is stored in
fp32 and the GEMM multiplies its accumulator by ``s`` directly. Quantising is
``q = fp8(clamp(x * (1 / s), ±fp8_max))``: one IEEE reciprocal per scaling group, a multiply per element,
round-to-nearest-even (see :mod:`xkernels.fp8.quant` for why).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

E4M3 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2
FP8_DTYPES = (E4M3, E5M2)

# Side of a scaling block: 1x128 groups along K for activations/gradients, 128x128 tiles for weights
# (DeepSeek-V3's recipe). Kernels tile by the same number so that a block never straddles two programs.
BLOCK = 128
GRANULARITIES = ("tensor", "row", "block_1x128", "block_128x128")

# Floor on amax so that an all-zero tensor/row/block gets a finite, non-zero scale (torchao uses the same).
AMAX_EPS = 1e-12


@dataclass(frozen=True)
class FP8Format:
    dtype: torch.dtype
    max: float  # largest finite value; quantisation saturates here
    mantissa_bits: int
    min_exponent: int  # exponent of the smallest normal number (subnormal spacing is 2**(min_exponent - mantissa_bits))


FORMATS = {
    E4M3: FP8Format(E4M3, 448.0, 3, -6),
    E5M2: FP8Format(E5M2, 57344.0, 2, -14),
}


def fp8_format(dtype: torch.dtype, name: str = "fp8_dtype") -> FP8Format:
    """The :class:`FP8Format` of ``dtype``; a ``TypeError`` naming ``name`` for anything but E4M3/E5M2."""
    if dtype not in FORMATS:
        raise TypeError(f"{name} must be torch.float8_e4m3fn or torch.float8_e5m2, got {dtype}")
    return FORMATS[dtype]


def fp8_max(dtype: torch.dtype) -> float:
    return fp8_format(dtype).max


def check_granularity(granularity: str) -> str:
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    return granularity


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def scale_shape(rows: int, cols: int, granularity: str) -> tuple[int, ...]:
    """Shape of the scale tensor that quantising a ``(rows, cols)`` matrix at ``granularity`` produces."""
    check_granularity(granularity)
    if granularity == "tensor":
        return ()
    if granularity == "row":
        return (rows, 1)
    if granularity == "block_1x128":
        return (rows, cdiv(cols, BLOCK))
    return (cdiv(rows, BLOCK), cdiv(cols, BLOCK))

