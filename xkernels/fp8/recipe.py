"""The FP8 training recipe (a small dataclass users pass in) and delayed-scaling amax-history updates.

Recipes (``scaling``):

* ``delayed``  -- tensorwise scales taken from a rolling history of past amax values (Transformer Engine's
  ``DelayedScaling``; Xmodel-2.5 used history 128, algorithm ``max``). The scale used at step ``t`` comes from
  the amaxes of steps ``< t``; the amax of step ``t`` is pushed after it is quantised. On the very first step
  of a tensor (empty history) the scale is computed from its current amax, so step 0 never saturates
  (torchao does the same; TE would start from scale 1). A history entry is pushed per forward (input), per
  backward (grad_output) and per change of the weight (weight; its FP8 copy is reused until the optimizer steps),
  so with gradient accumulation every micro-batch adds an input/grad entry. Under activation checkpointing the
  recomputed forward adds a second input entry (harmless with ``max``). With ``reduce_amax_group`` the step-0
  amax is all-reduced *before* that first quantisation, so every rank scales step 0 as one process would.

  Two deliberate differences from Transformer Engine's delayed scaling (its fused amax/scale update,
  ``kernel_bulk`` in ``transformer_engine/common/recipe/delayed_scaling.cu``); torchao's float8 training and
  DeepSeek-V3/DeepGEMM scale from the current amax (per tensor, row or block) and keep no history to compare:

  - **A zero amax is pushed into the history** like any other value (it rolls the window and takes slot 0; the
    scale is only left unchanged while the window's amax is 0). TE's fused update skips a zero amax (the window is
    not rolled and the scale kept), so the old entries stay longer. Example, history length 4, ``max``, E4M3
    (max 448), amaxes 8, 0, 0, 0, 1: here the 8 has left the window and we quantise with ``448 / 1 = 448``; TE
    still holds the 8 and quantises with ``448 / 8 = 56``. A layer whose input is exactly zero for a few steps
    (a masked branch, a frozen embedding row) therefore forgets its larger past amaxes sooner than under TE.
  - **Non-finite amaxes are ignored inside the window**: ``max`` is taken over the finite entries (a step whose
    tensor held inf/NaN still rolls the window), so the scale follows the finite amaxes at once. TE's window max
    is inf while the inf is in the window, and it keeps the old scale for those ``amax_history_len`` steps
    (a NaN amax it does skip: ``fmaxf`` ignores NaN).
* ``current``  -- tensorwise scales from the tensor's own amax, computed on the fly.
* ``row``      -- one scale per row of every GEMM operand (per token for activations, per output/input channel
  for weights, along the contraction dim of each GEMM).
* ``block``    -- DeepSeek-V3: 1x128 groups along the contraction dim for activations and gradients, 128x128
  tiles for weights.

``format="hybrid"`` uses E4M3 for activations and weights and E5M2 for gradients; ``"e4m3"`` uses E4M3 everywhere.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from xkernels.fp8.formats import AMAX_EPS, E4M3, E5M2

SCALINGS = ("delayed", "current", "row", "block")
FORMAT_NAMES = ("hybrid", "e4m3")
AMAX_ALGOS = ("max", "most_recent")
ROLES = ("input", "weight", "grad_output")  # index 0, 1, 2 in the amax-history buffers


@dataclass
class FP8Recipe:
    """How an :class:`~xkernels.fp8.FP8Linear` quantises its three GEMM operands.

    Fields:
        scaling: ``"delayed" | "current" | "row" | "block"`` (see the module docstring).
        format: ``"hybrid"`` (E4M3 forward, E5M2 gradients) or ``"e4m3"`` (E4M3 everywhere).
        amax_history_len: length of the rolling amax window (delayed scaling only).
        amax_compute_algo: ``"max"`` over the window or ``"most_recent"`` entry (delayed scaling only).
        reduce_amax_group: ``None`` (no reduction), a ``torch.distributed`` process group, or ``True`` for the
            default group: amaxes are all-reduced with MAX before they enter the history, so every data-parallel
            rank uses the same scales (delayed scaling only; current/row/block scales are local by nature).
    """

    scaling: str = "delayed"
    format: str = "hybrid"
    amax_history_len: int = 128
    amax_compute_algo: str = "max"
    reduce_amax_group: Any = None

    def __post_init__(self) -> None:
        if self.scaling not in SCALINGS:
            raise ValueError(f"FP8Recipe.scaling must be one of {SCALINGS}, got {self.scaling!r}")
        if self.format not in FORMAT_NAMES:
            raise ValueError(f"FP8Recipe.format must be one of {FORMAT_NAMES}, got {self.format!r}")
        if not isinstance(self.amax_history_len, int) or self.amax_history_len < 1:
            raise ValueError(f"FP8Recipe.amax_history_len must be a positive int, got {self.amax_history_len!r}")
        if self.amax_compute_algo not in AMAX_ALGOS:
            raise ValueError(f"FP8Recipe.amax_compute_algo must be one of {AMAX_ALGOS}, got {self.amax_compute_algo!r}")

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> FP8Recipe:
        """``FP8Recipe.from_name("delayed")`` etc.; ``overrides`` set any other field."""
        if name not in SCALINGS:
            raise ValueError(f"unknown FP8 recipe {name!r}; expected one of {SCALINGS}")
        return cls(scaling=name, **overrides)

    def replace(self, **changes: Any) -> FP8Recipe:
        return dataclasses.replace(self, **changes)

    @property
    def forward_dtype(self) -> torch.dtype:
        """FP8 dtype of activations and weights."""
        return E4M3

    @property
    def backward_dtype(self) -> torch.dtype:
        """FP8 dtype of output gradients."""
        return E5M2 if self.format == "hybrid" else E4M3

    def dtype(self, role: str) -> torch.dtype:
        return self.backward_dtype if role == "grad_output" else self.forward_dtype

    def granularity(self, role: str) -> str:
        """Quantisation granularity of ``role`` (``input``, ``weight`` or ``grad_output``), laid out (rows, K)."""
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        if self.scaling in ("delayed", "current"):
            return "tensor"
        if self.scaling == "row":
            return "row"
        return "block_128x128" if role == "weight" else "block_1x128"


# --- delayed scaling: history state lives in module buffers (so it is in state_dict) ---------------------------


def amax_group_active(group: Any) -> bool:
    """Whether ``group`` (an FP8Recipe's ``reduce_amax_group``) reduces anything: set, and a process group is up."""
    if group is None or group is False:
        return False
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def reduce_amax(amax: torch.Tensor, group: Any) -> torch.Tensor:
    """All-reduce ``amax`` with MAX over ``group`` (``True`` = default group); a no-op without distributed."""
    if not amax_group_active(group):
        return amax
    import torch.distributed as dist

    amax = amax.clone()
    dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=None if group is True else group)
    return amax


