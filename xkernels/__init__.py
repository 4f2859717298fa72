"""xkernels: Triton kernels for fast small-LM training, each with a PyTorch reference.

CUDA tensors run the Triton kernels, CPU tensors the PyTorch references (or the kernels through
Triton's interpreter when ``TRITON_INTERPRET=1``); see :mod:`xkernels.dispatch`.
"""

from xkernels._checks import check_inputs
from xkernels.dispatch import force_backend, launch_on, use_triton

# --- public ops (one line per module; keep alphabetical within each group) ---
from xkernels.rmsnorm import RMSNorm, add_rms_norm, add_rms_norm_ref, rms_norm, rms_norm_bwd_ref, rms_norm_ref
from xkernels.layernorm import LayerNorm, layer_norm, layer_norm_bwd_ref, layer_norm_ref
from xkernels.rotary import apply_rotary, apply_rotary_pos_emb, apply_rotary_ref, rotary_cos_sin
from xkernels.cross_entropy import linear_cross_entropy, linear_cross_entropy_ref
from xkernels.cross_entropy import cross_entropy, cross_entropy_ref  # (hides the module attribute: import_module it)
from xkernels.patching import PatchReport, patch
from xkernels.newton_schulz import newton_schulz, newton_schulz_ref
from xkernels.swiglu import geglu, geglu_fused, geglu_fused_ref, geglu_ref, swiglu, swiglu_fused, swiglu_fused_ref, swiglu_ref
from xkernels import fp8  # subpackage: from xkernels.fp8 import FP8Linear, convert_to_fp8, quantize, fp8_gemm, FP8Recipe

__all__ = [
    "check_inputs",
    "force_backend",
    "launch_on",
    "use_triton",
    "RMSNorm",
    "add_rms_norm",
    "add_rms_norm_ref",
    "rms_norm",
    "rms_norm_bwd_ref",
    "rms_norm_ref",
    "LayerNorm",
    "layer_norm",
    "layer_norm_bwd_ref",
    "layer_norm_ref",
    "apply_rotary",
    "apply_rotary_pos_emb",
    "apply_rotary_ref",
    "rotary_cos_sin",
    "linear_cross_entropy",
    "cross_entropy",
    "cross_entropy_ref",
    "linear_cross_entropy_ref",
    "PatchReport",
    "patch",
    "newton_schulz",
    "newton_schulz_ref",
    "swiglu",
    "swiglu_fused",
    "swiglu_fused_ref",
    "swiglu_ref",
    "geglu",
    "geglu_fused",
    "geglu_fused_ref",
    "geglu_ref",
    "fp8",
]
__version__ = "0.1.0"
