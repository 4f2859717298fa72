"""RMSNorm and the fused add + RMSNorm: xkernels vs eager PyTorch, torch.compile and Liger-Kernel.

Shapes: tokens x hidden 1536 (the model's), bf16 on CUDA (4096 and 16384 tokens), fp32 on CPU (2048 tokens).
Bytes are the minimum traffic, in the activation dtype (the weight is negligible):

* rms_norm      fwd: read x, write y = 2 N H;  fwd+bwd: + read dy, x, write dx = 5 N H
* add_rms_norm  fwd: read x, r, write y, s = 4 N H;  fwd+bwd: + read dy, ds, s, write dx (= dr) = 8 N H

GPU targets (issue 2): fwd+bwd >= 90% of the measured copy bandwidth and >= 1.1x Liger.
"""

from __future__ import annotations

import pytest
import torch

import xkernels
from benchmarks.common import contender, liger, pick, randn, run_memory_bound

HIDDEN = 1536
EPS = 1e-5
TOKENS = pick([4096, 16384], [2048])
DTYPE = pick(torch.bfloat16, torch.float32)
IMPLS = ["xkernels", "eager", "compile", "liger"]


def rms_norm_eager(x, weight, eps=EPS):
    """What a model writes by hand (HF Llama's LlamaRMSNorm)."""
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def add_rms_norm_eager(x, residual, weight, eps=EPS):
    s = x + residual
    return rms_norm_eager(s, weight, eps), s


def _liger_rms():
    fn = liger("liger_kernel.transformers.functional", "liger_rms_norm")
    return lambda x, w: fn(x, w, EPS, casting_mode="llama", in_place=False)


def _liger_add_rms():
    package = "liger-kernel (with fused_add_rms_norm)"
    func = liger("liger_kernel.ops.fused_add_rms_norm", "LigerFusedAddRMSNormFunction", package)
    return lambda x, r, w: func.apply(x, r, w, EPS, 0.0, "llama", False)


def _weight(grad: bool) -> torch.Tensor:
    """The norm's gain: fresh, near 1, in the activation dtype."""
    return (1 + 0.1 * randn(HIDDEN, dtype=torch.float32)).to(DTYPE).requires_grad_(grad)


@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("impl", IMPLS)
def test_rms_norm(benchmark, impl, tokens, mode):
    fn = contender(impl, ours=lambda x, w: xkernels.rms_norm(x, w, EPS), eager=rms_norm_eager, peer=_liger_rms)
    grad = mode != "fwd"

    def make_inputs():
        x = randn(tokens, HIDDEN, dtype=DTYPE, requires_grad=grad)
        return (x, _weight(grad)), randn(tokens, HIDDEN, dtype=DTYPE)

    bytes_moved = (2 if mode == "fwd" else 5) * tokens * HIDDEN * DTYPE.itemsize
    run_memory_bound(benchmark, fn, make_inputs, op="rms_norm", family="rmsnorm", impl=impl, mode=mode,
                     shape=f"{tokens}x{HIDDEN}", dtype=DTYPE, bytes_moved=bytes_moved)  # fmt: skip


@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("impl", IMPLS)
def test_add_rms_norm(benchmark, impl, tokens, mode):
    ours = lambda x, r, w: xkernels.add_rms_norm(x, r, w, EPS)
    fn = contender(impl, ours=ours, eager=add_rms_norm_eager, peer=_liger_add_rms)
    grad = mode != "fwd"

    def make_inputs():
        x = randn(tokens, HIDDEN, dtype=DTYPE, requires_grad=grad)
        r = randn(tokens, HIDDEN, dtype=DTYPE, requires_grad=grad)
        return (x, r, _weight(grad)), (randn(tokens, HIDDEN, dtype=DTYPE), randn(tokens, HIDDEN, dtype=DTYPE))

    bytes_moved = (4 if mode == "fwd" else 8) * tokens * HIDDEN * DTYPE.itemsize
    run_memory_bound(benchmark, fn, make_inputs, op="add_rms_norm", family="rmsnorm", impl=impl, mode=mode,
                     shape=f"{tokens}x{HIDDEN}", dtype=DTYPE, bytes_moved=bytes_moved)  # fmt: skip


# ------------------------------------------------------------------------------------------------ options (issue 19)
def rms_norm_gemma_eager(x, weight, eps=EPS):
    """HF Gemma's RMSNorm: fp32 throughout, ``(1 + w)``, one cast at the end."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * (1.0 + weight.float())).to(x.dtype)


def _liger_rms_gemma():
    fn = liger("liger_kernel.transformers.functional", "liger_rms_norm")
    return lambda x, w: fn(x, w, EPS, offset=1.0, casting_mode="gemma", in_place=False)


@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("impl", IMPLS)
def test_rms_norm_gemma(benchmark, impl, tokens, mode):
    """``offset=1, casting_mode="gemma"`` (Gemma); same bytes as :func:`test_rms_norm`."""
    ours = lambda x, w: xkernels.rms_norm(x, w, EPS, offset=1.0, casting_mode="gemma")
    fn = contender(impl, ours=ours, eager=rms_norm_gemma_eager, peer=_liger_rms_gemma)
    grad = mode != "fwd"

    def make_inputs():
        x = randn(tokens, HIDDEN, dtype=DTYPE, requires_grad=grad)
        return (x, _weight(grad)), randn(tokens, HIDDEN, dtype=DTYPE)

    bytes_moved = (2 if mode == "fwd" else 5) * tokens * HIDDEN * DTYPE.itemsize
    run_memory_bound(benchmark, fn, make_inputs, op="rms_norm_gemma", family="rmsnorm", impl=impl, mode=mode,
                     shape=f"{tokens}x{HIDDEN}", dtype=DTYPE, bytes_moved=bytes_moved)  # fmt: skip
