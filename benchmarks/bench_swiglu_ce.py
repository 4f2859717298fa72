"""Fused SwiGLU and the chunked linear + cross-entropy, against eager PyTorch, torch.compile and Liger-Kernel.

SwiGLU: tokens x FFN 3840 (bf16 on CUDA: 4096 and 16384 tokens; fp32 on CPU: 2048).  Bytes: fwd reads gate and up
and writes the output (3 N F); the backward reads dy, gate, up and writes d gate, d up (5 N F).  ``xkernels-fused``
is :func:`xkernels.swiglu_fused` on the fused gate|up projection output ``(N, 2F)``.

Linear + cross-entropy: hidden 1536 -> vocab 129280 at 16384 tokens in bf16 on CUDA (hidden 256 -> vocab 8192 at
1024 tokens, fp32, on CPU), forward + backward (the fused op computes its gradients during the forward).  FLOPs:
6 N V H (logits, d hidden, d weight).  ``logit_scale`` is 1 so Liger's kernel (which has no scale) computes the
same loss.  Every contender also records ``peak_mem_bytes``: the memory allocated above the inputs during one
untimed forward + backward (CUDA: ``max_memory_allocated``; CPU: the profiler's allocator events).

Targets (issue 9): peak extra memory <= 25% of the unfused ``eager`` path; time <= 1.1x unfused on GPU.
"""

from __future__ import annotations

import pytest
import torch

import xkernels
from benchmarks.common import (
    DEVICE,
    ON_CUDA,
    backward,
    contender,
    dtype_name,
    liger,
    pick,
    randn,
    run,
    run_memory_bound,
)
from xkernels.cross_entropy import measure_peak_memory, unfused_cross_entropy

FFN = 3840
SWIGLU_TOKENS = pick([4096, 16384], [2048])
DTYPE = pick(torch.bfloat16, torch.float32)
CE_SHAPE = pick((16384, 1536, 129280), (1024, 256, 8192))  # tokens, hidden, vocab


# ------------------------------------------------------------------------------------------------ SwiGLU
def swiglu_eager(gate, up):
    return torch.nn.functional.silu(gate) * up


def _liger_swiglu():
    return liger("liger_kernel.ops.swiglu", "LigerSiLUMulFunction").apply


def _swiglu_fn(impl: str):
    if impl == "xkernels-fused":
        return xkernels.swiglu_fused
    return contender(impl, ours=xkernels.swiglu, eager=swiglu_eager, peer=_liger_swiglu)


@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("tokens", SWIGLU_TOKENS)
@pytest.mark.parametrize("impl", ["xkernels", "xkernels-fused", "eager", "compile", "liger"])
def test_swiglu(benchmark, impl, tokens, mode):
    fn = _swiglu_fn(impl)
    grad = mode != "fwd"

    def make_inputs():
        dy = randn(tokens, FFN, dtype=DTYPE)
        if impl == "xkernels-fused":
            return (randn(tokens, 2 * FFN, dtype=DTYPE, requires_grad=grad),), dy
        return (
            randn(tokens, FFN, dtype=DTYPE, requires_grad=grad),
            randn(tokens, FFN, dtype=DTYPE, requires_grad=grad),
        ), dy

    bytes_moved = (3 if mode == "fwd" else 8) * tokens * FFN * DTYPE.itemsize
    run_memory_bound(benchmark, fn, make_inputs, op="swiglu", family="swiglu", impl=impl, mode=mode,
                     shape=f"{tokens}x{FFN}", dtype=DTYPE, bytes_moved=bytes_moved)  # fmt: skip


# ------------------------------------------------------------------------------------ linear + cross-entropy
def _liger_ce():
    flce = liger("liger_kernel.transformers.functional", "liger_fused_linear_cross_entropy")
    return lambda h, w, t: flce(h, w, t)


def _ce_fn(impl: str):
    ours = lambda h, w, t: xkernels.linear_cross_entropy(h, w, t)
    return contender(impl, ours=ours, eager=lambda h, w, t: unfused_cross_entropy(h, w, t), peer=_liger_ce)


@pytest.mark.parametrize("impl", ["xkernels", "eager", "compile", "liger"])
def test_linear_cross_entropy(benchmark, impl):
    fn = _ce_fn(impl)
    tokens, hidden, vocab = CE_SHAPE

    def make_inputs():
        h = randn(tokens, hidden, dtype=DTYPE, requires_grad=True)
        w = randn(vocab, hidden, dtype=DTYPE, scale=hidden**-0.5, requires_grad=True)
        t = torch.randint(0, vocab, (tokens,), device=DEVICE)
        t[::17] = -100  # a few ignored positions, as with packed documents
        return (h, w, t), torch.ones((), device=DEVICE)

    peak = None
    if not benchmark.disabled:
        (h, w, t), g = make_inputs()
        peak = measure_peak_memory(lambda: backward(fn(h, w, t), g), DEVICE)
        del h, w, t
        if ON_CUDA:
            torch.cuda.empty_cache()
    run(
        benchmark,
        fn=fn,
        make_inputs=make_inputs,
        mode="fwdbwd",
        impl=impl,
        family="cross_entropy",
        group=f"linear_cross_entropy fwdbwd {tokens}x{hidden}->{vocab} {dtype_name(DTYPE)}",
        shape=f"{tokens}x{hidden}->{vocab}",
        dtype=DTYPE,
        flops=6 * tokens * vocab * hidden,
        extra={"peak_mem_bytes": peak} if peak is not None else None,
    )
