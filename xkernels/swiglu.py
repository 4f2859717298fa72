"""Fused SwiGLU activation: ``silu(gate) * up`` in one pass, Triton kernels + PyTorch reference.

Forward ``y = silu(g) * u`` with ``silu(g) = g * sigmoid(g)``, computed in fp32 and rounded once to the
input dtype.  Backward (``dy`` the incoming gradient, ``s = sigmoid(g)``):

* ``du = dy * silu(g)``
* ``dg = dy * u * s * (1 + g * (1 - s))``  (``d silu / dg = s + g s (1 - s)``)

``silu`` is recomputed in the backward from the saved ``g`` instead of being stored (one tensor less).

Two entry points:

* :func:`swiglu` ``(gate, up)`` -- two tensors of the same shape ``(..., F)`` (they may be strided views).
* :func:`swiglu_fused` ``(x)`` -- the fused gate+up projection output ``(..., 2F)``: ``gate = x[..., :F]``,
  ``up = x[..., F:]``.  The kernels read both halves in place (no split copy) and the backward writes one
  ``(..., 2F)`` gradient, so a single ``Linear(hidden, 2F)`` can feed it.

HF Llama computes ``act_fn(gate) * up`` with the silu rounded to the activation dtype before the product;
in fp32 the two agree to rounding, in bf16 this version (one rounding) is the more accurate one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from xkernels._checks import check_float, check_nonempty, check_same_device
from xkernels.dispatch import compiling, launch_on, triton_available, use_triton

# ----------------------------------------------------------------------------------------------------
# PyTorch reference (CPU path, tests, benchmarks)
# ----------------------------------------------------------------------------------------------------


def swiglu_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` in fp32 (float64 for float64 inputs), rounded once to the input dtype."""
    acc = torch.float64 if gate.dtype == torch.float64 else torch.float32
    g = gate.to(acc)
    return (F.silu(g) * up.to(acc)).to(gate.dtype)  # F.silu: one fused op, less saved for autograd


