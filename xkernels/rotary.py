"""Fused rotary position embedding (RoPE, rotate-half / NeoX / Llama convention) for q and k at once.

``out = x * cos[pos] + rotate_half(x) * sin[pos]`` with ``rotate_half(x) = cat(-x[..., R/2:R], x[..., :R/2])``
over the first ``R = rotary_dim`` features of each head, computed in fp32 and rounded once to the input dtype;
features ``R..head_dim`` pass through unchanged (partial rotary: Phi, Phi-3, GPT-NeoX -- HF slices
``q[..., :R]`` / ``q[..., R:]`` with ``R = cos.shape[-1]`` exactly so).  ``cos``/``sin`` are
``(max_positions, R)`` tables in rotate-half layout (the ``R / 2`` frequencies repeated twice), see
:func:`rotary_cos_sin`.

Two entries: :func:`apply_rotary` (our layout: q/k ``(batch, seq, heads, head_dim)``, fp32 tables indexed by
``position_ids``) and :func:`apply_rotary_pos_emb` (Hugging Face's signature and layouts, Liger's
``liger_rotary_pos_emb`` drop-in).

Position ids outside the table are loud, never silent, and cost no host sync: that token's rotated features
come out NaN (forward and backward).  ``xkernels.check_inputs()`` raises a ``ValueError`` instead (a sync).
"""

from __future__ import annotations

import weakref

import torch

from xkernels._checks import check_float, check_nonempty, check_same_device, check_tensor, checking_inputs
from xkernels.dispatch import compiling, launch_on, triton_available, use_triton

KERNELS = ("position", "token")  # apply_rotary(kernel=...): see _rotary_launch_config

# ----------------------------------------------------------------------------------------------------
# Tables and PyTorch reference
# ----------------------------------------------------------------------------------------------------


