"""GEGLU and LayerNorm: xkernels vs eager PyTorch, torch.compile and Liger-Kernel (issue 19).

GEGLU (``gelu_tanh(gate) * up``): tokens x FFN 3840, bf16 on CUDA (4096 and 16384 tokens), fp32 on CPU (2048).
Bytes: fwd reads gate, up and writes y (3 N F); fwd+bwd adds reading dy, gate, up and writing d gate, d up (8 N F).
``xkernels-fused`` is :func:`xkernels.geglu_fused` on the fused gate|up projection ``(N, 2F)``.

LayerNorm (weight and bias): tokens x hidden 1536, same tokens / dtypes.  Bytes: fwd reads x, writes y (2 N H);
fwd+bwd adds reading dy, x and writing dx (5 N H); the parameters and the per-row statistics are negligible.
"""

from __future__ import annotations

import pytest
import torch

import xkernels
from benchmarks.common import contender, liger, pick, randn, run_memory_bound

FFN = 3840
HIDDEN = 1536
EPS = 1e-5
TOKENS = pick([4096, 16384], [2048])
DTYPE = pick(torch.bfloat16, torch.float32)


# ------------------------------------------------------------------------------------------------ GEGLU
def geglu_eager(gate, up):
    """What a Gemma-style MLP writes by hand."""
    return torch.nn.functional.gelu(gate, approximate="tanh") * up


def _liger_geglu():
    return liger("liger_kernel.ops.geglu", "LigerGELUMulFunction").apply


@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("impl", ["xkernels", "xkernels-fused", "eager", "compile", "liger"])
def test_geglu(benchmark, impl, tokens, mode):
    if impl == "xkernels-fused":
        fn = xkernels.geglu_fused
    else:
        fn = contender(impl, ours=xkernels.geglu, eager=geglu_eager, peer=_liger_geglu)
    grad = mode != "fwd"

    def make_inputs():
        dy = randn(tokens, FFN, dtype=DTYPE)
        if impl == "xkernels-fused":
            return (randn(tokens, 2 * FFN, dtype=DTYPE, requires_grad=grad),), dy
        return (randn(tokens, FFN, dtype=DTYPE, requires_grad=grad),
                randn(tokens, FFN, dtype=DTYPE, requires_grad=grad)), dy  # fmt: skip

    bytes_moved = (3 if mode == "fwd" else 8) * tokens * FFN * DTYPE.itemsize
    run_memory_bound(benchmark, fn, make_inputs, op="geglu", family="geglu", impl=impl, mode=mode,
                     shape=f"{tokens}x{FFN}", dtype=DTYPE, bytes_moved=bytes_moved)  # fmt: skip


# ------------------------------------------------------------------------------------------------ LayerNorm
def layer_norm_eager(x, weight, bias):
    return torch.nn.functional.layer_norm(x, (x.shape[-1],), weight, bias, EPS)


def _liger_layer_norm():
    func = liger("liger_kernel.ops.layer_norm", "LigerLayerNormFunction")
    return lambda x, w, b: func.apply(x, w, b, EPS)


@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("impl", ["xkernels", "eager", "compile", "liger"])
def test_layer_norm(benchmark, impl, tokens, mode):
    fn = contender(impl, ours=lambda x, w, b: xkernels.layer_norm(x, w, b, EPS), eager=layer_norm_eager,
                   peer=_liger_layer_norm)
    grad = mode != "fwd"

    def make_inputs():
        x = randn(tokens, HIDDEN, dtype=DTYPE, requires_grad=grad)
        w = (1 + 0.1 * randn(HIDDEN, dtype=torch.float32)).to(DTYPE).requires_grad_(grad)
        b = (0.1 * randn(HIDDEN, dtype=torch.float32)).to(DTYPE).requires_grad_(grad)
        return (x, w, b), randn(tokens, HIDDEN, dtype=DTYPE)

    bytes_moved = (2 if mode == "fwd" else 5) * tokens * HIDDEN * DTYPE.itemsize
    run_memory_bound(benchmark, fn, make_inputs, op="layer_norm", family="layernorm", impl=impl, mode=mode,
                     shape=f"{tokens}x{HIDDEN}", dtype=DTYPE, bytes_moved=bytes_moved)  # fmt: skip
