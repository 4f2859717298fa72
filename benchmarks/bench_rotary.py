"""Rotary embedding on q and k at once: xkernels vs eager PyTorch (HF Llama's form), torch.compile and Liger-Kernel.

Shapes: q (B, T, 24, 64), k (B, T, 8, 64) (the model's GQA heads) with B*T tokens; bf16 on CUDA (1x4096 and
4x4096), fp32 on CPU (1x1024).  Bytes: read and write q and k once per pass, plus the cos/sin rows per token
(fp32); fwd+bwd counts both passes.  Liger's kernel rotates in place and takes (B, H, T, D) views: it is given
exactly the transposed views HF passes it.

GPU target (issue 2): >= 85% of the measured copy bandwidth and >= 1.2x Liger.

``xkernels`` is the default kernel (``kernel="position"``: cos/sin once per position for every q/k head of the batch
rows sharing it, 256-element head tiles, 40 registers / 75% occupancy on sm_90a); ``xkernels-token`` the earlier one
(``kernel="token"``: one program per token, all heads in one tile, 72 registers / 44%), timed side by side (issue 21
item 3).  ``xkernels-hf`` is the HF-signature entry ``xkernels.apply_rotary_pos_emb`` on HF's layouts
((B, H, T, D) views, (1, T, D) tables in the activation dtype), as ``patch()`` and Liger users call it.
"""

from __future__ import annotations

import functools

import pytest
import torch

import xkernels
from benchmarks.common import contender, liger, pick, randn, run_memory_bound

N_Q, N_KV, HEAD_DIM = 24, 8, 64
THETA = 500000.0
SHAPES = pick([(1, 4096), (4, 4096)], [(1, 1024)])  # (batch, seq)
DTYPE = pick(torch.bfloat16, torch.float32)
IMPLS = ["xkernels", "xkernels-token", "xkernels-hf", "eager", "compile", "liger"]


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotary_eager(q, k, cos, sin):
    """HF Llama's apply_rotary_pos_emb on (B, T, H, D) tensors, tables cast to the activation dtype."""
    seq = q.shape[1]
    c = cos[:seq].to(q.dtype)[None, :, None, :]
    s = sin[:seq].to(q.dtype)[None, :, None, :]
    return q * c + _rotate_half(q) * s, k * c + _rotate_half(k) * s


def _token():
    return functools.partial(xkernels.apply_rotary, kernel="token")


def _hf_entry():
    def fn(q, k, cos, sin):
        seq = q.shape[1]
        c, s = cos[:seq].to(q.dtype)[None], sin[:seq].to(q.dtype)[None]  # (1, T, D) as HF's rotary embedding
        qo, ko = xkernels.apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), c, s)
        return qo.transpose(1, 2), ko.transpose(1, 2)

    return fn


def _liger():
    rope = liger("liger_kernel.transformers.functional", "liger_rope")

    def fn(q, k, cos, sin):
        seq = q.shape[1]
        c, s = cos[:seq].to(q.dtype)[None], sin[:seq].to(q.dtype)[None]  # (1, T, D)
        qo, ko = rope(q.transpose(1, 2), k.transpose(1, 2), c, s)
        return qo.transpose(1, 2), ko.transpose(1, 2)

    return fn


@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("impl", IMPLS)
def test_apply_rotary(benchmark, impl, shape, mode):
    peers = {"xkernels-token": _token, "xkernels-hf": _hf_entry, "liger": _liger}
    fn = contender(impl, ours=xkernels.apply_rotary, eager=rotary_eager, peer=peers.get(impl))
    batch, seq = shape
    grad = mode != "fwd"
    cos, sin = xkernels.rotary_cos_sin(seq, HEAD_DIM, THETA, device=randn(1, dtype=torch.float32).device)

    def make_inputs():
        q = randn(batch, seq, N_Q, HEAD_DIM, dtype=DTYPE, requires_grad=grad)
        k = randn(batch, seq, N_KV, HEAD_DIM, dtype=DTYPE, requires_grad=grad)
        grads = (randn(batch, seq, N_Q, HEAD_DIM, dtype=DTYPE), randn(batch, seq, N_KV, HEAD_DIM, dtype=DTYPE))
        return (q, k, cos, sin), grads

    per_pass = 2 * batch * seq * (N_Q + N_KV) * HEAD_DIM * DTYPE.itemsize + 2 * seq * HEAD_DIM * 4
    run_memory_bound(benchmark, fn, make_inputs, op="apply_rotary", family="rotary", impl=impl, mode=mode,
                     shape=f"{batch}x{seq}x({N_Q}+{N_KV})x{HEAD_DIM}", dtype=DTYPE,
                     bytes_moved=per_pass * (1 if mode == "fwd" else 2))  # fmt: skip
