"""Argument validation shared by the public ops: every message names the argument and what was expected."""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_tensor(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def check_float(name: str, t: object, dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES) -> torch.Tensor:
    """``t`` is a tensor of one of ``dtypes`` (fp32/fp16/bf16 by default)."""
    check_tensor(name, t)
    if t.dtype not in dtypes:
        allowed = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({allowed}), got {str(t.dtype).removeprefix('torch.')}")
    return t


def check_same_device(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}; put both on one device")


def check_nonempty(name: str, t: torch.Tensor) -> None:
    if t.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(t.shape)}); expected at least one element")


# ----------------------------------------------------------------------------------------------------
# Opt-in value checks (they read device values on the host, i.e. synchronise)
# ----------------------------------------------------------------------------------------------------
# By default the ops never read tensor *values* on the host, yet a bad value is loud: an out-of-range target
# (cross_entropy, linear_cross_entropy) makes that token's loss and gradients NaN, a position id outside the
# table (apply_rotary, apply_rotary_pos_emb) makes that token's rotated features NaN (the index is clamped for
# the loads, so no out-of-bounds memory is touched).  To raise instead, naming the value, turn the checks on with
# ``XKERNELS_CHECK_INPUTS=1`` or ``with xkernels.check_inputs(): ...``; each costs one device->host sync per
# call, and they are skipped while torch.compile traces.

import contextlib  # noqa: E402
import os  # noqa: E402
from collections.abc import Iterator  # noqa: E402

_check_override: bool | None = None


def checking_inputs() -> bool:
    """Whether the opt-in value checks run: a :func:`check_inputs` block, else ``XKERNELS_CHECK_INPUTS=1``."""
    if _check_override is not None:
        return _check_override
    return os.environ.get("XKERNELS_CHECK_INPUTS", "0") == "1"


@contextlib.contextmanager
def check_inputs(enabled: bool = True) -> Iterator[None]:
    """``with xkernels.check_inputs(): ...`` -- validate input *values* (target / position ranges) inside the
    block, at the price of one host sync per op call.  ``check_inputs(False)`` turns them off in the block."""
    global _check_override
    previous, _check_override = _check_override, bool(enabled)
    try:
        yield
    finally:
        _check_override = previous
