"""FP8Linear under FSDP2 (``fully_shard``).

:func:`prepare_fp8_for_fsdp` must run on a model holding :class:`~xkernels.fp8.FP8Linear` layers before (or after)
``fully_shard``: FSDP2 all-gathers each weight into one unsharded parameter whose storage and version counter stay
the same from step to step, so FP8Linear's weight cache (keyed on both) must be off there.
"""

from __future__ import annotations

from torch import nn

from xkernels.fp8.linear import FP8Linear


def prepare_fp8_for_fsdp(model: nn.Module) -> int:
    """Turn off the FP8 weight cache of every :class:`FP8Linear` in ``model``; returns how many there are."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    layers = [m for m in model.modules() if isinstance(m, FP8Linear)]
    for m in layers:
        m.weight_cache = False
        m._w_cache = None
    return len(layers)
