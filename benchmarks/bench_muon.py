"""Newton–Schulz and the Muon step: xkernels vs torch.optim.Muon vs a plain batched PyTorch implementation.

* ``newton_schulz`` on a batch of the 1.3B model's matrices (CUDA; 96 x 1536², 96 x 512x1536, 96 x 3840x1536 in
  bf16) or small ones (CPU), 5 "muon" steps.  ``eager`` is the plain batched iteration (bmm + 2 baddbmm per step)
  with torch.compile as a peer; ``torch-loop`` is ``torch.optim.Muon``'s per-matrix routine in a Python loop.
  FLOPs per matrix and step with k = min(m, n), N = max(m, n): 4 k² N + 2 k³ (the plain count: the symmetric
  kernel's saved half is not credited).
* the Gram product ``X Xᵀ`` alone (CUDA): xkernels' symmetric kernel (one triangle of tiles, mirrored) vs
  ``torch.bmm``; FLOPs 2 k² N (plain count).
* a full Muon step (momentum, Nesterov, orthogonalisation, decoupled weight decay, update) over a model's matrix
  set: CUDA the 1.3B model (48 layers x {q, o 1536²; k, v 512x1536; gate, up 3840x1536; down 1536x3840}),
  CPU the ``proxy-256`` model's matrices at 6 of its 48 layers (the CPU budget; 2 layers when timing is
  disabled).  fp32 parameters and
  gradients, bf16 orthogonalisation (torch.optim.Muon's choice).  ``eager`` groups the matrices by shape and
  runs the batched iteration with torch._foreach ops.

Targets (issue 4): CPU >= 1.5x torch.optim.Muon on the proxy set; GPU >= 2x torch.optim.Muon on the 1.3B set and
the symmetric kernel faster than bmm from 1024² up.
"""

from __future__ import annotations

import math
from collections import defaultdict

import pytest
import torch

import xkernels
from benchmarks.common import DEVICE, ON_CUDA, contender, import_peer, pick, randn, require_attr, require_cuda, run

NS_STEPS = 5
MUON_ABC = (3.4445, -4.7750, 2.0315)
EPS = 1e-7
LR, WD, MOMENTUM = 0.02, 0.1, 0.95


def _ns_dtype() -> torch.dtype:
    ns_mod = import_peer("xkernels.newton_schulz", "xkernels.newton_schulz")
    choose = getattr(ns_mod, "default_compute_dtype", None)
    return choose(DEVICE) if choose is not None else torch.bfloat16


