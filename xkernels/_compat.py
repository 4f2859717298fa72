"""Differences between the torch / Triton versions we support, in one place.

Two stacks are tested (CI runs the whole suite on both): torch 2.13 + Triton 3.9 (the CPU development box) and
torch 2.11 + Triton 3.6 (the H200 image).  Every version-dependent choice in the package lives here, each with a
comment naming the version that needs it; kernels and launchers import the name, never test versions themselves.
"""

from __future__ import annotations

import re

import torch

from xkernels.dispatch import triton_available


def _version(text: str) -> tuple[int, ...]:
    """``"3.6.0+git..."`` -> ``(3, 6, 0)``."""
    return tuple(int(p) for p in re.findall(r"\d+", text.split("+")[0])[:3])


TORCH_VERSION = _version(torch.__version__)
if triton_available():
    import triton

    TRITON_VERSION = _version(triton.__version__)
else:
    TRITON_VERSION = (0, 0, 0)


# ---- GEMM with an fp32 output from half-precision inputs (cross_entropy's dW accumulation) ------------------
# ``torch.addmm(self, mat1, mat2, out_dtype=torch.float32, out=...)`` exists as the aten overload
# ``addmm.dtype_out`` (torch >= 2.8, CUDA only; torch 2.11 accepts an fp32 ``self`` with bf16/fp16 mats).
# Detected from the operator schema rather than a version number.
ADDMM_OUT_DTYPE = any("dtype_out" in str(s) for s in torch._C._jit_get_schemas_for_operator("aten::addmm"))


# --- xkernels.fp8 -------------------------------------------------------------------------------------------------
# torch < 2.13 (seen on 2.11): Dynamo traces an autograd.Function whose forward output comes from plain aten ops on
# fp8 inputs as non-differentiable and feeds its backward a zero gradient (FP8Linear's compiled backward on the
# torch path gave all-zero grads). fp8_gemm's torch path then stays an opaque custom op under torch.compile.
FP8_OPAQUE_TORCH_GEMM = TORCH_VERSION < (2, 13)
