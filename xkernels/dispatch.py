"""The one place that decides whether an op runs its Triton kernel or its PyTorch reference.

Rules (``XKERNELS_BACKEND`` = ``auto`` by default):

* ``auto``   -- CUDA tensors run the Triton kernels; CPU tensors run the PyTorch reference,
  unless ``TRITON_INTERPRET=1`` is set, in which case CPU tensors run the Triton kernels through
  Triton's interpreter (this is how CI exercises the kernels without a GPU).
* ``triton`` -- always the Triton kernels; a CPU tensor without the interpreter is an error.
* ``torch``  -- always the PyTorch reference.

``TRITON_INTERPRET`` must be set before ``xkernels`` is imported: Triton decides at decoration time
whether a ``@triton.jit`` function is compiled or interpreted.

Kernels never re-implement this decision; every public op calls :func:`use_triton`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

BACKENDS = ("auto", "triton", "torch")
_override: str | None = None


try:  # once, at import: a plain bool keeps use_triton() traceable by torch.compile (no cache wrapper)
    import triton  # noqa: F401

    _TRITON_IMPORTS = True
except ImportError:
    _TRITON_IMPORTS = False


def triton_available() -> bool:
    """True when the ``triton`` package imports (it ships for Linux only)."""
    return _TRITON_IMPORTS


def interpreting() -> bool:
    """True when Triton kernels execute through the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def compiling() -> bool:
    """True while ``torch.compile`` traces the caller (ops then use their custom-op form, skip host syncs)."""
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and hasattr(compiler, "is_compiling") and compiler.is_compiling())


def backend() -> str:
    """The requested backend: a :func:`force_backend` override, else ``XKERNELS_BACKEND``, else ``auto``."""
    name = _override if _override is not None else os.environ.get("XKERNELS_BACKEND", "auto").lower()
    if name not in BACKENDS:
        raise ValueError(f"XKERNELS_BACKEND must be one of {BACKENDS}, got {name!r}")
    return name


@contextlib.contextmanager
def force_backend(name: str) -> Iterator[None]:
    """Temporarily force a backend (``"auto"``, ``"triton"`` or ``"torch"``) for the ops called inside."""
    global _override
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    previous, _override = _override, name
    try:
        yield
    finally:
        _override = previous


def use_triton(tensor: torch.Tensor) -> bool:
    """Whether an op on ``tensor`` (its main input) should launch the Triton kernel."""
    choice = backend()
    if choice == "torch":
        return False
    can_run = triton_available() and (tensor.device.type == "cuda" or (tensor.device.type == "cpu" and interpreting()))
    if choice == "triton" and not can_run:
        raise RuntimeError(
            f"XKERNELS_BACKEND=triton but the input is on {tensor.device} and "
            + ("triton is not installed" if not triton_available() else "TRITON_INTERPRET=1 is not set")
            + "; use a CUDA tensor, set TRITON_INTERPRET=1 before importing xkernels, or use the torch backend"
        )
    return can_run


def launch_on(tensor: torch.Tensor) -> contextlib.AbstractContextManager:
    """``with launch_on(x): kernel[grid](...)`` -- makes ``x``'s GPU the current device for the launch.

    Triton launches on the *current* CUDA device, not on the device of the pointers it is given: a process
    that drives two GPUs (or calls an op on ``cuda:1`` while ``cuda:0`` is current) would otherwise launch
    on the wrong one.  A no-op (``nullcontext``) for CPU tensors (the interpreter)."""
    if tensor.device.type == "cuda":
        return torch.cuda.device(tensor.device)
    return contextlib.nullcontext()
