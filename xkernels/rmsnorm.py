"""Fused RMSNorm (and the pre-norm block's fused residual add): Triton kernels + PyTorch reference.

Semantics (released Xmodel / HF Llama): ``y = weight * (x32 * rsqrt(mean(x32**2, -1) + eps)).to(x.dtype)``
with ``x32 = x.float()`` -- normalise in fp32, cast back to the input dtype, THEN multiply by the weight.
``weight`` must have the dtype of ``x`` (the model keeps norm weights in the activation dtype), so the
output dtype is ``x.dtype``; :class:`RMSNorm` casts its weight to the input dtype when they differ.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import nn

from xkernels._checks import check_float, check_nonempty, check_same_device
from xkernels.dispatch import compiling, triton_available, use_triton

# ----------------------------------------------------------------------------------------------------
# PyTorch reference (CPU path, tests, benchmarks)
# ----------------------------------------------------------------------------------------------------


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """``weight * (x32 * rsqrt(mean(x32^2, -1) + eps)).to(x.dtype)`` with ``x32 = x.float()``.

    A float64 ``x`` is normalised in float64 (used by the tests as the high-precision reference).
    """
    xf = x if x.dtype == torch.float64 else x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def add_rms_norm_ref(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5, scale: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``s = x + residual`` (in the input dtype); returns ``(rms_norm_ref(s, weight, eps), s)``.

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
    return rms_norm_ref(s, weight, eps), s


def rms_norm_bwd_ref(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5
) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed-form gradients of :func:`rms_norm_ref` (ignoring the rounding of the cast), in fp32.

    With ``r = rsqrt(mean(x^2) + eps)``, ``n = x * r`` and ``g = dy * weight`` (per row of length H):

    * ``dx = r * (g - n * mean(g * n))``
    * ``dweight = sum over rows of dy * n.to(x.dtype)``

    Returns ``(dx in x.dtype, dweight in weight.dtype)``.
    """
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf, dyf, wf = x.to(acc), dy.to(acc), weight.to(acc)
    r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    n = xf * r
    g = dyf * wf
    dx = r * (g - n * (g * n).mean(-1, keepdim=True))
    dw = (dyf * n.to(x.dtype).to(acc)).reshape(-1, x.shape[-1]).sum(0)
    return dx.to(x.dtype), dw.to(weight.dtype)


# ----------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------