def rotary_cos_sin(
    seq_len: int, head_dim: int, theta: float = 500000.0, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 ``(cos, sin)`` tables of shape ``(seq_len, head_dim)``.

    ``inv_freq[i] = theta ** (-2i / head_dim)`` for ``i < head_dim / 2``; ``angle[p] = p * inv_freq``
    repeated twice along the last dim (HF Llama layout).  Angles are formed in float64 so large positions
    (up to 131072) keep full fp32 accuracy.  For partial rotary pass the rotary dim as ``head_dim`` (HF
    Phi-3 / GPT-NeoX build ``inv_freq`` over ``rotary_dim = head_dim * partial_rotary_factor`` the same way).
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
    """Rows of the tables per token, shaped to broadcast over ``(batch, seq, heads, rotary_dim)``.

    A position outside ``[0, rows)`` reads row 0 and is then set to NaN (no host sync, no index error):
    the same rule as the kernel."""
    if position_ids is None:
        return cos[:seq_len][None, :, None, :], sin[:seq_len][None, :, None, :]
    bad = ((position_ids < 0) | (position_ids >= cos.shape[0]))[:, :, None, None]
    index = position_ids.masked_fill(position_ids >= cos.shape[0], 0).clamp_min(0)
    c, s = cos[index][:, :, None, :], sin[index][:, :, None, :]
    nan = torch.full((), float("nan"), dtype=c.dtype, device=c.device)
    return torch.where(bad, nan, c), torch.where(bad, nan, s)


def apply_rotary_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    position_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x * cos[pos] + rotate_half(x) * sin[pos]`` on the first ``R = cos.shape[-1]`` features of ``x`` in
    ``(q, k)`` (the rest passed through), in fp32 (float64 for float64 inputs), rounded once to the input
    dtype.  ``pos`` = ``position_ids`` (batch, seq), default ``arange(seq)``; a position outside the table
    gives NaN in that token's rotated features.

    (HF multiplies in the activation dtype; for bf16 that differs from this by a rounding or two.)
    """
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    c, s = _gather_tables(cos.to(acc), sin.to(acc), q.shape[1], position_ids)
    rot = cos.shape[-1]
    outs = []
    for x in (q, k):
        xf = x.to(acc)
        x_rot, x_pass = xf[..., :rot], xf[..., rot:]
        outs.append(torch.cat([x_rot * c + rotate_half(x_rot) * s, x_pass], dim=-1).to(x.dtype))
    return outs[0], outs[1]


# ----------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------


def _validate(q, k, cos, sin, position_ids, inplace, kernel):
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
    if k.dtype != q.dtype:
        raise TypeError(f"k dtype {k.dtype} differs from q dtype {q.dtype}")
    check_same_device("k", k, "q", q)
    for name, t in (("cos", cos), ("sin", sin)):
        check_same_device(name, t, "q", q)
        if t.dim() != 2:
            raise ValueError(f"{name} must have shape (max_positions, rotary_dim), got {tuple(t.shape)}")
        check_nonempty(name, t)
    rot = cos.shape[1]
    if rot % 2 or rot > head_dim:
        raise ValueError(
            f"cos/sin last dim (rotary_dim) must be even and at most head_dim={head_dim} (rotate-half needs "
            f"two halves), got {rot}"
        )
    if cos.shape != sin.shape:
        raise ValueError(f"cos {tuple(cos.shape)} and sin {tuple(sin.shape)} must have the same shape")
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if kernel == "token" and rot != head_dim:
        raise ValueError(f"kernel='token' rotates whole heads only (rotary_dim {rot} != head_dim {head_dim})")
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
        # an out-of-range position makes that token's rotated features NaN (no out-of-bounds read).
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
    kernel: str = "position",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate ``q`` (batch, seq, n_q_heads, head_dim) and ``k`` (batch, seq, n_kv_heads, head_dim) by RoPE.

    ``cos``/``sin``: fp32 ``(max_positions, rotary_dim)`` (:func:`rotary_cos_sin`); ``rotary_dim`` even and
    ``<= head_dim``: the first ``rotary_dim`` features of each head rotate, the rest pass through unchanged.
    ``position_ids``: ``(batch, seq)`` (or ``(1, seq)``) integer positions, default ``arange(seq)``.  Position
    *values* are not read on the host by default (that would be a sync): one outside ``[0, max_positions)``
    makes that token's rotated features NaN in the output (and in the gradient) -- loud, not a silently wrong
    finite value.  ``with xkernels.check_inputs():`` or ``XKERNELS_CHECK_INPUTS=1`` raise a ``ValueError``
    for them instead.  q and k may be strided along batch/seq/head (views of a fused QKV output); the last dim
    must be contiguous or it is copied.  ``inplace=True`` overwrites q and k and returns them.

    ``kernel`` picks the Triton kernel (no effect on the torch path): ``"position"`` (default) -- one program
    per position, the cos/sin row loaded once for the q and k heads of every batch row sharing it, heads in
    small tiles (low registers, >= 75% occupancy on sm_90a); ``"token"`` -- the earlier kernel (one program per
    token, all heads in one tile), kept so a GPU session can time both; whole-head rotary only.
    """
    _validate(q, k, cos, sin, position_ids, inplace, kernel)
    if use_triton(q) and _CUSTOM_OPS and compiling():
        q_out, k_out = _rotary_op(q, k, cos, sin, position_ids, False, kernel)
        if inplace:  # functional op + copy under compile (the compiler may re-inplace it)
            q.copy_(q_out)
            k.copy_(k_out)
            return q, k
        return q_out, k_out
    if use_triton(q):
        needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)
        if inplace and not needs_grad:
            _rotary(q, k, cos, sin, position_ids, inplace=True, backward=False, kernel=kernel)
            if hasattr(torch.autograd.graph, "increment_version"):  # so autograd notices the overwrite
                for t in (q, k):
                    torch.autograd.graph.increment_version(t)
            return q, k
        if inplace and (q._is_view() or k._is_view()):
            # Autograd cannot mark two views dirty in one Function: rotate q and k in two launches.
            q_out = _RotaryFunction.apply(q, None, cos, sin, position_ids, True, kernel)
            k_out = _RotaryFunction.apply(k, None, cos, sin, position_ids, True, kernel)
            return q_out, k_out
        return _RotaryFunction.apply(q, k, cos, sin, position_ids, inplace, kernel)
    out_q, out_k = apply_rotary_ref(q, k, cos, sin, position_ids)
    if inplace:
        q.copy_(out_q)
        k.copy_(out_k)
        return q, k
    return out_q, out_k