def ns_eager(G: torch.Tensor, steps: int = NS_STEPS, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Plain batched Newton–Schulz on (b, m, n): normalise, transpose tall, bmm + 2 baddbmm per step."""
    a, b, c = MUON_ABC
    X = G.to(dtype)
    tall = X.shape[-2] > X.shape[-1]
    if tall:
        X = X.mT
    X = X / (torch.linalg.vector_norm(X, dim=(-2, -1), keepdim=True) + EPS)
    for _ in range(steps):
        A = torch.bmm(X, X.mT)
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)
        X = torch.baddbmm(X, B, X, beta=a)
    return (X.mT if tall else X).to(G.dtype)


def ns_flops(batch: int, m: int, n: int, steps: int = NS_STEPS) -> int:
    k, big = min(m, n), max(m, n)
    return batch * steps * (4 * k * k * big + 2 * k**3)


def _torch_loop():
    """torch.optim.Muon's per-matrix Newton–Schulz, in a Python loop over the batch."""
    muon_mod = import_peer("torch.optim._muon", "torch.optim.Muon (torch >= 2.9)")
    zeropower = require_attr(muon_mod, "_zeropower_via_newtonschulz", "torch.optim.Muon's Newton–Schulz")
    return lambda G: torch.stack([zeropower(g, MUON_ABC, NS_STEPS, EPS) for g in G])


NS_SHAPES = pick([(96, 1536, 1536), (96, 512, 1536), (96, 3840, 1536)], [(8, 256, 256), (8, 640, 256)])


@pytest.mark.parametrize("shape", NS_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("impl", ["xkernels", "eager", "compile", "torch-loop"])
def test_newton_schulz(benchmark, impl, shape):
    newton_schulz = require_attr(xkernels, "newton_schulz", "xkernels.newton_schulz")
    dtype = _ns_dtype()
    ours = lambda G: newton_schulz(G, steps=NS_STEPS, coefficients="muon")
    fn = contender(impl, ours=ours, eager=lambda G: ns_eager(G, dtype=dtype), peer=_torch_loop)
    b, m, n = shape
    run(
        benchmark,
        fn=fn,
        make_inputs=lambda: ((randn(b, m, n, dtype=torch.float32),), None),
        mode="fwd",
        impl=impl,
        family="muon",
        group=f"newton_schulz {b}x{m}x{n} 5 steps",
        shape=f"{b}x{m}x{n}",
        dtype=dtype if impl != "torch-loop" else torch.bfloat16,
        flops=ns_flops(b, m, n),
        ceiling="matmul_bf16_tflops" if dtype == torch.bfloat16 else "matmul_fp32_tflops",
    )


@pytest.mark.parametrize("k", [512, 1024, 1536, 2048])
@pytest.mark.parametrize("impl", ["xkernels", "eager"])
def test_gram(benchmark, impl, k):
    require_cuda("the Gram-kernel comparison (the symmetric Triton kernel)")
    ns_mod = import_peer("xkernels.newton_schulz", "xkernels.newton_schulz")
    gram = require_attr(ns_mod, "_gram", "the symmetric Gram kernel")
    batch, n = 48, 1536 if k <= 1536 else 3840

    def make_inputs():
        X = randn(batch, k, n, dtype=torch.bfloat16)
        return (X, torch.empty(batch, k, k, dtype=torch.bfloat16, device=DEVICE)), None

    if impl == "xkernels":
        fn = lambda X, out: gram(X, out, 1.0)
    else:
        fn = lambda X, out: torch.bmm(X, X.mT, out=out)
    run(
        benchmark,
        fn=fn,
        make_inputs=make_inputs,
        mode="fwd",
        impl=impl,
        family="muon",
        group=f"gram X·Xᵀ {batch}x{k}x{n} bf16",
        shape=f"{batch}x{k}x{n}",
        dtype=torch.bfloat16,
        flops=2 * batch * k * k * n,
    )


# --------------------------------------------------------------------------------------------- full step
def matrix_set(layers: int) -> list[tuple[int, int]]:
    """(out, in) shapes of every hidden matrix of the model Muon updates."""
    h, kv, f = pick((1536, 512, 3840), (256, 128, 640))
    per_layer = [(h, h), (kv, h), (kv, h), (h, h), (f, h), (f, h), (h, f)]
    return per_layer * layers


class BatchedMuon:
    """Plain PyTorch Muon with the matrices grouped by shape: foreach momentum, one batched Newton–Schulz per
    group, foreach weight decay and update.  Same maths as torch.optim.Muon (adjust_lr_fn="original")."""

    def __init__(self, params, lr=LR, weight_decay=WD, momentum=MOMENTUM, dtype=torch.bfloat16):
        self.groups = defaultdict(list)
        for p in params:
            self.groups[tuple(p.shape)].append(p)
        self.bufs = {s: [torch.zeros_like(p) for p in ps] for s, ps in self.groups.items()}
        self.lr, self.wd, self.momentum, self.dtype = lr, weight_decay, momentum, dtype

    @torch.no_grad()
    def step(self):
        for shape, params in self.groups.items():
            grads, bufs = [p.grad for p in params], self.bufs[shape]
            torch._foreach_lerp_(bufs, grads, 1 - self.momentum)
            G = torch.stack(grads).lerp_(torch.stack(bufs), self.momentum)  # Nesterov
            U = ns_eager(G, dtype=self.dtype)
            torch._foreach_mul_(params, 1 - self.lr * self.wd)
            scale = self.lr * math.sqrt(max(1.0, shape[0] / shape[1]))
            torch._foreach_add_(params, list(U.unbind(0)), alpha=-scale)


def _optimizer(impl: str, params):
    if impl == "xkernels":
        optim = import_peer("xkernels.optim", "xkernels.optim")
        muon = require_attr(optim, "Muon", "xkernels.optim.Muon")
        return muon(params, lr=LR, weight_decay=WD, momentum=MOMENTUM, nesterov=True)
    if impl == "torch":
        muon = require_attr(torch.optim, "Muon", "torch.optim.Muon (torch >= 2.9)")
        return muon(params, lr=LR, weight_decay=WD, momentum=MOMENTUM, nesterov=True)
    return BatchedMuon(params, dtype=_ns_dtype())


@pytest.mark.parametrize("impl", ["xkernels", "torch", "eager"])
def test_muon_step(benchmark, impl):
    layers = 2 if benchmark.disabled else pick(48, 6)
    shapes = matrix_set(layers)
    params = [torch.nn.Parameter(randn(o, i, dtype=torch.float32, scale=0.02)) for o, i in shapes]
    opt = _optimizer(impl, params)

    def make_inputs():
        return ([randn(*p.shape, dtype=torch.float32, scale=1e-3) for p in params],), None

    def step(grads):
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()

    model = pick("1.3B", "proxy-256")
    run(
        benchmark,
        fn=step,
        make_inputs=make_inputs,
        mode="call",
        impl=impl,
        family="muon",
        group=f"muon step {model} set ({len(shapes)} matrices, {layers} layers)",
        shape=f"{model}:{layers}L",
        dtype="float32 params",
        flops=sum(ns_flops(1, o, i) for o, i in shapes),
        warmup=1 if not ON_CUDA else None,
        extra={"matrices": len(shapes), "params": sum(o * i for o, i in shapes)},
    )
