"""Fused rotary position embedding (RoPE, rotate-half / NeoX / Llama convention) for q and k at once.

``out = x * cos[pos] + rotate_half(x) * sin[pos]`` with ``rotate_half(x) = cat(-x[..., D/2:], x[..., :D/2])``,
computed in fp32 and rounded once to the input dtype.  ``cos``/``sin`` are ``(max_positions, head_dim)``
tables in rotate-half layout (the ``head_dim / 2`` frequencies repeated twice), see :func:`rotary_cos_sin`.
"""

from __future__ import annotations

import weakref

import torch

from xkernels._checks import check_float, check_nonempty, check_same_device, check_tensor, checking_inputs
from xkernels.dispatch import compiling, launch_on, triton_available, use_triton

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
    # clamped like the kernel: position values are not range-checked by default (that needs a host sync)
    position_ids = position_ids.clamp(0, cos.shape[0] - 1)
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
        # Range check of the position values: opt-in (xkernels.check_inputs() / XKERNELS_CHECK_INPUTS=1)
        # because it reads them on the host (a device->host sync, remembered for the last position_ids
        # tensor so the layers of one forward pay it once); never while torch.compile traces.  Unchecked,
        # an out-of-range position is clamped to the table (unspecified result, no out-of-bounds read).
        if checking_inputs() and not compiling():
            lo, hi = _position_range(position_ids)
            if lo < 0 or hi >= n_pos:
                raise ValueError(
                    f"position_ids must lie in [0, {n_pos}) (the rows of cos/sin), got values in [{lo}, {hi}]"
                )
    if inplace:
        for name, t in (("q", q), ("k", k)):
            if t.stride(-1) != 1:
                raise ValueError(f"inplace=True needs {name} with a contiguous last dim, got strides {t.stride()}")
            if t.is_leaf and t.requires_grad and torch.is_grad_enabled():
                raise ValueError(f"inplace=True cannot overwrite {name}: it is a leaf tensor that requires grad")


_last_positions: tuple = (None, -1, 0, 0)  # (weakref to position_ids, its _version, min, max)