if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _rmsnorm_fwd_kernel(
        X,  # (M, H) input rows, last dim contiguous
        R,  # (M, H) residual rows (read only when HAS_RESIDUAL)
        W,  # (H,) weight, dtype of X
        Y,  # (M, H) output, contiguous
        S,  # (M, H) x + residual, contiguous (written only when HAS_RESIDUAL)
        RSTD,  # (M,) fp32 1/rms per row, saved for backward
        stride_x,  # row strides in elements
        stride_r,
        n_cols,
        eps,
        scale,  # fp32 multiplier of x before the add (used only when HAS_SCALE)
        HAS_RESIDUAL: tl.constexpr,
        HAS_SCALE: tl.constexpr,
        BLOCK: tl.constexpr,
        ONE_BLOCK: tl.constexpr,  # the whole row fits in one BLOCK: keep it in registers
    ):
        """One program per row.  ``s = x + r`` (rounded to the input dtype, as torch would), then
        ``rstd = 1 / sqrt(mean(s^2) + eps)`` in fp32, ``y = w * (s * rstd).to(dtype)`` rounded once.

        With ``HAS_SCALE``: ``s = r + scale * x`` in fp32, rounded once (the launcher turns FMA contraction
        off so the product is rounded before the add, exactly as eager torch computes it)."""
        row = tl.program_id(0).to(tl.int64)
        x_row = X + row * stride_x
        r_row = R + row * stride_r
        y_row = Y + row * n_cols
        s_row = S + row * n_cols
        if ONE_BLOCK:
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
            rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)
            w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
            normed = (x * rstd).to(Y.dtype.element_ty).to(tl.float32)
            tl.store(y_row + cols, (w * normed).to(Y.dtype.element_ty), mask=mask)
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
                acc += x * x
            rstd = 1.0 / tl.sqrt(tl.sum(acc, axis=0) / n_cols + eps)
            for start in range(0, n_cols, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                mask = cols < n_cols
                if HAS_RESIDUAL:
                    x = tl.load(s_row + cols, mask=mask, other=0.0).to(tl.float32)
                else:
                    x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
                w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
                normed = (x * rstd).to(Y.dtype.element_ty).to(tl.float32)
                tl.store(y_row + cols, (w * normed).to(Y.dtype.element_ty), mask=mask)
        tl.store(RSTD + row, rstd)

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
        HAS_DS: tl.constexpr,
        HAS_SCALE: tl.constexpr,
        BLOCK: tl.constexpr,
        ONE_BLOCK: tl.constexpr,
    ):
        """Per row, with ``n = x * rstd`` and ``g = dy * w`` (fp32):

        * ``dx = rstd * (g - n * mean(g * n))`` (+ ``ds`` for the fused add, whose two inputs share it),
        * ``dw += dy * n.to(dtype)`` accumulated over this program's rows in fp32, stored to its own row
          of ``DW_PARTIAL``; the launcher sums the partials (deterministic, no atomics).

        The cast in the forward is treated as identity for ``dx`` (straight-through), as torch autograd does.
        With ``HAS_SCALE`` (forward ``s = r + scale * x``) also ``dxs = scale * dx.to(dtype)``, the
        gradient of ``x``, computed from the rounded ``dx`` exactly as autograd through the reference does.
        """
        pid = tl.program_id(0)
        row_start = pid.to(tl.int64) * rows_per_program
        row_end = tl.minimum(row_start + rows_per_program, n_rows)
        dw_row = DW_PARTIAL + pid.to(tl.int64) * n_cols
        if ONE_BLOCK:
            cols = tl.arange(0, BLOCK)
            mask = cols < n_cols
            w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
            dw = tl.zeros([BLOCK], dtype=tl.float32)
            for row in range(row_start, row_end):
                x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
                dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
                rstd = tl.load(RSTD + row)
                n = x * rstd
                g = dy * w
                c = tl.sum(g * n, axis=0) / n_cols
                dx = rstd * (g - n * c)
                if HAS_DS:
                    dx += tl.load(DS + row * stride_ds + cols, mask=mask, other=0.0).to(tl.float32)
                tl.store(DX + row * n_cols + cols, dx.to(DX.dtype.element_ty), mask=mask)
                if HAS_SCALE:
                    dxs = dx.to(DX.dtype.element_ty).to(tl.float32) * scale
                    tl.store(DXS + row * n_cols + cols, dxs.to(DXS.dtype.element_ty), mask=mask)
                dw += dy * n.to(X.dtype.element_ty).to(tl.float32)
            tl.store(dw_row + cols, dw, mask=mask)
        else:
            # Long rows: the dweight partial lives in this program's own row of DW_PARTIAL (no other
            # program touches it), updated chunk by chunk.
            for start in range(0, n_cols, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                tl.store(dw_row + cols, tl.zeros([BLOCK], dtype=tl.float32), mask=cols < n_cols)
            tl.debug_barrier()  # the zeros are visible to every thread before the read-modify-writes
            for row in range(row_start, row_end):
                rstd = tl.load(RSTD + row)
                acc = tl.zeros([BLOCK], dtype=tl.float32)
                for start in range(0, n_cols, BLOCK):
                    cols = start + tl.arange(0, BLOCK)
                    mask = cols < n_cols
                    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
                    dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
                    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
                    acc += dy * w * x
                c = tl.sum(acc, axis=0) * rstd / n_cols
                for start in range(0, n_cols, BLOCK):
                    cols = start + tl.arange(0, BLOCK)
                    mask = cols < n_cols
                    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
                    dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
                    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
                    n = x * rstd
                    dx = rstd * (dy * w - n * c)
                    if HAS_DS:
                        dx += tl.load(DS + row * stride_ds + cols, mask=mask, other=0.0).to(tl.float32)
                    tl.store(DX + row * n_cols + cols, dx.to(DX.dtype.element_ty), mask=mask)
                    if HAS_SCALE:
                        dxs = dx.to(DX.dtype.element_ty).to(tl.float32) * scale
                        tl.store(DXS + row * n_cols + cols, dxs.to(DXS.dtype.element_ty), mask=mask)
                    dw = tl.load(dw_row + cols, mask=mask, other=0.0)
                    tl.store(dw_row + cols, dw + dy * n.to(X.dtype.element_ty).to(tl.float32), mask=mask)


# ----------------------------------------------------------------------------------------------------
# Launchers (no autograd): 2-D row views in, fresh tensors out
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Launch:
    block: int
    one_block: bool
    num_warps: int


# Rows up to _MAX_ONE_BLOCK elements stay in registers in one block (8192 fp32 = 16 values per thread
# at 16 warps); longer rows loop over 4096-element chunks.  Warp counts follow the Triton layer-norm
# tutorial / Liger-Kernel practice (4 warps to 2048, 8 to 4096, 16 above); not tuned on a GPU here.
_MAX_ONE_BLOCK = 8192
_CHUNK = 4096


def _launch_config(n_cols: int) -> _Launch:
    block = triton.next_power_of_2(n_cols)
    one_block = block <= _MAX_ONE_BLOCK
    if not one_block:
        block = _CHUNK
    num_warps = 4 if block <= 2048 else 8 if block <= 4096 else 16
    return _Launch(block, one_block, num_warps)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _bwd_programs(n_rows: int, device: torch.device) -> int:
    """Programs in the backward.  Each accumulates dweight over its rows and writes one fp32 row of
    partials, so more programs = more memory parallelism but more partial traffic (2 x 4 B x H per
    program).  Up to 8 per SM and at least 8 rows each keeps that traffic under ~1/6 of the row traffic
    (bf16: 3 x 2 B x H per row); not tuned on a GPU yet.  The interpreter runs programs one after
    another, so a handful suffices there."""
    if device.type == "cuda":
        target = 8 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    else:
        target = 4
    return max(1, min(triton.cdiv(n_rows, 8), target))


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a 2-D ``(rows, hidden)`` view with a contiguous last dim (copies only when it must)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _rmsnorm_fwd(
    x2: torch.Tensor, r2: torch.Tensor | None, weight: torch.Tensor, eps: float, scale: float | None = None
):
    """Returns ``(y, s_or_None, rstd)`` for 2-D rows ``x2`` (and residual rows ``r2``, ``s = r2 + scale * x2``)."""
    n_rows, n_cols = x2.shape
    cfg = _launch_config(n_cols)
    weight = weight.contiguous()
    y = torch.empty((n_rows, n_cols), dtype=x2.dtype, device=x2.device)
    s = torch.empty_like(y) if r2 is not None else None
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x2.device)
    _rmsnorm_fwd_kernel[(n_rows,)](
        x2,
        r2 if r2 is not None else x2,
        weight,
        y,
        s if s is not None else y,
        rstd,
        x2.stride(0),
        r2.stride(0) if r2 is not None else 0,
        n_cols,
        eps,
        1.0 if scale is None else scale,
        HAS_RESIDUAL=r2 is not None,
        HAS_SCALE=scale is not None,
        BLOCK=cfg.block,
        ONE_BLOCK=cfg.one_block,
        num_warps=cfg.num_warps,
        # no FMA contraction of ``scale * x + r``: the product rounds first, as in eager torch
        **({"enable_fp_fusion": False} if scale is not None else {}),
    )
    return y, s, rstd


