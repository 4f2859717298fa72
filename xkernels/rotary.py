"""Fused rotary position embedding (RoPE, rotate-half / NeoX / Llama convention) for q and k at once.

``out = x * cos[pos] + rotate_half(x) * sin[pos]`` with ``rotate_half(x) = cat(-x[..., D/2:], x[..., :D/2])``,
computed in fp32 and rounded once to the input dtype.  ``cos``/``sin`` are ``(max_positions, head_dim)``
tables in rotate-half layout (the ``head_dim / 2`` frequencies repeated twice), see :func:`rotary_cos_sin`.
"""

from __future__ import annotations

import torch

from xkernels._checks import check_float, check_nonempty, check_same_device, check_tensor
from xkernels.dispatch import use_triton

# ----------------------------------------------------------------------------------------------------
# Tables and PyTorch reference
# ----------------------------------------------------------------------------------------------------


def rotary_cos_sin(
    seq_len: int, head_dim: int, theta: float = 500000.0, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 ``(cos, sin)`` tables of shape ``(seq_len, head_dim)``.

    ``inv_freq[i] = theta ** (-2i / head_dim)`` for ``i < head_dim / 2``; ``angle[p] = p * inv_freq``
    repeated twice along the last dim (HF Llama layout).  Angles are formed in float64 so large positions
    (up to 131072) keep full fp32 accuracy.
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len <= 0:
        raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
    if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim <= 0 or head_dim % 2:
        raise ValueError(f"head_dim must be a positive even int, got {head_dim!r}")
    if not theta > 0:
        raise ValueError(f"theta must be positive, got {theta!r}")
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float64), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().float().to(device), angles.sin().float().to(device)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``cat(-x2, x1)`` over the last dim, where ``x1, x2`` are its two halves."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def _gather_tables(cos, sin, seq_len, position_ids):
    """Rows of the tables per token, shaped to broadcast over ``(batch, seq, heads, head_dim)``."""
    if position_ids is None:
        return cos[:seq_len][None, :, None, :], sin[:seq_len][None, :, None, :]
    return cos[position_ids][:, :, None, :], sin[position_ids][:, :, None, :]


def apply_rotary_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    position_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x * cos[pos] + rotate_half(x) * sin[pos]`` for ``x`` in ``(q, k)``, in fp32 (float64 for float64
    inputs), rounded once to the input dtype.  ``pos`` = ``position_ids`` (batch, seq), default ``arange(seq)``.

    (HF Llama multiplies in the activation dtype; for bf16 that differs from this by a rounding or two.)
    """
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    c, s = _gather_tables(cos.to(acc), sin.to(acc), q.shape[1], position_ids)
    outs = []
    for x in (q, k):
        xf = x.to(acc)
        outs.append((xf * c + rotate_half(xf) * s).to(x.dtype))
    return outs[0], outs[1]


# ----------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------


def _validate(q, k, cos, sin, position_ids, inplace):
    check_float("q", q)
    check_float("k", k)
    check_float("cos", cos, (torch.float32,))
    check_float("sin", sin, (torch.float32,))
    if q.dim() != 4:
        raise ValueError(f"q must have shape (batch, seq, n_q_heads, head_dim), got {tuple(q.shape)}")
    if k.dim() != 4:
        raise ValueError(f"k must have shape (batch, seq, n_kv_heads, head_dim), got {tuple(k.shape)}")
    check_nonempty("q", q)
    check_nonempty("k", k)
    batch, seq, _, head_dim = q.shape
    if k.shape[0] != batch or k.shape[1] != seq or k.shape[3] != head_dim:
        raise ValueError(
            f"k shape {tuple(k.shape)} must match q shape {tuple(q.shape)} in batch, seq and head_dim"
        )
    if head_dim % 2:
        raise ValueError(f"head_dim (last dim of q and k) must be even for rotate-half, got {head_dim}")
    if k.dtype != q.dtype:
        raise TypeError(f"k dtype {k.dtype} differs from q dtype {q.dtype}")
    check_same_device("k", k, "q", q)
    for name, t in (("cos", cos), ("sin", sin)):
        check_same_device(name, t, "q", q)
        if t.dim() != 2 or t.shape[1] != head_dim:
            raise ValueError(f"{name} must have shape (max_positions, {head_dim}), got {tuple(t.shape)}")
        check_nonempty(name, t)
    if cos.shape != sin.shape:
        raise ValueError(f"cos {tuple(cos.shape)} and sin {tuple(sin.shape)} must have the same shape")
    n_pos = cos.shape[0]
    if position_ids is None:
        if n_pos < seq:
            raise ValueError(f"cos/sin have {n_pos} positions but q has seq={seq}; build tables of at least seq rows")
    else:
        check_tensor("position_ids", position_ids)
        if position_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"position_ids must be an int64 (or int32) tensor, got {position_ids.dtype}")
        if position_ids.shape not in ((batch, seq), (1, seq)):
            raise ValueError(f"position_ids must have shape ({batch}, {seq}) or (1, {seq}), got {tuple(position_ids.shape)}")
        check_same_device("position_ids", position_ids, "q", q)
        # Host-side range check: one device->host sync.  Skipped while torch.compile traces (it would break
        # the graph); an out-of-range position there indexes out of bounds.
        if not _compiling():
            lo, hi = int(position_ids.min()), int(position_ids.max())
            if lo < 0 or hi >= n_pos:
                raise ValueError(
                    f"position_ids must lie in [0, {n_pos}) (the rows of cos/sin), got values in [{lo}, {hi}]"
                )
    if inplace:
        for name, t in (("q", q), ("k", k)):
            if t.stride(-1) != 1:
                raise ValueError(f"inplace=True needs {name} with a contiguous last dim, got strides {t.stride()}")


def _compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and hasattr(compiler, "is_compiling") and compiler.is_compiling())


def apply_rotary(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    inplace: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate ``q`` (batch, seq, n_q_heads, head_dim) and ``k`` (batch, seq, n_kv_heads, head_dim) by RoPE.

    ``cos``/``sin``: fp32 ``(max_positions, head_dim)`` (:func:`rotary_cos_sin`).  ``position_ids``:
    ``(batch, seq)`` (or ``(1, seq)``) integer positions, default ``arange(seq)``; its range is checked on
    the host (one sync).  q and k may be strided along batch/seq/head (views of a fused QKV output); the
    last dim must be contiguous or it is copied.  ``inplace=True`` overwrites q and k and returns them.
    """
    _validate(q, k, cos, sin, position_ids, inplace)
    if use_triton(q):
        return _RotaryFunction.apply(q, k, cos, sin, position_ids, inplace)
    out_q, out_k = apply_rotary_ref(q, k, cos, sin, position_ids)
    if inplace:
        q.copy_(out_q)
        k.copy_(out_k)
        return q, k
    return out_q, out_k


# ----------------------------------------------------------------------------------------------------
# Autograd (kernels land here; until then the reference runs under autograd)
# ----------------------------------------------------------------------------------------------------


class _RotaryFunction:
    @staticmethod
    def apply(q, k, cos, sin, position_ids, inplace):
        out_q, out_k = apply_rotary_ref(q, k, cos, sin, position_ids)
        if inplace:
            q.copy_(out_q)
            k.copy_(out_k)
            return q, k
        return out_q, out_k