def _position_range(position_ids: torch.Tensor) -> tuple[int, int]:
    """``(min, max)`` of ``position_ids``; syncs unless it is the tensor (unchanged) seen last time."""
    global _last_positions
    ref, version, lo, hi = _last_positions
    if ref is not None and ref() is position_ids and version == position_ids._version:
        return lo, hi
    lo, hi = int(position_ids.min()), int(position_ids.max())
    _last_positions = (weakref.ref(position_ids), position_ids._version, lo, hi)
    return lo, hi


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
    ``(batch, seq)`` (or ``(1, seq)``) integer positions, default ``arange(seq)``.  Position *values* are
    not checked by default (that would read them on the host, a sync): one outside ``[0, max_positions)``
    is clamped into it (unspecified result, no out-of-bounds read).  ``with xkernels.check_inputs():`` or
    ``XKERNELS_CHECK_INPUTS=1`` turns on a ``ValueError`` for them.  q and k may be strided along batch/seq/head (views of a fused QKV output); the
    last dim must be contiguous or it is copied.  ``inplace=True`` overwrites q and k and returns them.
    """
    _validate(q, k, cos, sin, position_ids, inplace)
    if use_triton(q) and _CUSTOM_OPS and compiling():
        q_out, k_out = _rotary_op(q, k, cos, sin, position_ids, False)
        if inplace:  # functional op + copy under compile (the compiler may re-inplace it)
            q.copy_(q_out)
            k.copy_(k_out)
            return q, k
        return q_out, k_out
    if use_triton(q):
        needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)
        if inplace and not needs_grad:
            _rotary(q, k, cos, sin, position_ids, inplace=True, backward=False)
            if hasattr(torch.autograd.graph, "increment_version"):  # so autograd notices the overwrite
                for t in (q, k):
                    torch.autograd.graph.increment_version(t)
            return q, k
        if inplace and (q._is_view() or k._is_view()):
            # Autograd cannot mark two views dirty in one Function: rotate q and k in two launches.
            q_out = _RotaryFunction.apply(q, None, cos, sin, position_ids, True)
            k_out = _RotaryFunction.apply(k, None, cos, sin, position_ids, True)
            return q_out, k_out
        return _RotaryFunction.apply(q, k, cos, sin, position_ids, inplace)
    out_q, out_k = apply_rotary_ref(q, k, cos, sin, position_ids)
    if inplace:
        q.copy_(out_q)
        k.copy_(out_k)
        return q, k
    return out_q, out_k

# ----------------------------------------------------------------------------------------------------
# Triton kernel
# ----------------------------------------------------------------------------------------------------

if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _rotate_heads(
        X,  # first element of this token's head 0 in the input
        stride_xh,  # input head stride (elements)
        O,  # same token in the output (may equal X: in-place)
        stride_oh,
        n_heads,
        half,
        cos1,  # (BLOCK_D,) fp32 table rows: first and second half of cos[pos] / sin[pos]
        cos2,
        sin1,
        sin2,
        BACKWARD: tl.constexpr,
        BLOCK_H: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        d = tl.arange(0, BLOCK_D)[None, :]
        d_mask = d < half
        for h0 in range(0, n_heads, BLOCK_H):
            h = h0 + tl.arange(0, BLOCK_H)[:, None]
            mask = (h < n_heads) & d_mask
            x_ptr = X + h * stride_xh + d
            o_ptr = O + h * stride_oh + d
            x1 = tl.load(x_ptr, mask=mask, other=0.0).to(tl.float32)
            x2 = tl.load(x_ptr + half, mask=mask, other=0.0).to(tl.float32)
            if BACKWARD:  # transpose of the forward map
                o1 = x1 * cos1 + x2 * sin2
                o2 = x2 * cos2 - x1 * sin1
            else:
                o1 = x1 * cos1 - x2 * sin1
                o2 = x2 * cos2 + x1 * sin2
            tl.store(o_ptr, o1.to(O.dtype.element_ty), mask=mask)
            tl.store(o_ptr + half, o2.to(O.dtype.element_ty), mask=mask)

    @triton.jit
    def _rotary_kernel(
        Q,  # (B, S, Hq, D) strided, last dim contiguous
        K,  # (B, S, Hk, D) strided, last dim contiguous
        QO,  # outputs (may alias Q / K for the in-place variant)
        KO,
        COS,  # (P, D) fp32 tables, last dim contiguous
        SIN,
        POS,  # (B or 1, S) integer positions (read only when HAS_POS)
        seq_len,
        stride_qb,  # q strides along batch, seq, head (elements); same pattern for the others
        stride_qs,
        stride_qh,
        stride_kb,
        stride_ks,
        stride_kh,
        stride_qob,
        stride_qos,
        stride_qoh,
        stride_kob,
        stride_kos,
        stride_koh,
        stride_table,  # row stride of COS / SIN
        stride_pb,  # position_ids strides (0 along batch when broadcast)
        stride_ps,
        n_q_heads,
        n_k_heads,
        half,  # head_dim // 2
        n_positions,  # rows of COS / SIN: positions are clamped into [0, n_positions)
        HAS_POS: tl.constexpr,
        BACKWARD: tl.constexpr,
        BLOCK_HQ: tl.constexpr,
        BLOCK_HK: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        """One program per token (b, s), rotating all q heads and all k heads (one launch for both).

        With ``x = [x1, x2]`` (halves of head_dim), ``c = cos[pos]``, ``s = sin[pos]`` split the same way:
        forward ``o1 = x1*c1 - x2*s1``, ``o2 = x2*c2 + x1*s2`` (= ``x*cos + rotate_half(x)*sin``);
        backward is the transpose ``g1 = o1*c1 + o2*s2``, ``g2 = o2*c2 - o1*s1`` -- the inverse rotation
        for rotate-half tables (``c1 = c2``, ``s1 = s2``).  fp32 math, one rounding on store.
        """
        tok = tl.program_id(0).to(tl.int64)
        b = tok // seq_len
        s = tok % seq_len
        if HAS_POS:
            pos = tl.load(POS + b * stride_pb + s * stride_ps).to(tl.int64)
            pos = tl.minimum(tl.maximum(pos, 0), n_positions - 1)  # unchecked by default: stay in the table
        else:
            pos = s
        d = tl.arange(0, BLOCK_D)
        d_mask = d < half
        row = pos * stride_table
        cos1 = tl.load(COS + row + d, mask=d_mask, other=0.0)[None, :]
        cos2 = tl.load(COS + row + half + d, mask=d_mask, other=0.0)[None, :]
        sin1 = tl.load(SIN + row + d, mask=d_mask, other=0.0)[None, :]
        sin2 = tl.load(SIN + row + half + d, mask=d_mask, other=0.0)[None, :]
        _rotate_heads(
            Q + b * stride_qb + s * stride_qs, stride_qh, QO + b * stride_qob + s * stride_qos, stride_qoh,
            n_q_heads, half, cos1, cos2, sin1, sin2, BACKWARD, BLOCK_HQ, BLOCK_D,
        )  # fmt: skip
        _rotate_heads(
            K + b * stride_kb + s * stride_ks, stride_kh, KO + b * stride_kob + s * stride_kos, stride_koh,
            n_k_heads, half, cos1, cos2, sin1, sin2, BACKWARD, BLOCK_HK, BLOCK_D,
        )  # fmt: skip


# ----------------------------------------------------------------------------------------------------
# Launcher and autograd
# ----------------------------------------------------------------------------------------------------

# A program's (heads x head_dim/2) tile holds at most _MAX_TILE elements; more heads loop in chunks.
# The model's shapes (24 q heads / 8 k heads, head_dim 64) fit in one tile.  4 warps up to 2048
# elements, 8 above (Triton tutorial practice; not tuned on a GPU here).
_MAX_TILE = 4096


def _rotary_launch_config(n_q_heads: int, n_k_heads: int, head_dim: int) -> tuple[int, int, int, int]:
    """``(BLOCK_HQ, BLOCK_HK, BLOCK_D, num_warps)``."""
    block_d = triton.next_power_of_2(head_dim // 2)
    max_h = max(1, _MAX_TILE // block_d)
    block_hq = min(triton.next_power_of_2(n_q_heads), max_h)
    block_hk = min(triton.next_power_of_2(max(n_k_heads, 1)), max_h)
    # 8 warps from 2048 (q heads x half head_dim) up: at 4 warps 32 heads x 128 needed ~150 registers on sm_90a
    num_warps = 4 if block_hq * block_d < 2048 else 8
    return block_hq, block_hk, block_d, num_warps


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _rotary(q, k, cos, sin, position_ids, inplace: bool, backward: bool):
    """Launch the kernel once for q and k; returns ``(q_out, k_out)`` (q, k themselves when in place)."""
    batch, seq, n_q_heads, head_dim = q.shape
    k_out_none = k is None
    if k is None:  # rotate q alone: a k with no heads (the kernel's k loop runs zero times)
        k = q[:, :, :0]
    n_k_heads = k.shape[2]
    if head_dim // 2 > _MAX_TILE:
        raise ValueError(f"head_dim={head_dim} is too large for the Triton rotary kernel (max {2 * _MAX_TILE})")
    if inplace:
        q_out, k_out = q, k
    else:
        q, k = _last_dim_contiguous(q), _last_dim_contiguous(k)
        q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    cos, sin = _last_dim_contiguous(cos), _last_dim_contiguous(sin)
    if sin.stride(0) != cos.stride(0):
        sin = sin.contiguous()
        cos = cos.contiguous()
    has_pos = position_ids is not None
    if has_pos:
        stride_pb = position_ids.stride(0) if position_ids.shape[0] > 1 else 0
        stride_ps = position_ids.stride(1)
    else:
        stride_pb = stride_ps = 0
    block_hq, block_hk, block_d, num_warps = _rotary_launch_config(n_q_heads, n_k_heads, head_dim)
    with launch_on(q):  # the launch goes to q's GPU, not the current one
        _rotary_kernel[(batch * seq,)](
            q, k, q_out, k_out, cos, sin, position_ids if has_pos else cos,
            seq,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            q_out.stride(0), q_out.stride(1), q_out.stride(2),
            k_out.stride(0), k_out.stride(1), k_out.stride(2),
            cos.stride(0), stride_pb, stride_ps,
            n_q_heads, n_k_heads, head_dim // 2, cos.shape[0],
            HAS_POS=has_pos, BACKWARD=backward,
            BLOCK_HQ=block_hq, BLOCK_HK=block_hk, BLOCK_D=block_d,
            num_warps=num_warps,
        )  # fmt: skip
    return q_out, (None if k_out_none else k_out)


class _RotaryFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin, position_ids, inplace):
        """``k`` may be None: rotate ``q`` alone and return only ``q_out`` (autograd allows a single output
        when an in-place input is a view)."""
        q_out, k_out = _rotary(q, k, cos, sin, position_ids, inplace, backward=False)
        ctx.save_for_backward(cos, sin, position_ids)
        if inplace:
            ctx.mark_dirty(*[t for t in (q, k) if t is not None])
        return q_out if k is None else (q_out, k_out)

    @staticmethod
    def backward(ctx, dq, dk=None):
        cos, sin, position_ids = ctx.saved_tensors
        dq_in, dk_in = _rotary(dq, dk, cos, sin, position_ids, inplace=False, backward=True)
        return dq_in, dk_in, None, None, None, None


# torch.compile: the kernel as an opaque custom op (traced through its fake impl); eager calls keep the
# autograd.Function above.
_CUSTOM_OPS = triton_available() and hasattr(torch.library, "custom_op")
if _CUSTOM_OPS:

    @torch.library.custom_op(
        "xkernels::rotary",
        mutates_args=(),
        schema="(Tensor q, Tensor k, Tensor cos, Tensor sin, Tensor? position_ids, bool backward) -> (Tensor, Tensor)",
    )
    def _rotary_op(q, k, cos, sin, position_ids, backward):
        return _rotary(q, k, cos, sin, position_ids, inplace=False, backward=backward)

    @_rotary_op.register_fake
    def _(q, k, cos, sin, position_ids, backward):
        return q.new_empty(q.shape), k.new_empty(k.shape)

    def _rotary_setup_context(ctx, inputs, output):
        _, _, cos, sin, position_ids, backward = inputs
        ctx.backward = backward
        ctx.save_for_backward(cos, sin, position_ids)

    def _rotary_op_backward(ctx, dq, dk):
        cos, sin, position_ids = ctx.saved_tensors
        dq_in, dk_in = _rotary_op(dq, dk, cos, sin, position_ids, not ctx.backward)
        return dq_in, dk_in, None, None, None, None

    _rotary_op.register_autograd(_rotary_op_backward, setup_context=_rotary_setup_context)