def swiglu_bwd_ref(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed-form ``(dgate, dup)`` of :func:`swiglu_ref` (see the module docstring), in the input dtype."""
    acc = torch.float64 if gate.dtype == torch.float64 else torch.float32
    g, u, d = gate.to(acc), up.to(acc), dy.to(acc)
    s = torch.sigmoid(g)
    dgate = d * u * s * (1 + g * (1 - s))
    dup = d * g * s
    return dgate.to(gate.dtype), dup.to(up.dtype)


def swiglu_fused_ref(x: torch.Tensor) -> torch.Tensor:
    """:func:`swiglu_ref` on the two halves ``x[..., :F]`` (gate) and ``x[..., F:]`` (up) of ``x``."""
    gate, up = x.chunk(2, dim=-1)
    return swiglu_ref(gate, up)


# ----------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------

if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _swiglu_fwd_kernel(
        G,  # (M, F) gate rows, last dim contiguous
        U,  # (M, F) up rows, last dim contiguous (for the fused variant: G + F)
        Y,  # (M, F) output, contiguous
        stride_g,  # row strides in elements
        stride_u,
        n_cols,
        BLOCK: tl.constexpr,
    ):
        """Grid (rows, column blocks).  ``y = g * sigmoid(g) * u`` in fp32, rounded once."""
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n_cols
        g = tl.load(G + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(U + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
        y = g * tl.sigmoid(g) * u
        tl.store(Y + row * n_cols + cols, y.to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _swiglu_bwd_kernel(
        DY,  # (M, F) incoming gradient, last dim contiguous
        G,  # (M, F) saved gate
        U,  # (M, F) saved up
        DG,  # (M, F) output gradient of gate (fused variant: the first half of a (M, 2F) buffer)
        DU,  # (M, F) output gradient of up (fused variant: DG + F)
        stride_dy,  # row strides in elements
        stride_g,
        stride_u,
        stride_dgu,  # shared row stride of DG and DU
        n_cols,
        BLOCK: tl.constexpr,
    ):
        """``s = sigmoid(g)``, ``du = dy * g * s``, ``dg = dy * u * s * (1 + g * (1 - s))`` in fp32.
        silu is recomputed here from ``g`` rather than saved by the forward."""
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n_cols
        dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(G + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(U + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
        s = tl.sigmoid(g)
        du = dy * g * s
        dg = dy * u * s * (1.0 + g * (1.0 - s))
        tl.store(DG + row * stride_dgu + cols, dg.to(DG.dtype.element_ty), mask=mask)
        tl.store(DU + row * stride_dgu + cols, du.to(DU.dtype.element_ty), mask=mask)


def _block(n_cols: int) -> tuple[int, int]:
    """(BLOCK, num_warps): up to 1024 columns per program (8 bf16 elements per thread at 4 warps), which
    saturates bandwidth for this purely elementwise op; smaller rows get the next power of two."""
    block = min(1024, triton.next_power_of_2(n_cols))
    return block, 4 if block >= 512 else 2


def _rows(t: torch.Tensor) -> torch.Tensor:
    """2-D ``(M, F)`` view with a contiguous last dim (copies only when no such view exists)."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    return t.reshape(-1, t.shape[-1])


def _swiglu_fwd(g2: torch.Tensor, u2: torch.Tensor) -> torch.Tensor:
    n_rows, n_cols = g2.shape
    y = torch.empty((n_rows, n_cols), dtype=g2.dtype, device=g2.device)
    block, warps = _block(n_cols)
    with launch_on(g2):  # the launch goes to g2's GPU, not the current one
        _swiglu_fwd_kernel[(n_rows, triton.cdiv(n_cols, block))](
            g2, u2, y, g2.stride(0), u2.stride(0), n_cols, BLOCK=block, num_warps=warps
        )
    return y


def _swiglu_bwd(dy2, g2, u2, dg, du, stride_dgu):
    n_rows, n_cols = g2.shape
    block, warps = _block(n_cols)
    with launch_on(g2):  # the launch goes to g2's GPU, not the current one
        _swiglu_bwd_kernel[(n_rows, triton.cdiv(n_cols, block))](
            dy2, g2, u2, dg, du, dy2.stride(0), g2.stride(0), u2.stride(0), stride_dgu, n_cols, BLOCK=block, num_warps=warps
        )


class _SwiGLUFunction(torch.autograd.Function):
    """Over 2-D rows ``(M, F)`` of gate and up."""

    @staticmethod
    def forward(ctx, g2, u2):
        ctx.save_for_backward(g2, u2)
        return _swiglu_fwd(g2, u2)

    @staticmethod
    def backward(ctx, dy):
        g2, u2 = ctx.saved_tensors
        dy = dy if dy.stride(-1) == 1 else dy.contiguous()
        dg = torch.empty(g2.shape, dtype=g2.dtype, device=g2.device)
        du = torch.empty(u2.shape, dtype=u2.dtype, device=u2.device)
        _swiglu_bwd(dy, g2, u2, dg, du, g2.shape[1])
        return dg, du


class _SwiGLUFusedFunction(torch.autograd.Function):
    """Over 2-D rows ``(M, 2F)``: gate = first half, up = second half, read and written in place."""

    @staticmethod
    def forward(ctx, x2):
        ctx.save_for_backward(x2)
        f = x2.shape[1] // 2
        return _swiglu_fwd(x2[:, :f], x2[:, f:])

    @staticmethod
    def backward(ctx, dy):
        (x2,) = ctx.saved_tensors
        f = x2.shape[1] // 2
        dy = dy if dy.stride(-1) == 1 else dy.contiguous()
        dx = torch.empty(x2.shape, dtype=x2.dtype, device=x2.device)
        _swiglu_bwd(dy, x2[:, :f], x2[:, f:], dx, dx[:, f:], 2 * f)
        return dx


# torch.compile: the launchers as opaque custom ops traced through shape-only fakes; eager calls keep the
# autograd.Functions above.
_CUSTOM_OPS = triton_available() and hasattr(torch.library, "custom_op")
if _CUSTOM_OPS:

    @torch.library.custom_op("xkernels::swiglu_fwd", mutates_args=(), schema="(Tensor g2, Tensor u2) -> Tensor")
    def _swiglu_fwd_op(g2, u2):
        return _swiglu_fwd(g2, u2)

    @_swiglu_fwd_op.register_fake
    def _(g2, u2):
        return g2.new_empty(g2.shape)

    @torch.library.custom_op(
        "xkernels::swiglu_bwd", mutates_args=(), schema="(Tensor dy, Tensor g2, Tensor u2) -> (Tensor, Tensor)"
    )
    def _swiglu_bwd_op(dy, g2, u2):
        dy = dy if dy.stride(-1) == 1 else dy.contiguous()
        dg = torch.empty(g2.shape, dtype=g2.dtype, device=g2.device)
        du = torch.empty(u2.shape, dtype=u2.dtype, device=u2.device)
        _swiglu_bwd(dy, g2, u2, dg, du, g2.shape[1])
        return dg, du

    @_swiglu_bwd_op.register_fake
    def _(dy, g2, u2):
        return g2.new_empty(g2.shape), u2.new_empty(u2.shape)

    @torch.library.custom_op("xkernels::swiglu_fused_fwd", mutates_args=(), schema="(Tensor x2) -> Tensor")
    def _swiglu_fused_fwd_op(x2):
        f = x2.shape[1] // 2
        return _swiglu_fwd(x2[:, :f], x2[:, f:])

    @_swiglu_fused_fwd_op.register_fake
    def _(x2):
        return x2.new_empty(x2.shape[0], x2.shape[1] // 2)

    @torch.library.custom_op("xkernels::swiglu_fused_bwd", mutates_args=(), schema="(Tensor dy, Tensor x2) -> Tensor")
    def _swiglu_fused_bwd_op(dy, x2):
        f = x2.shape[1] // 2
        dy = dy if dy.stride(-1) == 1 else dy.contiguous()
        dx = torch.empty(x2.shape, dtype=x2.dtype, device=x2.device)
        _swiglu_bwd(dy, x2[:, :f], x2[:, f:], dx, dx[:, f:], 2 * f)
        return dx

    @_swiglu_fused_bwd_op.register_fake
    def _(dy, x2):
        return x2.new_empty(x2.shape)

    def _save_inputs(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    _swiglu_fwd_op.register_autograd(
        lambda ctx, dy: _swiglu_bwd_op(dy, *ctx.saved_tensors), setup_context=_save_inputs
    )
    _swiglu_fused_fwd_op.register_autograd(
        lambda ctx, dy: _swiglu_fused_bwd_op(dy, *ctx.saved_tensors), setup_context=_save_inputs
    )


# ----------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for two tensors of the same shape, dtype and device (fp32/fp16/bf16).

    Output has the shape and dtype of ``gate``.  Views (e.g. the halves of a fused projection) are read
    in place as long as their last dim is contiguous.
    """
    check_float("gate", gate)
    check_float("up", up)
    if gate.shape != up.shape:
        raise ValueError(f"gate and up must have the same shape, got {tuple(gate.shape)} and {tuple(up.shape)}")
    if gate.dtype != up.dtype:
        raise TypeError(
            f"up dtype {str(up.dtype).removeprefix('torch.')} differs from gate dtype {str(gate.dtype).removeprefix('torch.')}"
        )
    check_same_device("up", up, "gate", gate)
    check_nonempty("gate", gate)
    if use_triton(gate):
        fn = _swiglu_fwd_op if _CUSTOM_OPS and compiling() else _SwiGLUFunction.apply
        return fn(_rows(gate), _rows(up)).view(gate.shape)
    return swiglu_ref(gate, up)


def swiglu_fused(x: torch.Tensor) -> torch.Tensor:
    """SwiGLU of a fused gate+up projection ``x`` of shape ``(..., 2F)`` -> ``(..., F)``.

    ``gate = x[..., :F]``, ``up = x[..., F:]`` (concatenate the gate and up weights in that order:
    ``W = cat([W_gate, W_up], 0)``).  No split copy is made in the forward or the backward.
    """
    check_float("x", x)
    check_nonempty("x", x)
    if x.shape[-1] % 2:
        raise ValueError(f"the last dim of x must be even (gate and up halves), got {x.shape[-1]}")
    if use_triton(x):
        out_shape = (*x.shape[:-1], x.shape[-1] // 2)
        fn = _swiglu_fused_fwd_op if _CUSTOM_OPS and compiling() else _SwiGLUFusedFunction.apply
        return fn(_rows(x)).view(out_shape)
    return swiglu_fused_ref(x)
