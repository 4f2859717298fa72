"""Fused RMSNorm (and the pre-norm block's fused residual add): Triton kernels + PyTorch reference.

Default semantics (released Xmodel / HF Llama, ``casting_mode="llama"``, ``offset=0``):
``y = weight * (x32 * rsqrt(mean(x32**2, -1) + eps)).to(x.dtype)`` with ``x32 = x.float()`` -- normalise in
fp32, cast back to the input dtype, THEN multiply by the weight.  ``weight`` must have the dtype of ``x`` (the
model keeps norm weights in the activation dtype), so the output dtype is ``x.dtype``; :class:`RMSNorm` casts
its weight to the input dtype when they differ.

Options (the keyword names of Liger-Kernel's ``LigerRMSNorm`` / ``liger_rms_norm``, so a Liger user switches by
changing the import).  With ``x̂ = x * rstd`` and ``w' = offset + weight``:

* ``offset`` (Gemma: ``x̂ * (1 + w)``): the weight is used as ``offset + weight``.
* ``casting_mode``:

  - ``"llama"`` (default): ``rstd`` and ``x̂`` in fp32, ``x̂`` rounded to ``x.dtype``, then
    ``y = round(w' * x̂_rounded)`` with ``w'`` in fp32 (for ``offset=0`` exactly ``weight * x̂_rounded``).
  - ``"gemma"`` (HF Gemma): everything in fp32 -- ``y = round(x̂ * w')`` -- one rounding at the end.  Here the
    weight may also be fp32 with bf16/fp16 ``x`` (fp32 master weight, as HF Gemma computes ``1 + w.float()``).
  - ``"none"``: what ``x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * (offset + w)`` computes when
    every tensor has the input dtype: each square ``x*x`` rounded to the dtype; their mean accumulated in fp32
    and rounded; ``+ eps`` rounded; ``rsqrt`` rounded; ``x * rstd`` rounded; ``offset + w`` rounded; the final
    product rounded.  (Every step is computed in fp32 and rounded once, which is what torch's bf16/fp16 kernels
    do; only the mean's summation order differs.)  For fp32 inputs the three modes agree to rounding.

* ``weight=None`` (``RMSNorm(elementwise_affine=False)``): ``y = x̂`` rounded (no affine; ``offset`` must be 0).
* ``in_place=True``: the backward writes ``dx`` into the buffer of ``dy`` (the incoming gradient of ``y``) instead
  of a fresh tensor, saving one activation-sized allocation.  Safe only when nothing else reads that gradient
  after this backward: NOT when ``y``'s gradient tensor is shared with another autograd node, e.g. ``y`` is
  also returned / added to a residual that keeps the same gradient (``out = h + norm(h)``-style graphs), or
  when the caller holds on to ``dy``.  Only contiguous ``dy`` buffers are reused (a broadcast or strided
  gradient gets a fresh ``dx``); under ``torch.compile`` the op is functional and the option is ignored (the
  compiler plans buffers itself); the PyTorch path ignores it too.

Gradients (all modes; the casts are straight-through, as torch autograd treats them), per row of length H with
``g = dy * w'`` (``g = dy`` without a weight):

* ``dx = rstd * (g - x̂ * mean(g * x̂))``
* ``dweight = sum over rows of dy * x̂`` (``x̂`` rounded to ``x.dtype`` first in "llama"/"none", as the forward
  multiplies the rounded value), in fp32 partials summed deterministically.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import nn

from xkernels._checks import check_float, check_nonempty, check_same_device
from xkernels.dispatch import compiling, launch_on, triton_available, use_triton

# casting_mode names (Liger-Kernel's) -> the kernels' constexpr
CASTING_MODES = {"llama": 0, "gemma": 1, "none": 2}

# ----------------------------------------------------------------------------------------------------
# PyTorch reference (CPU path, tests, benchmarks)
# ----------------------------------------------------------------------------------------------------


def rms_norm_ref(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float = 1e-5,
    offset: float = 0.0,
    casting_mode: str = "llama",
) -> torch.Tensor:
    """RMSNorm over the last dim in the given ``casting_mode`` (see the module docstring).

    Default: ``weight * (x32 * rsqrt(mean(x32^2, -1) + eps)).to(x.dtype)`` with ``x32 = x.float()``.
    A float64 ``x`` is computed in float64 in every mode (used by the tests as the high-precision reference).
    """
    if casting_mode == "none" or x.dtype == torch.float64:
        normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        if weight is None:
            return normed
        return normed * (offset + weight) if offset else normed * weight
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if casting_mode == "gemma":
        if weight is not None:
            normed = normed * (offset + weight.float())
        return normed.to(x.dtype)
    if weight is None:
        return normed.to(x.dtype)
    if not offset:
        return weight * normed.to(x.dtype)  # the released code, bit for bit
    return ((offset + weight.float()) * normed.to(x.dtype).float()).to(x.dtype)


def add_rms_norm_ref(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float = 1e-5,
    scale: float | None = None,
    offset: float = 0.0,
    casting_mode: str = "llama",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``s = x + residual`` (in the input dtype); returns ``(rms_norm_ref(s, weight, eps, offset, casting_mode), s)``.

    With ``scale``: ``s = (residual32 + scale * x32).to(x.dtype)`` -- computed in fp32 (``scale`` rounded to
    fp32, as torch does for a Python scalar times an fp32 tensor) and rounded once; for fp32 inputs this is
    exactly eager ``residual + scale * x``.  Gradients: ``d residual = d s``, ``d x = scale * d s``.
    """
    if scale is None:
        s = x + residual
    elif x.dtype == torch.float64:
        s = residual + x * scale
    else:
        s = (residual.float() + x.float() * scale).to(x.dtype)
    return rms_norm_ref(s, weight, eps, offset, casting_mode), s


