"""Fused RMSNorm (and the pre-norm block's fused residual add): Triton kernels + PyTorch reference.

Semantics (released Xmodel / HF Llama): ``y = weight * (x32 * rsqrt(mean(x32**2, -1) + eps)).to(x.dtype)``
with ``x32 = x.float()`` -- normalise in fp32, cast back to the input dtype, THEN multiply by the weight.
``weight`` must have the dtype of ``x`` (the model keeps norm weights in the activation dtype), so the
output dtype is ``x.dtype``; :class:`RMSNorm` casts its weight to the input dtype when they differ.
"""

from __future__ import annotations

import torch
from torch import nn

from xkernels._checks import check_float, check_nonempty, check_same_device
from xkernels.dispatch import use_triton

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
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5
) -> tuple[torch.Tensor, torch.Tensor]:
    """``s = x + residual`` (in the input dtype); returns ``(rms_norm_ref(s, weight, eps), s)``."""
    s = x + residual
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
        return _RMSNormFunction.apply(x, None, weight, float(eps))[0]
    return rms_norm_ref(x, weight, eps)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused ``s = x + residual; return rms_norm(s, weight, eps), s`` (one pass over memory)."""
    _validate(x, weight, eps, residual)
    if use_triton(x):
        return _RMSNormFunction.apply(x, residual, weight, float(eps))
    return add_rms_norm_ref(x, residual, weight, eps)


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

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        weight = self.weight if self.weight.dtype == x.dtype else self.weight.to(x.dtype)
        if residual is None:
            return rms_norm(x, weight, self.eps)
        return add_rms_norm(x, residual, weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}"


# ----------------------------------------------------------------------------------------------------
# Autograd (kernels land here; until then the reference runs under autograd)
# ----------------------------------------------------------------------------------------------------


class _RMSNormFunction:
    @staticmethod
    def apply(x, residual, weight, eps):
        if residual is None:
            return (rms_norm_ref(x, weight, eps),)
        return add_rms_norm_ref(x, residual, weight, eps)
