"""LayerNorm over the last dim: Triton kernels + PyTorch reference, matching ``torch.nn.functional.layer_norm``.

Forward, per row of length H (all in fp32, one rounding to the input dtype at the end, as torch's CUDA kernel):

* ``mean = sum(x) / H``,  ``var = sum((x - mean)^2) / H`` (biased, two-pass),  ``rstd = 1 / sqrt(var + eps)``
* ``x̂ = (x - mean) * rstd``,  ``y = x̂ * w + b`` (``w`` / ``b`` optional: weight-free and bias-free variants)

Backward, with ``g = dy * w`` (``g = dy`` without a weight):

* ``dx = rstd * (g - mean(g) - x̂ * mean(g * x̂))``  (the projection of ``g`` off the two directions the
  normalisation removes: the constant and ``x̂``)
* ``dw = sum over rows of dy * x̂``,  ``db = sum over rows of dy``, through fp32 per-program partial rows summed
  at the end (deterministic, no atomics).

``mean`` and ``rstd`` are saved in fp32 for the backward.  Weight and bias must have the dtype of ``x``
(:class:`LayerNorm` casts its parameters to the input dtype when they differ).
"""

from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F
from torch import nn

from xkernels._checks import check_float, check_nonempty, check_same_device
from xkernels.dispatch import compiling, launch_on, triton_available, use_triton
from xkernels.rmsnorm import _bwd_launch_config, _bwd_programs, _BWD_OCCUPANCY, _launch_config, _rows

# ----------------------------------------------------------------------------------------------------
# PyTorch reference (CPU path, tests, benchmarks)
# ----------------------------------------------------------------------------------------------------