def history_amax(history: torch.Tensor, algo: str) -> torch.Tensor:
    """The amax a delayed scale is derived from: max over the window, or the most recent entry (index 0).

    Non-finite entries (a step whose tensor held inf/NaN) are ignored by ``max``; the caller keeps the previous
    scale when the result is not usable.
    """
    if algo == "most_recent":
        return history[..., 0]
    finite = torch.where(torch.isfinite(history), history, torch.zeros_like(history))
    return finite.amax(dim=-1)


def push_amax(history: torch.Tensor, scale: torch.Tensor, amax: torch.Tensor, fp8_max: float, algo: str) -> None:
    """Record this step's ``amax`` (in place): roll the window by one, write slot 0, refresh ``scale``.

    ``scale`` (dequantisation scale, ``amax / fp8_max``) is only replaced when the history gives a finite,
    positive amax; otherwise the previous scale stays (Transformer Engine's rule).
    """
    history.copy_(torch.roll(history, 1, dims=-1))
    history[..., 0] = amax
    a = history_amax(history, algo)
    new = a.clamp(min=AMAX_EPS) / fp8_max
    scale.copy_(torch.where(torch.isfinite(a) & (a > 0), new, scale))


@torch.library.custom_op("xkernels::fp8_push_amax", mutates_args=("history", "scale", "num_updates"))
def push_amax_op(
    history: torch.Tensor,
    scale: torch.Tensor,
    num_updates: torch.Tensor,
    amax: torch.Tensor,
    role: int,
    fp8_max: float,
    algo: str,
) -> None:
    """:func:`push_amax` on row ``role`` of FP8Linear's buffers ((R, L) history, (R,) scale and update count).

    One op with declared mutations, so that under torch.compile the history update is an in-graph buffer mutation
    (also inside the backward graph, where the gradient's amax is recorded), never Python-side state.
    """
    push_amax(history[role], scale[role], amax, fp8_max, algo)
    num_updates[role] += 1


@push_amax_op.register_fake
def _push_amax_fake(history, scale, num_updates, amax, role, fp8_max, algo):
    return None