def _rmsnorm_bwd(dy2, x2, weight, rstd, ds2, scale: float | None = None):
    """Returns ``(dx, dweight, dx_scaled_or_None)`` for 2-D rows; ``ds2`` is the gradient of ``s`` (fused
    add) or None; with ``scale`` the third output is ``scale * dx``, the gradient of the scaled input."""
    n_rows, n_cols = x2.shape
    cfg = _launch_config(n_cols)
    programs = _bwd_programs(n_rows, x2.device)
    rows_per_program = triton.cdiv(n_rows, programs)
    programs = triton.cdiv(n_rows, rows_per_program)
    weight = weight.contiguous()
    dx = torch.empty((n_rows, n_cols), dtype=x2.dtype, device=x2.device)
    dxs = torch.empty_like(dx) if scale is not None else None
    dw_partial = torch.empty((programs, n_cols), dtype=torch.float32, device=x2.device)
    _rmsnorm_bwd_kernel[(programs,)](
        dy2,
        x2,
        weight,
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
        HAS_DS=ds2 is not None,
        HAS_SCALE=scale is not None,
        BLOCK=cfg.block,
        ONE_BLOCK=cfg.one_block,
        num_warps=cfg.num_warps,
    )
    return dx, dw_partial.sum(0).to(weight.dtype), dxs