def layer_norm_ref(
    x: torch.Tensor, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None, eps: float = 1e-5
) -> torch.Tensor:
    """``F.layer_norm`` over the last dim computed in fp32 (float64 for float64 ``x``), rounded once to ``x.dtype``."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    w = weight.to(acc) if weight is not None else None
    b = bias.to(acc) if bias is not None else None
    return F.layer_norm(x.to(acc), (x.shape[-1],), w, b, eps).to(x.dtype)


def layer_norm_bwd_ref(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None = None, eps: float = 1e-5
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Closed-form ``(dx, dweight or None, dbias)`` of :func:`layer_norm_ref` (module docstring), in fp32 (float64
    for float64 inputs); ``dx`` in ``x.dtype``, ``dweight`` / ``dbias`` in the weight's dtype (``x.dtype`` without)."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf, dyf = x.to(acc), dy.to(acc)
    mean = xf.mean(-1, keepdim=True)
    rstd = torch.rsqrt((xf - mean).pow(2).mean(-1, keepdim=True) + eps)
    xhat = (xf - mean) * rstd
    g = dyf if weight is None else dyf * weight.to(acc)
    dx = rstd * (g - g.mean(-1, keepdim=True) - xhat * (g * xhat).mean(-1, keepdim=True))
    out_dtype = weight.dtype if weight is not None else x.dtype
    dw = (dyf * xhat).reshape(-1, x.shape[-1]).sum(0).to(out_dtype) if weight is not None else None
    db = dyf.reshape(-1, x.shape[-1]).sum(0).to(out_dtype)
    return dx.to(x.dtype), dw, db


# ----------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------

if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _layernorm_fwd_kernel(
        X,  # (M, H) input rows, last dim contiguous
        W,  # (H,) weight, dtype of X (read only when HAS_WEIGHT)
        B,  # (H,) bias, dtype of X (read only when HAS_BIAS)
        Y,  # (M, H) output, contiguous
        MEAN,  # (M,) fp32 row means, saved for backward
        RSTD,  # (M,) fp32 1/std per row, saved for backward
        stride_x,  # row stride of X in elements
        n_cols,
        eps,
        HAS_WEIGHT: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        BLOCK: tl.constexpr,
        ONE_BLOCK: tl.constexpr,  # the whole row fits in one BLOCK: keep it in registers
    ):
        """One program per row: two-pass mean / variance in fp32 (no E[x^2] - E[x]^2 cancellation), then
        ``y = (x - mean) * rstd * w + b`` rounded once."""
        row = tl.program_id(0).to(tl.int64)
        x_row = X + row * stride_x
        y_row = Y + row * n_cols
        if ONE_BLOCK:
            cols = tl.arange(0, BLOCK)
            mask = cols < n_cols
            x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
            mean = tl.sum(x, axis=0) / n_cols
            xc = tl.where(mask, x - mean, 0.0)
            rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=0) / n_cols + eps)
            y = xc * rstd
            if HAS_WEIGHT:
                y = y * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_BIAS:
                y = y + tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(y_row + cols, y.to(Y.dtype.element_ty), mask=mask)
        else:
            # Long rows: three passes over the row (the later ones from L2 on a GPU): sum, squared deviations,
            # output.
            acc = tl.zeros([BLOCK], dtype=tl.float32)
            for start in range(0, n_cols, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                acc += tl.load(x_row + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
            mean = tl.sum(acc, axis=0) / n_cols
            acc = tl.zeros([BLOCK], dtype=tl.float32)
            for start in range(0, n_cols, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                mask = cols < n_cols
                x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
                xc = tl.where(mask, x - mean, 0.0)
                acc += xc * xc
            rstd = 1.0 / tl.sqrt(tl.sum(acc, axis=0) / n_cols + eps)
            for start in range(0, n_cols, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                mask = cols < n_cols
                x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
                y = (x - mean) * rstd
                if HAS_WEIGHT:
                    y = y * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
                if HAS_BIAS:
                    y = y + tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
                tl.store(y_row + cols, y.to(Y.dtype.element_ty), mask=mask)
        tl.store(MEAN + row, mean)
        tl.store(RSTD + row, rstd)

    @triton.jit
    def _layernorm_bwd_kernel(
        DY,  # (M, H) gradient of y, last dim contiguous
        X,  # (M, H) the forward's input, last dim contiguous
        W,  # (H,) weight (read only when HAS_WEIGHT)
        MEAN,  # (M,) fp32 from the forward
        RSTD,  # (M,) fp32 from the forward
        DX,  # (M, H) output: gradient of x, contiguous
        DW_PARTIAL,  # (n_programs, H) fp32: this program's share of dweight (written only when HAS_WEIGHT)
        DB_PARTIAL,  # (n_programs, H) fp32: this program's share of dbias (written only when HAS_BIAS)
        stride_dy,  # row strides in elements
        stride_x,
        n_rows,
        n_cols,
        rows_per_program,
        HAS_WEIGHT: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        BLOCK: tl.constexpr,
        ONE_BLOCK: tl.constexpr,
        NUM_STAGES: tl.constexpr,  # software-pipelining depth of the row loop (chunk loop for long rows)
    ):
        """Per row, with ``x̂ = (x - mean) * rstd`` and ``g = dy * w`` (fp32):
        ``dx = rstd * (g - mean(g) - x̂ * mean(g * x̂))``; ``dw += dy * x̂``, ``db += dy`` accumulated over this
        program's rows and stored to its own partial rows (the launcher sums them: deterministic)."""
        pid = tl.program_id(0)
        row_start = pid * rows_per_program
        row_end = tl.minimum(row_start + rows_per_program, n_rows)
        dw_row = DW_PARTIAL + pid.to(tl.int64) * n_cols
        db_row = DB_PARTIAL + pid.to(tl.int64) * n_cols
        if ONE_BLOCK:
            cols = tl.arange(0, BLOCK)
            mask = cols < n_cols
            dw = tl.zeros([BLOCK], dtype=tl.float32)
            db = tl.zeros([BLOCK], dtype=tl.float32)
            for row in tl.range(row_start, row_end, num_stages=NUM_STAGES):
                r64 = tl.cast(row, tl.int64)  # tl.cast: the interpreter yields Python ints here
                x = tl.load(X + r64 * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
                dy = tl.load(DY + r64 * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
                xhat = tl.where(mask, (x - tl.load(MEAN + r64)) * tl.load(RSTD + r64), 0.0)
                g = dy
                if HAS_WEIGHT:
                    g = dy * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
                c1 = tl.sum(g * xhat, axis=0) / n_cols
                c2 = tl.sum(g, axis=0) / n_cols
                dx = tl.load(RSTD + r64) * (g - xhat * c1 - c2)
                tl.store(DX + r64 * n_cols + cols, dx.to(DX.dtype.element_ty), mask=mask)
                if HAS_WEIGHT:
                    dw += dy * xhat
                if HAS_BIAS:
                    db += dy
            if HAS_WEIGHT:
                tl.store(dw_row + cols, dw, mask=mask)
            if HAS_BIAS:
                tl.store(db_row + cols, db, mask=mask)
        else:
            # Long rows: the partials live in this program's own rows of DW_PARTIAL / DB_PARTIAL, updated chunk
            # by chunk (no other program touches them).
            for start in range(0, n_cols, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                zero = tl.zeros([BLOCK], dtype=tl.float32)
                if HAS_WEIGHT:
                    tl.store(dw_row + cols, zero, mask=cols < n_cols)
                if HAS_BIAS:
                    tl.store(db_row + cols, zero, mask=cols < n_cols)
            tl.debug_barrier()  # the zeros are visible to every thread before the read-modify-writes
            for row in range(row_start, row_end):
                r64 = tl.cast(row, tl.int64)
                mean = tl.load(MEAN + r64)
                rstd = tl.load(RSTD + r64)
                acc1 = tl.zeros([BLOCK], dtype=tl.float32)
                acc2 = tl.zeros([BLOCK], dtype=tl.float32)
                for start in tl.range(0, n_cols, BLOCK, num_stages=NUM_STAGES):
                    cols = start + tl.arange(0, BLOCK)
                    mask = cols < n_cols
                    x = tl.load(X + r64 * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
                    g = tl.load(DY + r64 * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
                    if HAS_WEIGHT:
                        g = g * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
                    acc1 += g * tl.where(mask, (x - mean) * rstd, 0.0)
                    acc2 += g
                c1 = tl.sum(acc1, axis=0) / n_cols
                c2 = tl.sum(acc2, axis=0) / n_cols
                # not pipelined: read-modify-writes of the partial rows (see rmsnorm's backward)
                for start in range(0, n_cols, BLOCK):
                    cols = start + tl.arange(0, BLOCK)
                    mask = cols < n_cols
                    x = tl.load(X + r64 * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
                    dy = tl.load(DY + r64 * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
                    xhat = tl.where(mask, (x - mean) * rstd, 0.0)
                    g = dy
                    if HAS_WEIGHT:
                        g = dy * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
                    dx = rstd * (g - xhat * c1 - c2)
                    tl.store(DX + r64 * n_cols + cols, dx.to(DX.dtype.element_ty), mask=mask)
                    if HAS_WEIGHT:
                        dw = tl.load(dw_row + cols, mask=mask, other=0.0)
                        tl.store(dw_row + cols, dw + dy * xhat, mask=mask)
                    if HAS_BIAS:
                        db = tl.load(db_row + cols, mask=mask, other=0.0)
                        tl.store(db_row + cols, db + dy, mask=mask)


# ----------------------------------------------------------------------------------------------------
# Launchers (no autograd): 2-D row views in, fresh tensors out
# ----------------------------------------------------------------------------------------------------
# Launch parameters: rmsnorm's (same row-per-program structure and per-element register use within a couple of
# values: one more fp32 accumulator row, db, in the backward), see xkernels/rmsnorm.py for the measurements.


def _layernorm_fwd(x2: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float):
    """Returns ``(y, mean, rstd)`` for 2-D rows ``x2``."""
    n_rows, n_cols = x2.shape
    cfg = _launch_config(n_cols)
    y = torch.empty((n_rows, n_cols), dtype=x2.dtype, device=x2.device)
    mean = torch.empty(n_rows, dtype=torch.float32, device=x2.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x2.device)
    with launch_on(x2):  # the launch goes to x2's GPU, not the current one
        _layernorm_fwd_kernel[(n_rows,)](
            x2,
            weight.contiguous() if weight is not None else x2,
            bias.contiguous() if bias is not None else x2,
            y,
            mean,
            rstd,
            x2.stride(0),
            n_cols,
            eps,
            HAS_WEIGHT=weight is not None,
            HAS_BIAS=bias is not None,
            BLOCK=cfg.block,
            ONE_BLOCK=cfg.one_block,
            num_warps=cfg.num_warps,
        )
    return y, mean, rstd


def _layernorm_bwd(dy2, x2, weight, mean, rstd, has_bias: bool):
    """Returns ``(dx, dweight_or_None, dbias_or_None)`` for 2-D rows; the parameter gradients in the dtype of x."""
    n_rows, n_cols = x2.shape
    cfg, stages = _bwd_launch_config(n_cols, "occupancy")  # its grid comes from _bwd_programs: that schedule
    dy2 = dy2 if dy2.stride(-1) == 1 else dy2.contiguous()
    dx = torch.empty((n_rows, n_cols), dtype=x2.dtype, device=x2.device)
    consts = dict(HAS_WEIGHT=weight is not None, HAS_BIAS=has_bias, BLOCK=cfg.block, ONE_BLOCK=cfg.one_block,
                  NUM_STAGES=stages, num_warps=cfg.num_warps)

    def args(dw_partial, db_partial, rows_per_program):
        w = weight.contiguous() if weight is not None else x2
        return (dy2, x2, w, mean, rstd, dx, dw_partial, db_partial, dy2.stride(0), x2.stride(0), n_rows, n_cols,
                rows_per_program)

    compiled = key = None
    with launch_on(x2):
        if x2.device.type == "cuda":
            key = ("layernorm", x2.device.index, x2.dtype, tuple(sorted(consts.items())))
            if key not in _BWD_OCCUPANCY:  # once per configuration: compile without launching, read its resources
                compiled = _layernorm_bwd_kernel.warmup(*args(rstd, rstd, 1), grid=(1,), **consts)
        programs = _bwd_programs(n_rows, x2.device, compiled, key)
    rows_per_program = triton.cdiv(n_rows, programs)
    programs = triton.cdiv(n_rows, rows_per_program)

    def partial(needed):
        return torch.empty((programs, n_cols), dtype=torch.float32, device=x2.device) if needed else rstd

    dw_partial, db_partial = partial(weight is not None), partial(has_bias)
    with launch_on(x2):
        _layernorm_bwd_kernel[(programs,)](*args(dw_partial, db_partial, rows_per_program), **consts)
    dw = dw_partial.sum(0).to(x2.dtype) if weight is not None else None
    db = db_partial.sum(0).to(x2.dtype) if has_bias else None
    return dx, dw, db


class _LayerNormFunction(torch.autograd.Function):
    """Autograd over 2-D rows; ``weight`` and ``bias`` may be None."""

    @staticmethod
    def forward(ctx, x2, weight, bias, eps):
        y, mean, rstd = _layernorm_fwd(x2, weight, bias, eps)
        ctx.save_for_backward(x2, weight, mean, rstd)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x2, weight, mean, rstd = ctx.saved_tensors
        dx, dw, db = _layernorm_bwd(dy, x2, weight, mean, rstd, ctx.has_bias)
        return dx, dw, db, None


# torch.compile: the launchers as opaque custom ops traced through shape-only fakes; eager calls keep the
# autograd.Function above.
_CUSTOM_OPS = triton_available() and hasattr(torch.library, "custom_op")
if _CUSTOM_OPS:

    @torch.library.custom_op(
        "xkernels::layer_norm_fwd",
        mutates_args=(),
        schema="(Tensor x2, Tensor? weight, Tensor? bias, float eps) -> (Tensor, Tensor, Tensor)",
    )
    def _layer_norm_fwd_op(x2, weight, bias, eps):
        """``(y, mean, rstd)``."""
        return _layernorm_fwd(x2, weight, bias, eps)

    @_layer_norm_fwd_op.register_fake
    def _(x2, weight, bias, eps):
        stat = x2.new_empty(x2.shape[0], dtype=torch.float32)
        return x2.new_empty(x2.shape), stat, stat.new_empty(stat.shape)

    @torch.library.custom_op(
        "xkernels::layer_norm_bwd",
        mutates_args=(),
        schema="(Tensor dy, Tensor x2, Tensor? weight, Tensor mean, Tensor rstd, bool has_bias) -> (Tensor, Tensor, Tensor)",
    )
    def _layer_norm_bwd_op(dy, x2, weight, mean, rstd, has_bias):
        """``(dx, dweight, dbias)``; a missing parameter's gradient is an empty tensor."""
        dx, dw, db = _layernorm_bwd(dy, x2, weight, mean, rstd, has_bias)
        empty = x2.new_empty(0)
        return dx, (dw if dw is not None else empty), (db if db is not None else empty.clone())

    @_layer_norm_bwd_op.register_fake
    def _(dy, x2, weight, mean, rstd, has_bias):
        n = x2.shape[1]
        return x2.new_empty(x2.shape), x2.new_empty(n if weight is not None else 0), x2.new_empty(n if has_bias else 0)

    def _layer_norm_setup_context(ctx, inputs, output):
        x2, weight, bias, _ = inputs
        _, mean, rstd = output
        ctx.has_weight, ctx.has_bias = weight is not None, bias is not None
        ctx.save_for_backward(x2, weight, mean, rstd)

    def _layer_norm_op_backward(ctx, dy, _dmean, _drstd):
        x2, weight, mean, rstd = ctx.saved_tensors
        dx, dw, db = _layer_norm_bwd_op(dy, x2, weight, mean, rstd, ctx.has_bias)
        return dx, (dw if ctx.has_weight else None), (db if ctx.has_bias else None), None

    _layer_norm_fwd_op.register_autograd(_layer_norm_op_backward, setup_context=_layer_norm_setup_context)


# ----------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------


def _check_param(name: str, p: torch.Tensor | None, x: torch.Tensor) -> None:
    if p is None:
        return
    check_float(name, p)
    if p.dim() != 1 or p.shape[0] != x.shape[-1]:
        raise ValueError(
            f"{name} must have shape ({x.shape[-1]},) to match the hidden size (last dim) of x, got {tuple(p.shape)}"
        )
    check_same_device(name, p, "x", x)
    if p.dtype != x.dtype:
        raise TypeError(
            f"{name} dtype {str(p.dtype).removeprefix('torch.')} differs from x dtype "
            f"{str(x.dtype).removeprefix('torch.')}; cast it to the activation dtype (LayerNorm does this)"
        )


def layer_norm(
    x: torch.Tensor, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None, eps: float = 1e-5
) -> torch.Tensor:
    """LayerNorm over the last dim of ``x`` (any leading shape): ``F.layer_norm(x, (H,), weight, bias, eps)``
    computed in fp32 and rounded once to ``x.dtype``.  ``weight`` and ``bias`` are optional (either, both or
    none); see the module docstring for the math."""
    check_float("x", x)
    check_nonempty("x", x)
    _check_param("weight", weight, x)
    _check_param("bias", bias, x)
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps > 0:
        raise ValueError(f"eps must be a positive float, got {eps!r}")
    if use_triton(x):
        x2 = _rows(x)
        if _CUSTOM_OPS and compiling():
            y = _layer_norm_fwd_op(x2, weight, bias, float(eps))[0]
        else:
            y = _LayerNormFunction.apply(x2, weight, bias, float(eps))
        return y.view(x.shape)
    return layer_norm_ref(x, weight, bias, eps)


class LayerNorm(nn.Module):
    """``torch.nn.LayerNorm``'s signature over the last dim (``normalized_shape`` an int or a 1-tuple), running
    :func:`layer_norm`.  Parameters are cast to the input dtype when they differ (differentiably)."""

    def __init__(
        self,
        normalized_shape: int | tuple[int],
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        bias: bool = True,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if isinstance(normalized_shape, numbers.Integral):
            normalized_shape = (int(normalized_shape),)
        normalized_shape = tuple(normalized_shape)
        if len(normalized_shape) != 1:
            raise ValueError(f"normalized_shape must be one int (the last dim), got {normalized_shape}")
        self.normalized_shape = normalized_shape
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        factory = dict(device=device, dtype=dtype)
        if elementwise_affine:
            self.weight = nn.Parameter(torch.ones(normalized_shape, **factory))
        else:
            self.register_parameter("weight", None)
        if elementwise_affine and bias:
            self.bias = nn.Parameter(torch.zeros(normalized_shape, **factory))
        else:
            self.register_parameter("bias", None)

    def reset_parameters(self) -> None:
        if self.weight is not None:
            nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.weight, self.bias
        w = w.to(x.dtype) if w is not None and w.dtype != x.dtype else w
        b = b.to(x.dtype) if b is not None and b.dtype != x.dtype else b
        return layer_norm(x, w, b, self.eps)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"
