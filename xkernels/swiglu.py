"""Fused SwiGLU and GEGLU activations: ``silu(gate) * up`` / ``gelu_tanh(gate) * up`` in one pass, Triton
kernels + PyTorch references.  One pair of kernels serves both (an ``ACT`` constexpr picks the activation).

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

GEGLU (Gemma, Phi-3-style MLPs; Liger-Kernel's ``LigerGELUMulFunction``): the tanh approximation of GELU,
``gelu_tanh(g) = 0.5 g (1 + tanh(z))`` with ``z = sqrt(2/pi) (g + 0.044715 g^3)`` -- torch's
``F.gelu(g, approximate="tanh")``.  Since ``0.5 (1 + tanh(z)) = sigmoid(2z)`` the kernels compute
``gelu_tanh(g) = g * sigmoid(2z)`` (no tanh, no cancellation in ``1 + tanh`` for negative ``g``), and with
``p = sigmoid(2z)``:

* ``y = g p u``,  ``du = dy * g p``
* ``dg = dy * u * (p + g p (1 - p) * 2 sqrt(2/pi) (1 + 3 * 0.044715 g^2))``

:func:`geglu` / :func:`geglu_fused` mirror :func:`swiglu` / :func:`swiglu_fused`.
"""

from __future__ import annotations

import math

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


_GELU_C = math.sqrt(2.0 / math.pi)  # the tanh approximation's constants (Hendrycks & Gimpel)
_GELU_A = 0.044715


def geglu_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``F.gelu(gate, approximate="tanh") * up`` in fp32 (float64 for float64 inputs), rounded once."""
    acc = torch.float64 if gate.dtype == torch.float64 else torch.float32
    return (F.gelu(gate.to(acc), approximate="tanh") * up.to(acc)).to(gate.dtype)


def geglu_bwd_ref(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed-form ``(dgate, dup)`` of :func:`geglu_ref` (see the module docstring), in the input dtype."""
    acc = torch.float64 if gate.dtype == torch.float64 else torch.float32
    g, u, d = gate.to(acc), up.to(acc), dy.to(acc)
    p = torch.sigmoid(2 * _GELU_C * (g + _GELU_A * g**3))
    dgate = d * u * (p + g * p * (1 - p) * 2 * _GELU_C * (1 + 3 * _GELU_A * g * g))
    dup = d * g * p
    return dgate.to(gate.dtype), dup.to(up.dtype)


