"""Launch guard: run a launcher on its tensors' GPU (private to xkernels.fp8; a shared helper may replace it)."""

from __future__ import annotations

import contextlib

import torch


def on_device(t: torch.Tensor):
    """``torch.cuda.device(t.device)`` for a CUDA tensor, a no-op context otherwise.

    Triton launches on the *current* CUDA device and torch allocates there for ``device="cuda"``; a process that
    drives two GPUs (or a caller whose current device differs from the tensor's) would otherwise launch the
    kernel on the wrong GPU.
    """
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()