_row_positions_cache: tuple = (None, None)  # ((batch, seq, device), arange tensor) of the last call


def _row_positions(batch: int, seq: int, device: torch.device) -> torch.Tensor:
    """``arange(batch * seq).view(batch, seq)``: the positions that index HF's per-token ``(batch * seq, R)``
    rows.  The same tensor for every layer of a forward (and every step of that shape): no allocation per
    layer, and with the opt-in range check on (:func:`xkernels.check_inputs`) the per-tensor cache makes it
    one host sync, not one per layer.  Never modified in place; fresh under torch.compile (no global state
    traced)."""
    global _row_positions_cache
    if compiling():
        return torch.arange(batch * seq, device=device).view(batch, seq)
    key = (batch, seq, torch.device(device))
    cached_key, cached = _row_positions_cache
    if cached_key != key:
        cached = torch.arange(batch * seq, device=device).view(batch, seq)
        _row_positions_cache = (key, cached)
    return cached


def apply_rotary_pos_emb(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    unsqueeze_dim: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hugging Face's ``apply_rotary_pos_emb`` (Llama, Qwen, Mistral, Gemma, OLMo-2; partial rotary as in
    Phi-3 / GPT-NeoX) on the xkernels kernel; the signature of Liger's ``liger_rotary_pos_emb``.

    ``q``/``k``: ``(batch, heads, seq, head_dim)`` with ``unsqueeze_dim=1`` (HF's layout) or
    ``(batch, seq, heads, head_dim)`` with ``unsqueeze_dim=2``; any strides.  ``cos``/``sin``: what HF's rotary
    embedding returns, ``(batch or 1, seq, rotary_dim)`` rows already gathered per token, in any float dtype
    (read as fp32); ``position_ids`` is then ignored, as in HF and Liger.  A 2-D ``(max_positions,
    rotary_dim)`` table is also taken (HF <= 4.39 passed tables): its rows are gathered at ``position_ids``
    (default ``arange(seq)``; out-of-range positions give NaN, see :func:`apply_rotary`).

    The first ``rotary_dim = cos.shape[-1]`` features of each head rotate
    (``x * cos + rotate_half(x) * sin``), the rest pass through; computed in fp32 and rounded once to q's
    dtype (HF rounds in the activation dtype after each multiply and returns the promoted dtype of q and cos).
    ``cos``/``sin`` receive no gradient (HF derives them from a buffer).  Returns ``(q_embed, k_embed)`` in
    the layout of ``q``/``k``.
    """
    check_tensor("q", q)
    check_tensor("k", k)
    check_float("cos", cos, (torch.float32, torch.float16, torch.bfloat16, torch.float64))
    check_float("sin", sin, (torch.float32, torch.float16, torch.bfloat16, torch.float64))
    if isinstance(unsqueeze_dim, bool) or unsqueeze_dim not in (1, 2):
        raise ValueError(
            f"unsqueeze_dim must be 1 (q/k as (batch, heads, seq, head_dim)) or 2 ((batch, seq, heads, head_dim)), "
            f"got {unsqueeze_dim!r}"
        )
    for name, t in (("q", q), ("k", k)):
        if t.dim() != 4:
            layout = "(batch, heads, seq, head_dim)" if unsqueeze_dim == 1 else "(batch, seq, heads, head_dim)"
            raise ValueError(f"{name} must have shape {layout} for unsqueeze_dim={unsqueeze_dim}, got {tuple(t.shape)}")
    if cos.shape != sin.shape:
        raise ValueError(f"cos {tuple(cos.shape)} and sin {tuple(sin.shape)} must have the same shape")
    qs, ks = (q.transpose(1, 2), k.transpose(1, 2)) if unsqueeze_dim == 1 else (q, k)  # (B, S, H, D) views
    batch, seq = qs.shape[0], qs.shape[1]
    if cos.dim() == 3:
        if cos.shape[0] not in (1, batch) or cos.shape[1] != seq:
            raise ValueError(
                f"cos/sin must have shape ({batch} or 1, {seq}, rotary_dim) to match q {tuple(q.shape)} with "
                f"unsqueeze_dim={unsqueeze_dim}, got {tuple(cos.shape)}"
            )
        if cos.shape[0] == 1:  # rows in order: the table itself, no positions
            table_cos, table_sin, pos = cos[0], sin[0], None
        else:  # one row per token: the (batch * seq) rows are the table, token (b, s) reads row b * seq + s
            table_cos, table_sin = cos.reshape(batch * seq, -1), sin.reshape(batch * seq, -1)
            pos = _row_positions(batch, seq, cos.device)
    elif cos.dim() == 2:
        table_cos, table_sin, pos = cos, sin, position_ids
    else:
        raise ValueError(f"cos/sin must be (batch or 1, seq, rotary_dim) or (max_positions, rotary_dim), got {tuple(cos.shape)}")
    q_out, k_out = apply_rotary(qs, ks, table_cos.float(), table_sin.float(), pos)
    return (q_out.transpose(1, 2), k_out.transpose(1, 2)) if unsqueeze_dim == 1 else (q_out, k_out)


# ----------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------

if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _rotate_head_tiles(
        X,  # first element of this token's head 0 in the input
        stride_xh,  # input head stride (elements)
        O,  # same token in the output (may equal X: in-place)
        stride_oh,
        n_heads,
        half,  # rotary_dim // 2
        n_pass,  # head_dim - rotary_dim features copied unchanged (when COPY_PASS)
        cos1,  # (1, BLOCK_D) fp32 table rows: first and second half of cos[pos] / sin[pos]
        cos2,
        sin1,
        sin2,
        BACKWARD: tl.constexpr,
        COPY_PASS: tl.constexpr,
        BLOCK_H: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_P: tl.constexpr,
    ):
        d = tl.arange(0, BLOCK_D)[None, :]
        d_mask = d < half
        for h0 in range(0, n_heads, BLOCK_H):
            h = h0 + tl.arange(0, BLOCK_H)[:, None]
            h_mask = h < n_heads
            mask = h_mask & d_mask
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
            if COPY_PASS:  # partial rotary, out of place: features [2 * half, head_dim) unchanged
                p = tl.arange(0, BLOCK_P)[None, :]
                p_mask = h_mask & (p < n_pass)
                xp = tl.load(X + h * stride_xh + 2 * half + p, mask=p_mask, other=0.0)
                tl.store(O + h * stride_oh + 2 * half + p, xp.to(O.dtype.element_ty), mask=p_mask)

    @triton.jit
    def _rotary_kernel(
        Q,  # (B, S, Hq, D) strided, last dim contiguous
        K,  # (B, S, Hk, D) strided, last dim contiguous
        QO,  # outputs (may alias Q / K for the in-place variant)
        KO,
        COS,  # (P, R) fp32 tables, last dim contiguous
        SIN,
        POS,  # (B or 1, S) integer positions (read only when HAS_POS)
        batch,
        rows_per_program,  # batch rows per program; 1 whenever positions differ between rows
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
        half,  # rotary_dim // 2
        n_pass,  # head_dim - rotary_dim
        n_positions,  # rows of COS / SIN: a position outside [0, n_positions) gives NaN
        HAS_POS: tl.constexpr,
        BACKWARD: tl.constexpr,
        COPY_PASS: tl.constexpr,
        BLOCK_H: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_P: tl.constexpr,
    ):
        """Program (s, j): position s of batch rows ``[j * rows_per_program, ...)``; the cos/sin row is loaded
        once and rotates every q head and k head of those rows, ``BLOCK_H`` heads at a time.

        With ``x = [x1, x2, xp]`` (halves of the rotary dims, pass-through rest), ``c = cos[pos]``,
        ``s = sin[pos]`` split the same way: forward ``o1 = x1*c1 - x2*s1``, ``o2 = x2*c2 + x1*s2``
        (= ``x*cos + rotate_half(x)*sin``), ``op = xp``; backward is the transpose ``g1 = o1*c1 + o2*s2``,
        ``g2 = o2*c2 - o1*s1``, ``gp = op`` -- the inverse rotation for rotate-half tables (``c1 = c2``,
        ``s1 = s2``).  fp32 math, one rounding on store.  An out-of-range position reads row 0 and sets
        ``c`` to NaN, so ``o1``/``o2`` (and their gradients) are NaN: no host check, no out-of-bounds read.

        Why this shape: the heads of a token are processed in small (BLOCK_H x BLOCK_D) tiles so a thread holds
        few values (registers <= 40 at 4 warps: >= 75% occupancy on sm_90a, see _rotary_launch_config), and
        sharing the table row across batch rows saves its loads (the tables are L2-resident either way).
        """
        s = tl.program_id(0).to(tl.int64)
        b0 = tl.program_id(1).to(tl.int64) * rows_per_program
        if HAS_POS:
            pos = tl.load(POS + b0 * stride_pb + s * stride_ps).to(tl.int64)
            bad = (pos < 0) | (pos >= n_positions)
            pos = tl.where(bad, 0, pos)
        else:
            pos = s
        d = tl.arange(0, BLOCK_D)
        d_mask = d < half
        row = pos * stride_table
        cos1 = tl.load(COS + row + d, mask=d_mask, other=0.0)[None, :]
        cos2 = tl.load(COS + row + half + d, mask=d_mask, other=0.0)[None, :]
        sin1 = tl.load(SIN + row + d, mask=d_mask, other=0.0)[None, :]
        sin2 = tl.load(SIN + row + half + d, mask=d_mask, other=0.0)[None, :]
        if HAS_POS:
            cos1 = tl.where(bad, float("nan"), cos1)
            cos2 = tl.where(bad, float("nan"), cos2)
        b_end = tl.minimum(b0 + rows_per_program, batch)
        for b in range(b0, b_end):
            _rotate_head_tiles(
                Q + b * stride_qb + s * stride_qs, stride_qh, QO + b * stride_qob + s * stride_qos, stride_qoh,
                n_q_heads, half, n_pass, cos1, cos2, sin1, sin2, BACKWARD, COPY_PASS, BLOCK_H, BLOCK_D, BLOCK_P,
            )  # fmt: skip
            _rotate_head_tiles(
                K + b * stride_kb + s * stride_ks, stride_kh, KO + b * stride_kob + s * stride_kos, stride_koh,
                n_k_heads, half, n_pass, cos1, cos2, sin1, sin2, BACKWARD, COPY_PASS, BLOCK_H, BLOCK_D, BLOCK_P,
            )  # fmt: skip

    @triton.jit
    def _rotary_token_kernel(
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
        n_positions,  # rows of COS / SIN: a position outside [0, n_positions) gives NaN
        HAS_POS: tl.constexpr,
        BACKWARD: tl.constexpr,
        BLOCK_HQ: tl.constexpr,
        BLOCK_HK: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        """The earlier kernel (``kernel="token"``): one program per token (b, s), all q heads in one
        (BLOCK_HQ x BLOCK_D) tile and all k heads in another; same math as :func:`_rotary_kernel`, whole-head
        rotary only.  72 registers at the model's shapes on sm_90a (44% occupancy): kept for timing."""
        tok = tl.program_id(0).to(tl.int64)
        b = tok // seq_len
        s = tok % seq_len
        if HAS_POS:
            pos = tl.load(POS + b * stride_pb + s * stride_ps).to(tl.int64)
            bad = (pos < 0) | (pos >= n_positions)
            pos = tl.where(bad, 0, pos)
        else:
            pos = s
        d = tl.arange(0, BLOCK_D)
        d_mask = d < half
        row = pos * stride_table
        cos1 = tl.load(COS + row + d, mask=d_mask, other=0.0)[None, :]
        cos2 = tl.load(COS + row + half + d, mask=d_mask, other=0.0)[None, :]
        sin1 = tl.load(SIN + row + d, mask=d_mask, other=0.0)[None, :]
        sin2 = tl.load(SIN + row + half + d, mask=d_mask, other=0.0)[None, :]
        if HAS_POS:
            cos1 = tl.where(bad, float("nan"), cos1)
            cos2 = tl.where(bad, float("nan"), cos2)
        _rotate_head_tiles(
            Q + b * stride_qb + s * stride_qs, stride_qh, QO + b * stride_qob + s * stride_qos, stride_qoh,
            n_q_heads, half, 0, cos1, cos2, sin1, sin2, BACKWARD, False, BLOCK_HQ, BLOCK_D, 1,
        )  # fmt: skip
        _rotate_head_tiles(
            K + b * stride_kb + s * stride_ks, stride_kh, KO + b * stride_kob + s * stride_kos, stride_koh,
            n_k_heads, half, 0, cos1, cos2, sin1, sin2, BACKWARD, False, BLOCK_HK, BLOCK_D, 1,
        )  # fmt: skip


# ----------------------------------------------------------------------------------------------------
# Launcher and autograd
# ----------------------------------------------------------------------------------------------------

# kernel="token": a program's (heads x rotary_dim/2) tile holds at most _MAX_TILE elements; more heads loop
# in chunks.  4 warps up to 2048 elements, 8 above.
_MAX_TILE = 4096
# kernel="position": (BLOCK_H x BLOCK_D) tiles of _POSITION_TILE elements at 4 warps, i.e. 2 fp32 values per
# thread per half.  ptxas for sm_90a (tests/test_rotary.py::test_sm90a_occupancy, general strides and batch):
# Triton 3.9: 40 registers -> 12 blocks of 4 warps per SM, 75% occupancy; Triton 3.6: 32 (100%), 40 for partial
# rotary.  The "token" kernel: 72 registers at the AOT gate's capture (44%), 85-128 with general strides.
# Not timed on a GPU yet: a 512 tile holds twice the bytes in flight per thread at 48 registers (62.5%) -- the
# GPU session should time both (benchmarks/bench_rotary.py) before this is final.
_POSITION_TILE = 256
_POSITION_WARPS = 4
# Enough programs to fill an H100 (132 SMs x 12 resident blocks ~ 1600) several times over before batch rows
# are grouped into one program (which shares the table row between them).
_MIN_PROGRAMS = 8192


def _rotary_launch_config(n_q_heads: int, n_k_heads: int, head_dim: int) -> tuple[int, int, int, int]:
    """kernel="token": ``(BLOCK_HQ, BLOCK_HK, BLOCK_D, num_warps)``."""
    block_d = triton.next_power_of_2(head_dim // 2)
    max_h = max(1, _MAX_TILE // block_d)
    block_hq = min(triton.next_power_of_2(n_q_heads), max_h)
    block_hk = min(triton.next_power_of_2(max(n_k_heads, 1)), max_h)
    # 8 warps from 2048 (q heads x half head_dim) up: at 4 warps 32 heads x 128 needed ~150 registers on sm_90a
    num_warps = 4 if block_hq * block_d < 2048 else 8
    return block_hq, block_hk, block_d, num_warps


def _position_launch_config(n_heads: int, rotary_dim: int, n_pass: int, batch: int, seq: int, shared_pos: bool):
    """kernel="position": ``(BLOCK_H, BLOCK_D, BLOCK_P, rows_per_program, num_warps)``."""
    block_d = triton.next_power_of_2(max(rotary_dim // 2, 1))
    block_p = triton.next_power_of_2(max(n_pass, 1))
    block_h = max(1, min(triton.next_power_of_2(n_heads), _POSITION_TILE // max(block_d, block_p)))
    rows = 1
    if shared_pos:  # the same position in every batch row: group rows while the grid stays large
        rows = max(1, min(batch, batch * seq // _MIN_PROGRAMS))
    return block_h, block_d, block_p, rows, _POSITION_WARPS


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _rotary(q, k, cos, sin, position_ids, inplace: bool, backward: bool, kernel: str = "position"):
    """Launch one kernel for q and k; returns ``(q_out, k_out)`` (q, k themselves when in place)."""
    batch, seq, n_q_heads, head_dim = q.shape
    k_out_none = k is None
    if k is None:  # rotate q alone: a k with no heads (the kernel's k loop runs zero times)
        k = q[:, :, :0]
    n_k_heads = k.shape[2]
    rotary_dim = cos.shape[1]
    n_pass = head_dim - rotary_dim
    if rotary_dim // 2 > _MAX_TILE or n_pass > 2 * _MAX_TILE:
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
    strides = (
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        q_out.stride(0), q_out.stride(1), q_out.stride(2), k_out.stride(0), k_out.stride(1), k_out.stride(2),
        cos.stride(0), stride_pb, stride_ps,
    )  # fmt: skip
    pos_arg = position_ids if has_pos else cos
    if kernel == "token":
        block_hq, block_hk, block_d, num_warps = _rotary_launch_config(n_q_heads, n_k_heads, head_dim)
        with launch_on(q):  # the launch goes to q's GPU, not the current one
            _rotary_token_kernel[(batch * seq,)](
                q, k, q_out, k_out, cos, sin, pos_arg, seq, *strides,
                n_q_heads, n_k_heads, head_dim // 2, cos.shape[0],
                HAS_POS=has_pos, BACKWARD=backward, BLOCK_HQ=block_hq, BLOCK_HK=block_hk, BLOCK_D=block_d,
                num_warps=num_warps,
            )  # fmt: skip
    else:
        block_h, block_d, block_p, rows, num_warps = _position_launch_config(
            max(n_q_heads, n_k_heads), rotary_dim, n_pass, batch, seq, stride_pb == 0
        )
        grid = (seq, triton.cdiv(batch, rows))
        with launch_on(q):  # the launch goes to q's GPU, not the current one
            _rotary_kernel[grid](
                q, k, q_out, k_out, cos, sin, pos_arg, batch, rows, *strides,
                n_q_heads, n_k_heads, rotary_dim // 2, n_pass, cos.shape[0],
                HAS_POS=has_pos, BACKWARD=backward, COPY_PASS=n_pass > 0 and not inplace,
                BLOCK_H=block_h, BLOCK_D=block_d, BLOCK_P=block_p, num_warps=num_warps,
            )  # fmt: skip
    return q_out, (None if k_out_none else k_out)


class _RotaryFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin, position_ids, inplace, kernel="position"):
        """``k`` may be None: rotate ``q`` alone and return only ``q_out`` (autograd allows a single output
        when an in-place input is a view)."""
        q_out, k_out = _rotary(q, k, cos, sin, position_ids, inplace, backward=False, kernel=kernel)
        ctx.save_for_backward(cos, sin, position_ids)
        ctx.kernel = kernel
        if inplace:
            ctx.mark_dirty(*[t for t in (q, k) if t is not None])
        return q_out if k is None else (q_out, k_out)

    @staticmethod
    def backward(ctx, dq, dk=None):
        cos, sin, position_ids = ctx.saved_tensors
        dq_in, dk_in = _rotary(dq, dk, cos, sin, position_ids, inplace=False, backward=True, kernel=ctx.kernel)
        return dq_in, dk_in, None, None, None, None, None


# torch.compile: the kernel as an opaque custom op (traced through its fake impl); eager calls keep the
# autograd.Function above.
_CUSTOM_OPS = triton_available() and hasattr(torch.library, "custom_op")
if _CUSTOM_OPS:

    @torch.library.custom_op(
        "xkernels::rotary",
        mutates_args=(),
        schema="(Tensor q, Tensor k, Tensor cos, Tensor sin, Tensor? position_ids, bool backward, "
        "str kernel=\"position\") -> (Tensor, Tensor)",
    )
    def _rotary_op(q, k, cos, sin, position_ids, backward, kernel="position"):
        return _rotary(q, k, cos, sin, position_ids, inplace=False, backward=backward, kernel=kernel)

    @_rotary_op.register_fake
    def _(q, k, cos, sin, position_ids, backward, kernel="position"):
        return q.new_empty(q.shape), k.new_empty(k.shape)

    def _rotary_setup_context(ctx, inputs, output):
        _, _, cos, sin, position_ids, backward, kernel = inputs
        ctx.backward = backward
        ctx.kernel = kernel
        ctx.save_for_backward(cos, sin, position_ids)

    def _rotary_op_backward(ctx, dq, dk):
        cos, sin, position_ids = ctx.saved_tensors
        dq_in, dk_in = _rotary_op(dq, dk, cos, sin, position_ids, not ctx.backward, ctx.kernel)
        return dq_in, dk_in, None, None, None, None, None

    _rotary_op.register_autograd(_rotary_op_backward, setup_context=_rotary_setup_context)