def geglu_fused_ref(x: torch.Tensor) -> torch.Tensor:
    """:func:`geglu_ref` on the two halves ``x[..., :F]`` (gate) and ``x[..., F:]`` (up) of ``x``."""
    gate, up = x.chunk(2, dim=-1)
    return geglu_ref(gate, up)


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
        ACT: tl.constexpr,  # 0: silu (SwiGLU), 1: gelu_tanh (GEGLU)
    ):
        """Grid (rows, column blocks).  ``y = g * p * u`` in fp32, rounded once, with ``p = sigmoid(g)``
        (SwiGLU) or ``p = sigmoid(2 sqrt(2/pi) (g + 0.044715 g^3))`` (GEGLU: ``g * p = gelu_tanh(g)``)."""
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n_cols
        g = tl.load(G + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(U + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
        if ACT == 0:
            p = tl.sigmoid(g)
        else:
            p = tl.sigmoid(2.0 * 0.7978845608028654 * (g + 0.044715 * g * g * g))
        y = g * p * u
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
        ACT: tl.constexpr,  # 0: silu (SwiGLU), 1: gelu_tanh (GEGLU)
    ):
        """SwiGLU: ``s = sigmoid(g)``, ``du = dy * g * s``, ``dg = dy * u * s * (1 + g * (1 - s))`` in fp32.
        GEGLU: ``p = sigmoid(2z)``, ``du = dy * g * p``, ``dg = dy * u * (p + g p (1 - p) 2 dz/dg)``.
        The activation is recomputed here from ``g`` rather than saved by the forward."""
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n_cols
        dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(G + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(U + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
        if ACT == 0:
            s = tl.sigmoid(g)
            du = dy * g * s
            dg = dy * u * s * (1.0 + g * (1.0 - s))
        else:
            p = tl.sigmoid(2.0 * 0.7978845608028654 * (g + 0.044715 * g * g * g))
            du = dy * g * p
            dz2 = 2.0 * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * g * g)  # d(2z)/dg
            dg = dy * u * (p + g * p * (1.0 - p) * dz2)
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


def _swiglu_fwd(g2: torch.Tensor, u2: torch.Tensor, act: int = 0) -> torch.Tensor:
    n_rows, n_cols = g2.shape
    y = torch.empty((n_rows, n_cols), dtype=g2.dtype, device=g2.device)
    block, warps = _block(n_cols)
    with launch_on(g2):  # the launch goes to g2's GPU, not the current one
        _swiglu_fwd_kernel[(n_rows, triton.cdiv(n_cols, block))](
            g2, u2, y, g2.stride(0), u2.stride(0), n_cols, BLOCK=block, ACT=act, num_warps=warps
        )
    return y


def _swiglu_bwd(dy2, g2, u2, dg, du, stride_dgu, act: int = 0):
    n_rows, n_cols = g2.shape
    block, warps = _block(n_cols)
    with launch_on(g2):  # the launch goes to g2's GPU, not the current one
        _swiglu_bwd_kernel[(n_rows, triton.cdiv(n_cols, block))](
            dy2, g2, u2, dg, du, dy2.stride(0), g2.stride(0), u2.stride(0), stride_dgu, n_cols, BLOCK=block, ACT=act,
            num_warps=warps
        )


_ACTS = {"silu": 0, "gelu_tanh": 1}


def _glu_bwd_split(dy, g2, u2, act):
    dy = dy if dy.stride(-1) == 1 else dy.contiguous()
    dg = torch.empty(g2.shape, dtype=g2.dtype, device=g2.device)
    du = torch.empty(u2.shape, dtype=u2.dtype, device=u2.device)
    _swiglu_bwd(dy, g2, u2, dg, du, g2.shape[1], act)
    return dg, du


def _glu_bwd_fused(dy, x2, act):
    f = x2.shape[1] // 2
    dy = dy if dy.stride(-1) == 1 else dy.contiguous()
    dx = torch.empty(x2.shape, dtype=x2.dtype, device=x2.device)
    _swiglu_bwd(dy, x2[:, :f], x2[:, f:], dx, dx[:, f:], 2 * f, act)
    return dx


class _SwiGLUFunction(torch.autograd.Function):
    """Over 2-D rows ``(M, F)`` of gate and up; ``act`` 0 = SwiGLU, 1 = GEGLU."""

    @staticmethod
    def forward(ctx, g2, u2, act=0):
        ctx.save_for_backward(g2, u2)
        ctx.act = act
        return _swiglu_fwd(g2, u2, act)

    @staticmethod
    def backward(ctx, dy):
        g2, u2 = ctx.saved_tensors
        return (*_glu_bwd_split(dy, g2, u2, ctx.act), None)


class _SwiGLUFusedFunction(torch.autograd.Function):
    """Over 2-D rows ``(M, 2F)``: gate = first half, up = second half, read and written in place."""

    @staticmethod
    def forward(ctx, x2, act=0):
        ctx.save_for_backward(x2)
        ctx.act = act
        f = x2.shape[1] // 2
        return _swiglu_fwd(x2[:, :f], x2[:, f:], act)

    @staticmethod
    def backward(ctx, dy):
        (x2,) = ctx.saved_tensors
        return _glu_bwd_fused(dy, x2, ctx.act), None


# torch.compile: the launchers as opaque custom ops traced through shape-only fakes; eager calls keep the
# autograd.Functions above.  One set of four ops per activation (xkernels::swiglu_*, xkernels::geglu_*).
_CUSTOM_OPS = triton_available() and hasattr(torch.library, "custom_op")


def _register_ops(name: str, act: int):
    """Registers ``xkernels::{name}_fwd / _bwd / _fused_fwd / _fused_bwd``; returns the four ops."""

    @torch.library.custom_op(f"xkernels::{name}_fwd", mutates_args=(), schema="(Tensor g2, Tensor u2) -> Tensor")
    def fwd(g2, u2):
        return _swiglu_fwd(g2, u2, act)

    @fwd.register_fake
    def _(g2, u2):
        return g2.new_empty(g2.shape)

    @torch.library.custom_op(
        f"xkernels::{name}_bwd", mutates_args=(), schema="(Tensor dy, Tensor g2, Tensor u2) -> (Tensor, Tensor)"
    )
    def bwd(dy, g2, u2):
        return _glu_bwd_split(dy, g2, u2, act)

    @bwd.register_fake
    def _(dy, g2, u2):
        return g2.new_empty(g2.shape), u2.new_empty(u2.shape)

    @torch.library.custom_op(f"xkernels::{name}_fused_fwd", mutates_args=(), schema="(Tensor x2) -> Tensor")
    def fused_fwd(x2):
        f = x2.shape[1] // 2
        return _swiglu_fwd(x2[:, :f], x2[:, f:], act)

    @fused_fwd.register_fake
    def _(x2):
        return x2.new_empty(x2.shape[0], x2.shape[1] // 2)

    @torch.library.custom_op(f"xkernels::{name}_fused_bwd", mutates_args=(), schema="(Tensor dy, Tensor x2) -> Tensor")
    def fused_bwd(dy, x2):
        return _glu_bwd_fused(dy, x2, act)

    @fused_bwd.register_fake
    def _(dy, x2):
        return x2.new_empty(x2.shape)

    def save_inputs(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    fwd.register_autograd(lambda ctx, dy: bwd(dy, *ctx.saved_tensors), setup_context=save_inputs)
    fused_fwd.register_autograd(lambda ctx, dy: fused_bwd(dy, *ctx.saved_tensors), setup_context=save_inputs)
    return fwd, bwd, fused_fwd, fused_bwd


if _CUSTOM_OPS:
    _swiglu_fwd_op, _swiglu_bwd_op, _swiglu_fused_fwd_op, _swiglu_fused_bwd_op = _register_ops("swiglu", 0)
    _geglu_fwd_op, _geglu_bwd_op, _geglu_fused_fwd_op, _geglu_fused_bwd_op = _register_ops("geglu", 1)


# ----------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------


def _check_pair(gate: torch.Tensor, up: torch.Tensor) -> None:
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


def _check_fused(x: torch.Tensor) -> None:
    check_float("x", x)
    check_nonempty("x", x)
    if x.shape[-1] % 2:
        raise ValueError(f"the last dim of x must be even (gate and up halves), got {x.shape[-1]}")


def _glu(gate: torch.Tensor, up: torch.Tensor, act: int) -> torch.Tensor:
    _check_pair(gate, up)
    if use_triton(gate):
        if _CUSTOM_OPS and compiling():
            op = _swiglu_fwd_op if act == 0 else _geglu_fwd_op
            return op(_rows(gate), _rows(up)).view(gate.shape)
        return _SwiGLUFunction.apply(_rows(gate), _rows(up), act).view(gate.shape)
    return (swiglu_ref if act == 0 else geglu_ref)(gate, up)


def _glu_fused(x: torch.Tensor, act: int) -> torch.Tensor:
    _check_fused(x)
    if use_triton(x):
        out_shape = (*x.shape[:-1], x.shape[-1] // 2)
        if _CUSTOM_OPS and compiling():
            op = _swiglu_fused_fwd_op if act == 0 else _geglu_fused_fwd_op
            return op(_rows(x)).view(out_shape)
        return _SwiGLUFusedFunction.apply(_rows(x), act).view(out_shape)
    return (swiglu_fused_ref if act == 0 else geglu_fused_ref)(x)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for two tensors of the same shape, dtype and device (fp32/fp16/bf16).

    Output has the shape and dtype of ``gate``.  Views (e.g. the halves of a fused projection) are read
    in place as long as their last dim is contiguous.
    """
    return _glu(gate, up, 0)


def swiglu_fused(x: torch.Tensor) -> torch.Tensor:
    """SwiGLU of a fused gate+up projection ``x`` of shape ``(..., 2F)`` -> ``(..., F)``.

    ``gate = x[..., :F]``, ``up = x[..., F:]`` (concatenate the gate and up weights in that order:
    ``W = cat([W_gate, W_up], 0)``).  No split copy is made in the forward or the backward.
    """
    return _glu_fused(x, 0)


def geglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``F.gelu(gate, approximate="tanh") * up`` (GEGLU) in one pass, fp32 inside, rounded once to the input dtype.

    Same contract as :func:`swiglu` (shapes, dtypes, strided views); math in the module docstring.
    """
    return _glu(gate, up, 1)


def geglu_fused(x: torch.Tensor) -> torch.Tensor:
    """GEGLU of a fused gate+up projection ``x`` of shape ``(..., 2F)`` -> ``(..., F)`` (as :func:`swiglu_fused`)."""
    return _glu_fused(x, 1)