class _RMSNormFunction(torch.autograd.Function):
    """Autograd over 2-D rows; ``residual`` may be None (plain RMSNorm, second output None)."""

    @staticmethod
    def forward(ctx, x2, r2, weight, eps, scale=None):
        y, s, rstd = _rmsnorm_fwd(x2, r2, weight, eps, scale)
        ctx.save_for_backward(s if s is not None else x2, weight, rstd)
        ctx.has_residual = r2 is not None
        ctx.scale = scale
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
        dx, dw, dxs = _rmsnorm_bwd(dy, x2, weight, rstd, ds, ctx.scale)
        # the residual's gradient is d s; the input's is scale * d s when scaled
        return (dxs if dxs is not None else dx), (dx if ctx.has_residual else None), dw, None, None


# torch.compile: the same launchers as opaque custom ops, traced through their fake (shape-only) impls.
# Eager calls keep the cheaper autograd.Function above; compiled code switches to these.
_CUSTOM_OPS = triton_available() and hasattr(torch.library, "custom_op")
if _CUSTOM_OPS:

    @torch.library.custom_op(
        "xkernels::rms_norm_fwd",
        mutates_args=(),
        schema="(Tensor x2, Tensor? residual, Tensor weight, float eps, float? scale=None) -> (Tensor, Tensor, Tensor)",
    )
    def _rms_norm_fwd_op(x2, residual, weight, eps, scale=None):
        """``(y, s, rstd)``; ``s`` is an empty tensor without a residual (outputs may not alias inputs)."""
        y, s, rstd = _rmsnorm_fwd(x2, residual, weight, eps, scale)
        return y, (s if s is not None else x2.new_empty(0)), rstd

    @_rms_norm_fwd_op.register_fake
    def _(x2, residual, weight, eps, scale=None):
        s = x2.new_empty(x2.shape) if residual is not None else x2.new_empty(0)
        return x2.new_empty(x2.shape), s, x2.new_empty(x2.shape[0], dtype=torch.float32)

    @torch.library.custom_op(
        "xkernels::rms_norm_bwd",
        mutates_args=(),
        schema="(Tensor dy, Tensor x2, Tensor weight, Tensor rstd, Tensor? ds, float? scale=None) -> (Tensor, Tensor, Tensor)",
    )
    def _rms_norm_bwd_op(dy, x2, weight, rstd, ds, scale=None):
        """``(dx, dweight, dx_scaled)``; ``dx_scaled`` is empty without ``scale``."""
        dy = dy if dy.stride(-1) == 1 else dy.contiguous()
        if ds is not None and ds.stride(-1) != 1:
            ds = ds.contiguous()
        dx, dw, dxs = _rmsnorm_bwd(dy, x2, weight, rstd, ds, scale)
        return dx, dw, (dxs if dxs is not None else x2.new_empty(0))

    @_rms_norm_bwd_op.register_fake
    def _(dy, x2, weight, rstd, ds, scale=None):
        dxs = x2.new_empty(x2.shape) if scale is not None else x2.new_empty(0)
        return x2.new_empty(x2.shape), weight.new_empty(weight.shape), dxs

    def _rms_norm_setup_context(ctx, inputs, output):
        x2, residual, weight, _, scale = inputs
        _, s, rstd = output
        ctx.scale = scale
        ctx.has_residual = residual is not None
        ctx.save_for_backward(s if ctx.has_residual else x2, weight, rstd)

    def _rms_norm_op_backward(ctx, dy, ds, _drstd):
        x2, weight, rstd = ctx.saved_tensors
        if dy is None:
            dy = torch.zeros_like(x2)
        dx, dw, dxs = _rms_norm_bwd_op(dy, x2, weight, rstd, ds if ctx.has_residual else None, ctx.scale)
        dinput = dxs if ctx.scale is not None else dx
        return dinput, (dx if ctx.has_residual else None), dw, None, None

    _rms_norm_fwd_op.register_autograd(_rms_norm_op_backward, setup_context=_rms_norm_setup_context)


