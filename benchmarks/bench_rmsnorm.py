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
from benchmarks.common import compile_fn, dtype_name, import_peer, pick, randn, require_cuda, run

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
    require_cuda("Liger-Kernel")
    functional = import_peer("liger_kernel.transformers.functional", "liger-kernel")
    fn = getattr(functional, "liger_rms_norm", None)
    if fn is None:
        pytest.skip("liger_kernel.transformers.functional.liger_rms_norm missing in the installed Liger-Kernel")
    return lambda x, w: fn(x, w, EPS, casting_mode="llama", in_place=False)


def _liger_add_rms():
    require_cuda("Liger-Kernel")
    mod = import_peer("liger_kernel.ops.fused_add_rms_norm", "liger-kernel (with fused_add_rms_norm)")
    func = getattr(mod, "LigerFusedAddRMSNormFunction", None)
    if func is None:
        pytest.skip("LigerFusedAddRMSNormFunction missing in the installed Liger-Kernel")
    return lambda x, r, w: func.apply(x, r, w, EPS, 0.0, "llama", False)


def _rms_fn(impl: str):
    if impl == "xkernels":
        return lambda x, w: xkernels.rms_norm(x, w, EPS)
    if impl == "eager":
        return rms_norm_eager
    if impl == "compile":
        return compile_fn(rms_norm_eager)
    return _liger_rms()


def _add_fn(impl: str):
    if impl == "xkernels":
        return lambda x, r, w: xkernels.add_rms_norm(x, r, w, EPS)
    if impl == "eager":
        return add_rms_norm_eager
    if impl == "compile":
        return compile_fn(add_rms_norm_eager)
    return _liger_add_rms()


@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("impl", IMPLS)
def test_rms_norm(benchmark, impl, tokens, mode):
    fn = _rms_fn(impl)
    grad = mode != "fwd"

    def make_inputs():
        x = randn(tokens, HIDDEN, dtype=DTYPE, requires_grad=grad)
        w = (1 + 0.1 * randn(HIDDEN, dtype=torch.float32)).to(DTYPE).requires_grad_(grad)
        return (x, w), randn(tokens, HIDDEN, dtype=DTYPE)

    es = torch.empty((), dtype=DTYPE).element_size()
    run(
        benchmark,
        fn=fn,
        make_inputs=make_inputs,
        mode=mode,
        impl=impl,
        family="rmsnorm",
        group=f"rms_norm {mode} {tokens}x{HIDDEN} {dtype_name(DTYPE)}",
        shape=f"{tokens}x{HIDDEN}",
        dtype=DTYPE,
        bytes_moved=(2 if mode == "fwd" else 5) * tokens * HIDDEN * es,
    )


@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("impl", IMPLS)
def test_add_rms_norm(benchmark, impl, tokens, mode):
    fn = _add_fn(impl)
    grad = mode != "fwd"

    def make_inputs():
        x = randn(tokens, HIDDEN, dtype=DTYPE, requires_grad=grad)
        r = randn(tokens, HIDDEN, dtype=DTYPE, requires_grad=grad)
        w = (1 + 0.1 * randn(HIDDEN, dtype=torch.float32)).to(DTYPE).requires_grad_(grad)
        return (x, r, w), (randn(tokens, HIDDEN, dtype=DTYPE), randn(tokens, HIDDEN, dtype=DTYPE))

    es = torch.empty((), dtype=DTYPE).element_size()
    run(
        benchmark,
        fn=fn,
        make_inputs=make_inputs,
        mode=mode,
        impl=impl,
        family="rmsnorm",
        group=f"add_rms_norm {mode} {tokens}x{HIDDEN} {dtype_name(DTYPE)}",
        shape=f"{tokens}x{HIDDEN}",
        dtype=DTYPE,
        bytes_moved=(4 if mode == "fwd" else 8) * tokens * HIDDEN * es,
    )
