"""xkernels: Triton kernels for fast small-LM training, each with a PyTorch reference.

CUDA tensors run the Triton kernels, CPU tensors the PyTorch references (or the kernels through
Triton's interpreter when ``TRITON_INTERPRET=1``); see :mod:`xkernels.dispatch`.
"""

from xkernels.dispatch import force_backend, use_triton

# --- public ops (one line per module; keep alphabetical within each group) ---

__all__ = ["force_backend", "use_triton"]
__version__ = "0.1.0"