def rms_norm_bwd_ref(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float = 1e-5,
    offset: float = 0.0,
    casting_mode: str = "llama",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Closed-form gradients of :func:`rms_norm_ref` (ignoring the rounding of the casts), in fp32.

    With ``r = rsqrt(mean(x^2) + eps)``, ``n = x * r`` and ``g = dy * (offset + weight)`` (per row of length H):

    * ``dx = r * (g - n * mean(g * n))``
    * ``dweight = sum over rows of dy * n`` (``n.to(x.dtype)`` in "llama" / "none" mode)

    Returns ``(dx in x.dtype, dweight in weight.dtype or None without a weight)``.
    """
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf, dyf = x.to(acc), dy.to(acc)
    r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    n = xf * r
    g = dyf if weight is None else dyf * (offset + weight.to(acc))
    dx = r * (g - n * (g * n).mean(-1, keepdim=True))
    if weight is None:
        return dx.to(x.dtype), None
    n_w = n if casting_mode == "gemma" else n.to(x.dtype).to(acc)
    dw = (dyf * n_w).reshape(-1, x.shape[-1]).sum(0)
    return dx.to(x.dtype), dw.to(weight.dtype)


# ----------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------

if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _rms_square(x, Y, CASTING: tl.constexpr):
        """``x * x`` in fp32; "none" mode rounds each square to the input dtype (``x.pow(2)`` in that dtype)."""
        if CASTING == 2:
            return (x * x).to(Y.dtype.element_ty).to(tl.float32)
        return x * x

    @triton.jit
    def _rms_rstd(sum_sq, n_cols, eps, Y, CASTING: tl.constexpr):
        """``1 / sqrt(sum_sq / H + eps)``; "none" mode rounds the mean, the sum with eps and the result."""
        if CASTING == 2:
            dt = Y.dtype.element_ty
            mean_sq = (sum_sq / n_cols).to(dt).to(tl.float32)
            return (1.0 / tl.sqrt((mean_sq + eps).to(dt).to(tl.float32))).to(dt).to(tl.float32)
        return 1.0 / tl.sqrt(sum_sq / n_cols + eps)

    @triton.jit
    def _rms_output(x, rstd, W, cols, mask, offset, Y, HAS_WEIGHT: tl.constexpr, HAS_OFFSET: tl.constexpr,
                    CASTING: tl.constexpr):
        """``y`` in the output dtype from fp32 ``x`` and ``rstd`` (see the module docstring's casting modes)."""
        dt = Y.dtype.element_ty
        if CASTING == 1:  # gemma: fp32 throughout, one rounding
            y = x * rstd
        else:  # llama / none: the normalised value is rounded before the weight multiplies it
            y = (x * rstd).to(dt).to(tl.float32)
        if HAS_WEIGHT:
            w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_OFFSET:
                w = offset + w
                if CASTING == 2:
                    w = w.to(dt).to(tl.float32)
            y = w * y
        return y.to(dt)

    @triton.jit
    def _rmsnorm_fwd_kernel(
        X,  # (M, H) input rows, last dim contiguous
        R,  # (M, H) residual rows (read only when HAS_RESIDUAL)
        W,  # (H,) weight, dtype of X (fp32 allowed in "gemma" mode); read only when HAS_WEIGHT
        Y,  # (M, H) output, contiguous
        S,  # (M, H) x + residual, contiguous (written only when HAS_RESIDUAL)
        RSTD,  # (M,) fp32 1/rms per row, saved for backward
        stride_x,  # row strides in elements
        stride_r,
        n_cols,
        eps,
        scale,  # fp32 multiplier of x before the add (used only when HAS_SCALE)
        offset,  # fp32, the weight is used as offset + w (used only when HAS_OFFSET)
        n_rows,  # (read only by the WARP_ROWS layout, whose last program may hold fewer rows)
        HAS_RESIDUAL: tl.constexpr,
        HAS_SCALE: tl.constexpr,
        BLOCK: tl.constexpr,
        ONE_BLOCK: tl.constexpr,  # the whole row fits in one BLOCK: keep it in registers
        HAS_WEIGHT: tl.constexpr,
        HAS_OFFSET: tl.constexpr,
        CASTING: tl.constexpr,  # 0 llama, 1 gemma, 2 none (CASTING_MODES)
        WARP_ROWS: tl.constexpr,  # > 0: the "warp_per_row" layout, WARP_ROWS rows per program (see _launch_config)
    ):
        """One program per row.  ``s = x + r`` (rounded to the input dtype, as torch would), then
        ``rstd = 1 / sqrt(mean(s^2) + eps)`` in fp32, ``y = w * (s * rstd).to(dtype)`` rounded once
        ("llama"; "gemma" / "none" round as the module docstring says).

        With ``HAS_SCALE``: ``s = r + scale * x`` in fp32, rounded once (the launcher turns FMA contraction
        off so the product is rounded before the add, exactly as eager torch computes it)."""
        row = tl.program_id(0).to(tl.int64)
        x_row = X + row * stride_x
        r_row = R + row * stride_r
        y_row = Y + row * n_cols
        s_row = S + row * n_cols
        if WARP_ROWS > 0:
            # One warp per row (QuACK style): a (WARP_ROWS, BLOCK) tile with BLOCK = 32 lanes x one 128-bit vector,
            # so the layout gives each warp one row and the row reduction is warp shuffles only (no shared memory,
            # no barrier).  The row is walked in BLOCK chunks that divide common hidden sizes exactly (1536 =
            # 6 x 256 in bf16: no padded lanes); pass 2 re-reads it from L1.
            rows = tl.program_id(0).to(tl.int64) * WARP_ROWS + tl.arange(0, WARP_ROWS)
            row_ok = (rows < n_rows)[:, None]
            rows = rows[:, None]
            acc = tl.zeros([WARP_ROWS, BLOCK], dtype=tl.float32)
            for start in range(0, n_cols, BLOCK):
                cols = start + tl.arange(0, BLOCK)[None, :]
                mask = row_ok & (cols < n_cols)
                x = tl.load(X + rows * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
                if HAS_RESIDUAL:
                    if HAS_SCALE:
                        x = x * scale
                    x += tl.load(R + rows * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
                    s = x.to(S.dtype.element_ty)
                    tl.store(S + rows * n_cols + cols, s, mask=mask)
                    x = s.to(tl.float32)
                acc += _rms_square(x, Y, CASTING)
            rstd = _rms_rstd(tl.sum(acc, axis=1), n_cols, eps, Y, CASTING)
            for start in range(0, n_cols, BLOCK):
                cols = start + tl.arange(0, BLOCK)[None, :]
                mask = row_ok & (cols < n_cols)
                if HAS_RESIDUAL:
                    x = tl.load(S + rows * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
                else:
                    x = tl.load(X + rows * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
                # the weight chunk read through a (WARP_ROWS, BLOCK) pointer tile (each warp its own copy, L1 hits):
                # a (1, BLOCK) load gets a layout spread over the warps and a shared-memory conversion per chunk
                w_cols = cols + tl.zeros([WARP_ROWS, 1], dtype=tl.int32)
                y = _rms_output(x, rstd[:, None], W, w_cols, w_cols < n_cols, offset, Y, HAS_WEIGHT, HAS_OFFSET,
                                CASTING)
                tl.store(Y + rows * n_cols + cols, y, mask=mask)
            tl.store(RSTD + rows, rstd[:, None], mask=row_ok)
        elif ONE_BLOCK:
            cols = tl.arange(0, BLOCK)
            mask = cols < n_cols
            x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_RESIDUAL:
                if HAS_SCALE:
                    x = x * scale
                x += tl.load(r_row + cols, mask=mask, other=0.0).to(tl.float32)
                s = x.to(S.dtype.element_ty)
                tl.store(s_row + cols, s, mask=mask)
                x = s.to(tl.float32)  # normalise exactly the stored sum
            rstd = _rms_rstd(tl.sum(_rms_square(x, Y, CASTING), axis=0), n_cols, eps, Y, CASTING)
            y = _rms_output(x, rstd, W, cols, mask, offset, Y, HAS_WEIGHT, HAS_OFFSET, CASTING)
            tl.store(y_row + cols, y, mask=mask)
        else:
            # Long rows: pass 1 sums squares chunk by chunk (and writes s), pass 2 re-reads the row
            # (from L2 on a GPU) and normalises.
            acc = tl.zeros([BLOCK], dtype=tl.float32)
            for start in range(0, n_cols, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                mask = cols < n_cols
                x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
                if HAS_RESIDUAL:
                    if HAS_SCALE:
                        x = x * scale
                    x += tl.load(r_row + cols, mask=mask, other=0.0).to(tl.float32)
                    s = x.to(S.dtype.element_ty)
                    tl.store(s_row + cols, s, mask=mask)
                    x = s.to(tl.float32)
                acc += _rms_square(x, Y, CASTING)
            rstd = _rms_rstd(tl.sum(acc, axis=0), n_cols, eps, Y, CASTING)
            for start in range(0, n_cols, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                mask = cols < n_cols
                if HAS_RESIDUAL:
                    x = tl.load(s_row + cols, mask=mask, other=0.0).to(tl.float32)
                else:
                    x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
                y = _rms_output(x, rstd, W, cols, mask, offset, Y, HAS_WEIGHT, HAS_OFFSET, CASTING)
                tl.store(y_row + cols, y, mask=mask)
        if WARP_ROWS == 0:
            tl.store(RSTD + row, rstd)

    @triton.jit
    def _rms_grad_scale(dy, W, cols, mask, offset, X, HAS_WEIGHT: tl.constexpr, HAS_OFFSET: tl.constexpr,
                        CASTING: tl.constexpr):
        """``g = dy * (offset + w)`` in fp32 (``dy`` without a weight)."""
        if HAS_WEIGHT:
            w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_OFFSET:
                w = offset + w
                if CASTING == 2:
                    w = w.to(X.dtype.element_ty).to(tl.float32)
            return dy * w
        return dy

    @triton.jit
    def _rms_dw_term(dy, n, X, CASTING: tl.constexpr):
        """This row's ``dweight`` share: ``dy`` times the value the forward multiplied by the weight."""
        if CASTING == 1:
            return dy * n
        return dy * n.to(X.dtype.element_ty).to(tl.float32)

    @triton.jit
    def _rmsnorm_bwd_kernel(
        DY,  # (M, H) gradient of y, last dim contiguous
        X,  # (M, H) the normalised input (x, or s = x + residual), last dim contiguous
        W,  # (H,) weight
        RSTD,  # (M,) fp32 from the forward
        DS,  # (M, H) gradient of the returned s (read only when HAS_DS), last dim contiguous
        DX,  # (M, H) output: gradient of x (= of residual in the fused variant), contiguous
        DXS,  # (M, H) output: scale * DX, the gradient of the scaled input (written only when HAS_SCALE)
        DW_PARTIAL,  # (n_programs, H) fp32: this program's share of dweight
        stride_dy,  # row strides in elements
        stride_x,
        stride_ds,
        n_rows,
        n_cols,
        rows_per_program,
        scale,
        offset,  # fp32, the weight is used as offset + w (used only when HAS_OFFSET)
        HAS_DS: tl.constexpr,
        HAS_SCALE: tl.constexpr,
        BLOCK: tl.constexpr,
        ONE_BLOCK: tl.constexpr,
        NUM_STAGES: tl.constexpr,  # software-pipelining depth of the row loop (chunk loop for long rows)
        HAS_WEIGHT: tl.constexpr,  # False: g = dy, no dweight (DW_PARTIAL untouched)
        HAS_OFFSET: tl.constexpr,
        CASTING: tl.constexpr,  # 0 llama, 1 gemma, 2 none: whether n is rounded in dweight (not gemma)
    ):
        """Per row, with ``n = x * rstd`` and ``g = dy * w`` (fp32):

        * ``dx = rstd * (g - n * mean(g * n))`` (+ ``ds`` for the fused add, whose two inputs share it),
        * ``dw += dy * n.to(dtype)`` (``dy * n`` in "gemma" mode) accumulated over this program's rows in fp32, stored to its own row
          of ``DW_PARTIAL``; the launcher sums the partials (deterministic, no atomics).

        The cast in the forward is treated as identity for ``dx`` (straight-through), as torch autograd does.
        ``w`` stands for ``offset + w`` (rounded to the dtype in "none" mode) and for 1 without a weight.
        DX may be DY's own buffer (``in_place``): every element of a row is loaded before it is overwritten.
        With ``HAS_SCALE`` (forward ``s = r + scale * x``) also ``dxs = scale * dx.to(dtype)``, the
        gradient of ``x``, computed from the rounded ``dx`` exactly as autograd through the reference does.
        """
        pid = tl.program_id(0)
        # int32 row indices (n_rows < 2**31); every address is formed in int64 (row.to(int64) * stride).
        row_start = pid * rows_per_program
        row_end = tl.minimum(row_start + rows_per_program, n_rows)
        dw_row = DW_PARTIAL + pid.to(tl.int64) * n_cols
        if ONE_BLOCK:
            cols = tl.arange(0, BLOCK)
            mask = cols < n_cols
            dw = tl.zeros([BLOCK], dtype=tl.float32)
            # Rows are independent: tl.range software-pipelines the loop (NUM_STAGES - 1 rows of x / dy / ds
            # prefetched through shared memory with cp.async on sm_80+), hiding the load latency that one
            # program per row-chunk would otherwise expose.  w is re-read per row (an L1 hit) rather than
            # held in registers across the loop: that keeps the kernel at <= 64 registers per thread.
            for row in tl.range(row_start, row_end, num_stages=NUM_STAGES):
                r64 = tl.cast(row, tl.int64)  # tl.cast: the interpreter yields Python ints here
                x = tl.load(X + r64 * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
                dy = tl.load(DY + r64 * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
                rstd = tl.load(RSTD + r64)
                n = x * rstd
                g = _rms_grad_scale(dy, W, cols, mask, offset, X, HAS_WEIGHT, HAS_OFFSET, CASTING)
                c = tl.sum(g * n, axis=0) / n_cols
                dx = rstd * (g - n * c)
                if HAS_DS:
                    dx += tl.load(DS + r64 * stride_ds + cols, mask=mask, other=0.0).to(tl.float32)
                tl.store(DX + r64 * n_cols + cols, dx.to(DX.dtype.element_ty), mask=mask)
                if HAS_SCALE:
                    dxs = dx.to(DX.dtype.element_ty).to(tl.float32) * scale
                    tl.store(DXS + r64 * n_cols + cols, dxs.to(DXS.dtype.element_ty), mask=mask)
                if HAS_WEIGHT:
                    dw += _rms_dw_term(dy, n, X, CASTING)
            if HAS_WEIGHT:
                tl.store(dw_row + cols, dw, mask=mask)
        else:
            # Long rows: the dweight partial lives in this program's own row of DW_PARTIAL (no other
            # program touches it), updated chunk by chunk.
            if HAS_WEIGHT:
                for start in range(0, n_cols, BLOCK):
                    cols = start + tl.arange(0, BLOCK)
                    tl.store(dw_row + cols, tl.zeros([BLOCK], dtype=tl.float32), mask=cols < n_cols)
            tl.debug_barrier()  # the zeros are visible to every thread before the read-modify-writes
            for row in range(row_start, row_end):
                r64 = tl.cast(row, tl.int64)  # tl.cast: the interpreter yields Python ints here
                rstd = tl.load(RSTD + r64)
                acc = tl.zeros([BLOCK], dtype=tl.float32)
                for start in tl.range(0, n_cols, BLOCK, num_stages=NUM_STAGES):
                    cols = start + tl.arange(0, BLOCK)
                    mask = cols < n_cols
                    x = tl.load(X + r64 * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
                    dy = tl.load(DY + r64 * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
                    acc += _rms_grad_scale(dy, W, cols, mask, offset, X, HAS_WEIGHT, HAS_OFFSET, CASTING) * x
                c = tl.sum(acc, axis=0) * rstd / n_cols
                # not pipelined: this loop read-modify-writes DW_PARTIAL, and a cp.async prefetch issued by
                # one thread is not ordered after another thread's store without a barrier
                for start in range(0, n_cols, BLOCK):
                    cols = start + tl.arange(0, BLOCK)
                    mask = cols < n_cols
                    x = tl.load(X + r64 * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
                    dy = tl.load(DY + r64 * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
                    n = x * rstd
                    g = _rms_grad_scale(dy, W, cols, mask, offset, X, HAS_WEIGHT, HAS_OFFSET, CASTING)
                    dx = rstd * (g - n * c)
                    if HAS_DS:
                        dx += tl.load(DS + r64 * stride_ds + cols, mask=mask, other=0.0).to(tl.float32)
                    tl.store(DX + r64 * n_cols + cols, dx.to(DX.dtype.element_ty), mask=mask)
                    if HAS_SCALE:
                        dxs = dx.to(DX.dtype.element_ty).to(tl.float32) * scale
                        tl.store(DXS + r64 * n_cols + cols, dxs.to(DXS.dtype.element_ty), mask=mask)
                    if HAS_WEIGHT:
                        dw = tl.load(dw_row + cols, mask=mask, other=0.0)
                        tl.store(dw_row + cols, dw + _rms_dw_term(dy, n, X, CASTING), mask=mask)


# ----------------------------------------------------------------------------------------------------
# Launchers (no autograd): 2-D row views in, fresh tensors out
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Launch:
    block: int
    one_block: bool
    num_warps: int
    warp_rows: int = 0  # > 0: the forward's "warp_per_row" layout, this many rows (one per warp) per program


# Rows up to _MAX_ONE_BLOCK elements stay in registers in one block (8192 fp32 = 16 values per thread
# at 16 warps); longer rows loop over 4096-element chunks.  Warp counts follow the Triton layer-norm
# tutorial / Liger-Kernel practice (4 warps to 2048, 8 to 4096, 16 above); not tuned on a GPU here.
_MAX_ONE_BLOCK = 8192
_CHUNK = 4096

# Launch structure, selectable so a GPU session can time old against new (issue 21 item 4); the defaults are the
# released structure until a GPU measurement says otherwise.
#
# FWD_LAYOUT: "block" -- one program per row, BLOCK = next_power_of_2(H) (H = 1536 -> 2048: 25% of the lanes masked
#   off) spread over 4 warps, so each row reduction goes through shared memory with a barrier;
#   "warp_per_row" -- WARP_ROWS rows per program, one warp each, 32 lanes x one 128-bit vector per chunk (bf16: 256
#   columns, fp32: 128), the row walked in chunks (1536 = 6 x 256: no masked lanes), reductions by warp shuffles.
# BWD_SCHEDULE: "occupancy" -- as many programs as fit on the GPU at once (from the compiled kernel's registers and
#   shared memory: 4 per SM at H=1536 bf16 = 528 fp32 dweight partial rows on 132 SMs), one row prefetched
#   (NUM_STAGES=2); "per_sm" -- one program per SM (132 partial rows: ~4x less partial traffic) with two rows in
#   flight (NUM_STAGES=3) to hide the load latency the fewer resident warps no longer hide.
FWD_LAYOUT = "block"
BWD_SCHEDULE = "occupancy"
_FWD_LAYOUTS = ("block", "warp_per_row")
_BWD_SCHEDULES = ("occupancy", "per_sm")
_WARP_ROWS = 4  # rows (= warps) per program of the warp_per_row forward: 128 threads, as the block layout's 4 warps


def _launch_config(n_cols: int, elem_size: int | None = None, layout: str | None = None) -> _Launch:
    """The forward's configuration (``layout`` defaults to :data:`FWD_LAYOUT`; ``warp_per_row`` needs the element
    size of the rows, and applies up to _MAX_ONE_BLOCK columns)."""
    layout = FWD_LAYOUT if layout is None else layout
    if layout not in _FWD_LAYOUTS:
        raise ValueError(f"xkernels.rmsnorm.FWD_LAYOUT must be one of {_FWD_LAYOUTS}, got {layout!r}")
    block = triton.next_power_of_2(n_cols)
    one_block = block <= _MAX_ONE_BLOCK
    if layout == "warp_per_row" and elem_size is not None and one_block:
        vec = 32 * (16 // elem_size)  # one 128-bit vector per lane per chunk
        return _Launch(min(vec, block), False, _WARP_ROWS, _WARP_ROWS)
    if not one_block:
        block = _CHUNK
    num_warps = 4 if block <= 2048 else 8 if block <= 4096 else 16
    return _Launch(block, one_block, num_warps)


# Backward: 8 elements of a row per thread (num_warps = BLOCK / 256, 4..32).  The backward keeps more per
# element live than the forward (x, dy, the dweight accumulator, n, g), and at 16 elements per thread
# it needed 95-127 registers on sm_90a (Triton 3.6); at 8 it fits the 64-register budget with no
# spills, so more programs share an SM.  Checked ahead of time by tests/test_rmsnorm.py.
_BWD_ELEMENTS_PER_THREAD = 8
# Row-loop pipelining depth: 2 = one row (x, dy, ds) prefetched into shared memory while this one is
# computed.  Deeper costs shared memory per program (2-3 x BLOCK x 2 B per stage) that the occupancy
# computation below then charges against programs per SM.  The "per_sm" schedule uses 3.
_BWD_STAGES = 2


def _bwd_launch_config(n_cols: int, schedule: str | None = None) -> tuple[_Launch, int]:
    """``(config, num_stages)`` of the backward (``schedule`` defaults to :data:`BWD_SCHEDULE`)."""
    schedule = BWD_SCHEDULE if schedule is None else schedule
    if schedule not in _BWD_SCHEDULES:
        raise ValueError(f"xkernels.rmsnorm.BWD_SCHEDULE must be one of {_BWD_SCHEDULES}, got {schedule!r}")
    fwd = _launch_config(n_cols, layout="block")
    num_warps = max(4, min(32, fwd.block // (32 * _BWD_ELEMENTS_PER_THREAD)))
    return _Launch(fwd.block, fwd.one_block, num_warps), (3 if schedule == "per_sm" else _BWD_STAGES)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def programs_per_sm(n_regs: int, shared_bytes: int, num_warps: int, device_index: int) -> int:
    """How many programs of a compiled kernel fit on one SM at once: the least of the register file
    (registers are allocated per warp in units of 256), the shared memory, the thread limit and the
    resident-block limit of ``device_index``'s architecture."""
    props = torch.cuda.get_device_properties(device_index)
    regs_per_sm = getattr(props, "regs_per_multiprocessor", 65536)
    threads_per_sm = getattr(props, "max_threads_per_multi_processor", 2048)
    smem_per_sm = getattr(props, "shared_memory_per_multiprocessor", 228 * 1024)
    regs_per_warp = -(-max(n_regs, 1) * 32 // 256) * 256
    by_regs = (regs_per_sm // regs_per_warp) // num_warps
    by_threads = threads_per_sm // (32 * num_warps)
    # each resident block also reserves 1 KiB of shared memory for the system on sm_80+
    by_smem = smem_per_sm // (shared_bytes + 1024) if shared_bytes else 32
    return max(1, min(by_regs, by_threads, by_smem, 32))


_BWD_OCCUPANCY: dict = {}


def _bwd_programs(n_rows: int, device: torch.device, compiled=None, key=None) -> int:
    """Programs in the backward: one wave of as many programs as fit on the GPU at once, from the
    compiled kernel's registers and shared memory (``compiled``, cached under ``key``), and at least 8 rows
    each.  Each program accumulates dweight over its rows and writes one fp32 row of partials (2 x 4 B x H
    of traffic), so a single full wave, rather than more programs, is the target.  The interpreter runs
    programs one after another: a handful suffices there."""
    if device.type != "cuda":
        return max(1, min(triton.cdiv(n_rows, 8), 4))
    index = device.index if device.index is not None else torch.cuda.current_device()
    per_sm = _BWD_OCCUPANCY.get(key)
    if per_sm is None:
        if compiled is None:
            per_sm = 4
        else:
            if getattr(compiled, "n_regs", None) is None and hasattr(compiled, "_init_handles"):
                compiled._init_handles()
            cfg_warps = compiled.metadata.num_warps
            per_sm = programs_per_sm(compiled.n_regs, compiled.metadata.shared, cfg_warps, index)
            _BWD_OCCUPANCY[key] = per_sm
    return max(1, min(triton.cdiv(n_rows, 8), per_sm * _sm_count(index)))


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a 2-D ``(rows, hidden)`` view with a contiguous last dim (copies only when it must)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _rmsnorm_fwd(
    x2: torch.Tensor,
    r2: torch.Tensor | None,
    weight: torch.Tensor | None,
    eps: float,
    scale: float | None = None,
    offset: float = 0.0,
    casting: int = 0,
):
    """Returns ``(y, s_or_None, rstd)`` for 2-D rows ``x2`` (and residual rows ``r2``, ``s = r2 + scale * x2``)."""
    n_rows, n_cols = x2.shape
    cfg = _launch_config(n_cols, x2.element_size())
    weight = weight.contiguous() if weight is not None else None
    y = torch.empty((n_rows, n_cols), dtype=x2.dtype, device=x2.device)
    s = torch.empty_like(y) if r2 is not None else None
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x2.device)
    with launch_on(x2):  # the launch goes to x2's GPU, not the current one
        _rmsnorm_fwd_kernel[(triton.cdiv(n_rows, cfg.warp_rows) if cfg.warp_rows else n_rows,)](
            x2,
            r2 if r2 is not None else x2,
            weight if weight is not None else x2,
            y,
            s if s is not None else y,
            rstd,
            x2.stride(0),
            r2.stride(0) if r2 is not None else 0,
            n_cols,
            eps,
            1.0 if scale is None else scale,
            offset,
            n_rows,
            HAS_RESIDUAL=r2 is not None,
            HAS_SCALE=scale is not None,
            BLOCK=cfg.block,
            ONE_BLOCK=cfg.one_block,
            HAS_WEIGHT=weight is not None,
            HAS_OFFSET=offset != 0.0,
            CASTING=casting,
            WARP_ROWS=cfg.warp_rows,
            num_warps=cfg.num_warps,
            # no FMA contraction of ``scale * x + r``: the product rounds first, as in eager torch
            **({"enable_fp_fusion": False} if scale is not None else {}),
        )
    return y, s, rstd


def _rmsnorm_bwd(dy2, x2, weight, rstd, ds2, scale: float | None = None, offset: float = 0.0, casting: int = 0,
                 in_place: bool = False):
    """Returns ``(dx, dweight_or_None, dx_scaled_or_None)`` for 2-D rows; ``ds2`` is the gradient of ``s`` (fused
    add) or None; with ``scale`` the third output is ``scale * dx``, the gradient of the scaled input.
    ``in_place``: ``dx`` is written into ``dy2``'s buffer when that is a plain contiguous ``(M, H)`` tensor."""
    n_rows, n_cols = x2.shape
    schedule = BWD_SCHEDULE
    cfg, stages = _bwd_launch_config(n_cols, schedule)
    weight = weight.contiguous() if weight is not None else None
    if in_place and dy2.is_contiguous() and dy2.dtype == x2.dtype:
        dx = dy2
    else:
        dx = torch.empty((n_rows, n_cols), dtype=x2.dtype, device=x2.device)
    dxs = torch.empty_like(dx) if scale is not None else None
    consts = dict(
        HAS_DS=ds2 is not None,
        HAS_SCALE=scale is not None,
        BLOCK=cfg.block,
        ONE_BLOCK=cfg.one_block,
        NUM_STAGES=stages,
        HAS_WEIGHT=weight is not None,
        HAS_OFFSET=offset != 0.0,
        CASTING=casting,
        num_warps=cfg.num_warps,
    )

    def args(dw_partial, rows_per_program):
        return (
            dy2,
            x2,
            weight if weight is not None else x2,
            rstd,
            ds2 if ds2 is not None else dy2,
            dx,
            dxs if dxs is not None else dx,
            dw_partial,
            dy2.stride(0),
            x2.stride(0),
            ds2.stride(0) if ds2 is not None else 0,
            n_rows,
            n_cols,
            rows_per_program,
            1.0 if scale is None else scale,
            offset,
        )

    compiled = key = None
    with launch_on(x2):  # compiling loads the module onto the current device: make it x2's
        if x2.device.type == "cuda" and schedule == "occupancy":
            key = (x2.device.index, x2.dtype, tuple(sorted(consts.items())))
            if key not in _BWD_OCCUPANCY:  # once per configuration: compile without launching, read its resources
                compiled = _rmsnorm_bwd_kernel.warmup(*args(rstd, 1), grid=(1,), **consts)
        programs = _bwd_programs(n_rows, x2.device, compiled, key)
        if x2.device.type == "cuda" and schedule == "per_sm":
            index = x2.device.index if x2.device.index is not None else torch.cuda.current_device()
            programs = max(1, min(triton.cdiv(n_rows, 8), _sm_count(index)))
    rows_per_program = triton.cdiv(n_rows, programs)
    programs = triton.cdiv(n_rows, rows_per_program)
    if weight is not None:
        dw_partial = torch.empty((programs, n_cols), dtype=torch.float32, device=x2.device)
    else:
        dw_partial = rstd  # never touched (HAS_WEIGHT=False)
    with launch_on(x2):  # the launch goes to x2's GPU, not the current one
        _rmsnorm_bwd_kernel[(programs,)](*args(dw_partial, rows_per_program), **consts)
    dw = dw_partial.sum(0).to(weight.dtype) if weight is not None else None
    return dx, dw, dxs


class _RMSNormFunction(torch.autograd.Function):
    """Autograd over 2-D rows; ``residual`` may be None (plain RMSNorm, second output None), so may ``weight``."""

    @staticmethod
    def forward(ctx, x2, r2, weight, eps, scale=None, offset=0.0, casting=0, in_place=False):
        y, s, rstd = _rmsnorm_fwd(x2, r2, weight, eps, scale, offset, casting)
        ctx.save_for_backward(s if s is not None else x2, weight, rstd)
        ctx.has_residual = r2 is not None
        ctx.scale, ctx.offset, ctx.casting, ctx.in_place = scale, offset, casting, in_place
        if s is None:
            return y
        return y, s

    @staticmethod
    def backward(ctx, dy, *maybe_ds):
        x2, weight, rstd = ctx.saved_tensors
        ds = maybe_ds[0] if maybe_ds else None
        dy = dy if dy.stride(-1) == 1 else dy.contiguous()
        if ds is not None and ds.stride(-1) != 1:
            ds = ds.contiguous()
        dx, dw, dxs = _rmsnorm_bwd(dy, x2, weight, rstd, ds, ctx.scale, ctx.offset, ctx.casting, ctx.in_place)
        # the residual's gradient is d s; the input's is scale * d s when scaled
        dinput = dxs if dxs is not None else dx
        return dinput, (dx if ctx.has_residual else None), dw, None, None, None, None, None


# torch.compile: the same launchers as opaque custom ops, traced through their fake (shape-only) impls.
# Eager calls keep the cheaper autograd.Function above; compiled code switches to these (functional: no in_place).
_CUSTOM_OPS = triton_available() and hasattr(torch.library, "custom_op")
if _CUSTOM_OPS:

    @torch.library.custom_op(
        "xkernels::rms_norm_fwd",
        mutates_args=(),
        schema="(Tensor x2, Tensor? residual, Tensor? weight, float eps, float? scale=None, float offset=0.0, "
        "int casting=0) -> (Tensor, Tensor, Tensor)",
    )
    def _rms_norm_fwd_op(x2, residual, weight, eps, scale=None, offset=0.0, casting=0):
        """``(y, s, rstd)``; ``s`` is an empty tensor without a residual (outputs may not alias inputs)."""
        y, s, rstd = _rmsnorm_fwd(x2, residual, weight, eps, scale, offset, casting)
        return y, (s if s is not None else x2.new_empty(0)), rstd

    @_rms_norm_fwd_op.register_fake
    def _(x2, residual, weight, eps, scale=None, offset=0.0, casting=0):
        s = x2.new_empty(x2.shape) if residual is not None else x2.new_empty(0)
        return x2.new_empty(x2.shape), s, x2.new_empty(x2.shape[0], dtype=torch.float32)

    @torch.library.custom_op(
        "xkernels::rms_norm_bwd",
        mutates_args=(),
        schema="(Tensor dy, Tensor x2, Tensor? weight, Tensor rstd, Tensor? ds, float? scale=None, "
        "float offset=0.0, int casting=0) -> (Tensor, Tensor, Tensor)",
    )
    def _rms_norm_bwd_op(dy, x2, weight, rstd, ds, scale=None, offset=0.0, casting=0):
        """``(dx, dweight, dx_scaled)``; ``dx_scaled`` is empty without ``scale``, ``dweight`` without a weight."""
        dy = dy if dy.stride(-1) == 1 else dy.contiguous()
        if ds is not None and ds.stride(-1) != 1:
            ds = ds.contiguous()
        dx, dw, dxs = _rmsnorm_bwd(dy, x2, weight, rstd, ds, scale, offset, casting)
        return dx, (dw if dw is not None else x2.new_empty(0)), (dxs if dxs is not None else x2.new_empty(0))

    @_rms_norm_bwd_op.register_fake
    def _(dy, x2, weight, rstd, ds, scale=None, offset=0.0, casting=0):
        dxs = x2.new_empty(x2.shape) if scale is not None else x2.new_empty(0)
        dw = weight.new_empty(weight.shape) if weight is not None else x2.new_empty(0)
        return x2.new_empty(x2.shape), dw, dxs

    def _rms_norm_setup_context(ctx, inputs, output):
        x2, residual, weight, _, scale, offset, casting = inputs
        _, s, rstd = output
        ctx.scale, ctx.offset, ctx.casting = scale, offset, casting
        ctx.has_residual = residual is not None
        ctx.has_weight = weight is not None
        ctx.save_for_backward(s if ctx.has_residual else x2, weight, rstd)

    def _rms_norm_op_backward(ctx, dy, ds, _drstd):
        x2, weight, rstd = ctx.saved_tensors
        if dy is None:
            dy = torch.zeros_like(x2)
        ds = ds if ctx.has_residual else None
        dx, dw, dxs = _rms_norm_bwd_op(dy, x2, weight, rstd, ds, ctx.scale, ctx.offset, ctx.casting)
        dinput = dxs if ctx.scale is not None else dx
        return dinput, (dx if ctx.has_residual else None), (dw if ctx.has_weight else None), None, None, None, None

    _rms_norm_fwd_op.register_autograd(_rms_norm_op_backward, setup_context=_rms_norm_setup_context)


def _rms_norm_triton(
    x2: torch.Tensor,
    r2: torch.Tensor | None,
    weight: torch.Tensor | None,
    eps: float,
    scale: float | None = None,
    offset: float = 0.0,
    casting: int = 0,
    in_place: bool = False,
):
    """``(y, s_or_None)`` on 2-D rows through the kernels: autograd.Function eagerly, custom op when compiling."""
    if _CUSTOM_OPS and compiling():
        y, s, _ = _rms_norm_fwd_op(x2, r2, weight, eps, scale, offset, casting)
        return y, (s if r2 is not None else None)
    if r2 is None:
        return _RMSNormFunction.apply(x2, None, weight, eps, None, offset, casting, in_place), None
    return _RMSNormFunction.apply(x2, r2, weight, eps, scale, offset, casting, in_place)


# ----------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def _validate(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float,
    residual: torch.Tensor | None = None,
    offset: float = 0.0,
    casting_mode: str = "llama",
    in_place: bool = False,
) -> tuple[float, int]:
    """Checks every argument; returns ``(offset as float, casting constexpr)``."""
    check_float("x", x)
    check_nonempty("x", x)
    if not isinstance(casting_mode, str) or casting_mode not in CASTING_MODES:
        raise ValueError(f"casting_mode must be one of {tuple(CASTING_MODES)}, got {casting_mode!r}")
    if weight is not None:
        check_float("weight", weight)
        if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
            raise ValueError(
                f"weight must have shape ({x.shape[-1]},) to match the hidden size (last dim) of x, got "
                f"{tuple(weight.shape)}"
            )
        check_same_device("weight", weight, "x", x)
        fp32_master = casting_mode == "gemma" and weight.dtype == torch.float32
        if weight.dtype != x.dtype and not fp32_master:
            raise TypeError(
                f"weight dtype {_dtype_name(weight)} differs from x dtype {_dtype_name(x)}; cast the weight to the "
                "activation dtype (RMSNorm does this; casting_mode='gemma' also takes an fp32 weight)"
            )
    if residual is not None:
        check_float("residual", residual)
        if residual.shape != x.shape:
            raise ValueError(f"residual must have the shape of x {tuple(x.shape)}, got {tuple(residual.shape)}")
        check_same_device("residual", residual, "x", x)
        if residual.dtype != x.dtype:
            raise TypeError(f"residual dtype {_dtype_name(residual)} differs from x dtype {_dtype_name(x)}")
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps > 0:
        raise ValueError(f"eps must be a positive float, got {eps!r}")
    if not isinstance(offset, (int, float)) or isinstance(offset, bool) or not math.isfinite(offset):
        raise TypeError(f"offset must be a finite Python float, got {offset!r}")
    if weight is None and offset != 0:
        raise ValueError(f"offset={offset!r} needs a weight (offset + weight scales the output); got weight=None")
    if not isinstance(in_place, bool):
        raise TypeError(f"in_place must be a bool, got {in_place!r}")
    return float(offset), CASTING_MODES[casting_mode]


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float = 1e-5,
    offset: float = 0.0,
    casting_mode: str = "llama",
    in_place: bool = False,
) -> torch.Tensor:
    """RMSNorm over the last dim of ``x`` (any leading shape); see the module docstring for the math and the
    options (``offset``, ``casting_mode`` "llama" | "gemma" | "none", ``weight=None``, ``in_place``)."""
    offset, casting = _validate(x, weight, eps, None, offset, casting_mode, in_place)
    if use_triton(x):
        return _rms_norm_triton(_rows(x), None, weight, float(eps), None, offset, casting, in_place)[0].view(x.shape)
    return rms_norm_ref(x, weight, eps, offset, casting_mode)


def add_rms_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float = 1e-5,
    scale: float | None = None,
    offset: float = 0.0,
    casting_mode: str = "llama",
    in_place: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused ``s = x + residual; return rms_norm(s, weight, eps, offset, casting_mode), s`` (one pass over memory).

    ``scale`` (a Python float, e.g. a muP residual multiplier) multiplies ``x`` before the add:
    ``s = residual + scale * x``, computed in fp32 and rounded once to the input dtype (for fp32 inputs
    bit-equal to eager ``residual + scale * x``).  Gradients: ``d residual = d s``, ``d x = scale * d s``.
    ``offset``, ``casting_mode``, ``in_place`` and ``weight=None`` as in :func:`rms_norm`.
    """
    offset, casting = _validate(x, weight, eps, residual, offset, casting_mode, in_place)
    if scale is not None:
        if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale):
            raise TypeError(f"scale must be a finite Python float or None, got {scale!r}")
        scale = float(scale)
    if use_triton(x):
        y, s = _rms_norm_triton(_rows(x), _rows(residual), weight, float(eps), scale, offset, casting, in_place)
        return y.view(x.shape), s.view(x.shape)
    return add_rms_norm_ref(x, residual, weight, eps, scale, offset, casting_mode)


class RMSNorm(nn.Module):
    """``RMSNorm(hidden_size, eps)``; ``forward(x)`` -> normed, ``forward(x, residual)`` -> ``(normed, x + residual)``.

    Keywords follow Liger-Kernel's ``LigerRMSNorm``: ``offset`` (Gemma: 1.0 with ``init_fn="zeros"``),
    ``casting_mode``, ``init_fn`` ("ones" | "zeros"), ``in_place`` (the backward reuses the incoming gradient's
    buffer; see the module docstring for when that is safe -- off by default here), ``elementwise_affine``
    (False: no weight).  The weight is cast to the input dtype when they differ (e.g. fp32 master weights with
    bf16 activations; in "gemma" mode an fp32 weight is used as is); the cast is differentiable, so the gradient
    reaches the fp32 parameter.
    """

    def __init__(
        self,
        hidden_size: int,
        eps: float = 1e-5,
        offset: float = 0.0,
        casting_mode: str = "llama",
        init_fn: str = "ones",
        in_place: bool = False,
        elementwise_affine: bool = True,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if init_fn not in ("ones", "zeros"):
            raise ValueError(f"init_fn must be 'ones' or 'zeros', got {init_fn!r}")
        if casting_mode not in CASTING_MODES:
            raise ValueError(f"casting_mode must be one of {tuple(CASTING_MODES)}, got {casting_mode!r}")
        self.hidden_size = hidden_size
        self.eps = eps
        self.offset = offset
        self.casting_mode = casting_mode
        self.init_fn = init_fn
        self.in_place = in_place
        self.elementwise_affine = elementwise_affine
        if elementwise_affine:
            self.weight = nn.Parameter(torch.empty(hidden_size, device=device, dtype=dtype))
            self.reset_parameters()
        else:
            self.register_parameter("weight", None)

    def reset_parameters(self) -> None:
        if self.weight is not None:
            (nn.init.ones_ if self.init_fn == "ones" else nn.init.zeros_)(self.weight)

    def _weight_for(self, x: torch.Tensor) -> torch.Tensor | None:
        w = self.weight
        if w is None or w.dtype == x.dtype or (self.casting_mode == "gemma" and w.dtype == torch.float32):
            return w
        return w.to(x.dtype)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None, scale: float | None = None):
        """``scale`` (only with ``residual``): ``s = residual + scale * x``, see :func:`add_rms_norm`."""
        weight = self._weight_for(x)
        opts = dict(offset=self.offset, casting_mode=self.casting_mode, in_place=self.in_place)
        if residual is None:
            if scale is not None:
                raise ValueError("scale multiplies x before the residual add; pass a residual with it")
            return rms_norm(x, weight, self.eps, **opts)
        return add_rms_norm(x, residual, weight, self.eps, scale, **opts)

    def extra_repr(self) -> str:
        extra = "" if self.offset == 0 else f", offset={self.offset}"
        extra += "" if self.casting_mode == "llama" else f", casting_mode={self.casting_mode!r}"
        extra += "" if self.elementwise_affine else ", elementwise_affine=False"
        extra += ", in_place=True" if self.in_place else ""
        return f"{self.hidden_size}, eps={self.eps}{extra}"