def _rms_norm_triton(
    x2: torch.Tensor, r2: torch.Tensor | None, weight: torch.Tensor, eps: float, scale: float | None = None
):
    """``(y, s_or_None)`` on 2-D rows through the kernels: autograd.Function eagerly, custom op when compiling."""
    if _CUSTOM_OPS and compiling():
        y, s, _ = _rms_norm_fwd_op(x2, r2, weight, eps, scale)
        return y, (s if r2 is not None else None)
    if r2 is None:
        return _RMSNormFunction.apply(x2, None, weight, eps, None), None
    return _RMSNormFunction.apply(x2, r2, weight, eps, scale)


# ----------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------


def _validate(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None) -> None:
    check_float("x", x)
    check_float("weight", weight)
    check_nonempty("x", x)
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(
            f"weight must have shape ({x.shape[-1]},) to match the hidden size (last dim) of x, got {tuple(weight.shape)}"
        )
    check_same_device("weight", weight, "x", x)
    if weight.dtype != x.dtype:
        raise TypeError(
            f"weight dtype {str(weight.dtype).removeprefix('torch.')} differs from x dtype "
            f"{str(x.dtype).removeprefix('torch.')}; cast the weight to the activation dtype (RMSNorm does this)"
        )
    if residual is not None:
        check_float("residual", residual)
        if residual.shape != x.shape:
            raise ValueError(f"residual must have the shape of x {tuple(x.shape)}, got {tuple(residual.shape)}")
        check_same_device("residual", residual, "x", x)
        if residual.dtype != x.dtype:
            raise TypeError(
                f"residual dtype {str(residual.dtype).removeprefix('torch.')} differs from x dtype "
                f"{str(x.dtype).removeprefix('torch.')}"
            )
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps > 0:
        raise ValueError(f"eps must be a positive float, got {eps!r}")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """RMSNorm over the last dim of ``x`` (any leading shape); see the module docstring for the math."""
    _validate(x, weight, eps)
    if use_triton(x):
        return _rms_norm_triton(_rows(x), None, weight, float(eps))[0].view(x.shape)
    return rms_norm_ref(x, weight, eps)


def add_rms_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-5,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused ``s = x + residual; return rms_norm(s, weight, eps), s`` (one pass over memory).

    ``scale`` (a Python float, e.g. a muP residual multiplier) multiplies ``x`` before the add:
    ``s = residual + scale * x``, computed in fp32 and rounded once to the input dtype (for fp32 inputs
    bit-equal to eager ``residual + scale * x``).  Gradients: ``d residual = d s``, ``d x = scale * d s``.
    """
    _validate(x, weight, eps, residual)
    if scale is not None:
        if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale):
            raise TypeError(f"scale must be a finite Python float or None, got {scale!r}")
        scale = float(scale)
    if use_triton(x):
        y, s = _rms_norm_triton(_rows(x), _rows(residual), weight, float(eps), scale)
        return y.view(x.shape), s.view(x.shape)
    return add_rms_norm_ref(x, residual, weight, eps, scale)


class RMSNorm(nn.Module):
    """``RMSNorm(hidden_size, eps)``; ``forward(x)`` -> normed, ``forward(x, residual)`` -> ``(normed, x + residual)``.

    The weight (initialised to ones) is cast to the input dtype when they differ (e.g. fp32 master weights
    with bf16 activations); the cast is differentiable, so the gradient reaches the fp32 parameter.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-5, device=None, dtype=None):
        super().__init__()
        self.hidden_size = hidden_size
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None, scale: float | None = None):
        """``scale`` (only with ``residual``): ``s = residual + scale * x``, see :func:`add_rms_norm`."""
        weight = self.weight if self.weight.dtype == x.dtype else self.weight.to(x.dtype)
        if residual is None:
            if scale is not None:
                raise ValueError("scale multiplies x before the residual add; pass a residual with it")
            return rms_norm(x, weight, self.eps)
        return add_rms_norm(x, residual, weight, self.eps, scale)

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}"


