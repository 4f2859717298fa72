"""Every public op as one case (inputs builder + function): consumed by tests/test_compile.py
(torch._dynamo.explain, compiled forward+backward, opcheck), tests/test_no_host_sync.py and the per-op explain
table of benchmarks/bench_train_step.py."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

import xkernels

# small shapes: every case runs through the interpreter in a few ms


@dataclasses.dataclass(frozen=True)
class OpCase:
    """``fn(*build(device))`` runs the op once and returns a scalar tensor (a weighted sum of its outputs, so
    every output's gradient is non-trivial) or None (optimizer steps).  ``backward``: the scalar is
    differentiable.  ``kernels``: Triton kernels that must launch on the kernel path (forward+backward).
    ``build`` gets ``backend`` too (the optimizer cases pick their Newton–Schulz implementation from it)."""

    name: str
    build: Callable[[str, str], tuple]
    fn: Callable[..., torch.Tensor | None]
    kernels: tuple[str, ...]
    backward: bool = True


def _leaf(*shape, device, scale=1.0):
    return (torch.randn(*shape, device=device) * scale).requires_grad_()


def _weights(*shape, device):
    return torch.randn(*shape, device=device)


def _rms_norm(device, backend):
    return _leaf(3, 5, 32, device=device), (torch.rand(32, device=device) + 0.5).requires_grad_(), _weights(3, 5, 32, device=device)


def _add_rms_norm(device, backend):
    x, w, c = _rms_norm(device, backend)
    return x, _leaf(3, 5, 32, device=device), w, c


def _rotary(device, backend):
    cos, sin = xkernels.rotary_cos_sin(16, 16, device=device)
    pos = torch.tensor([[0, 3, 5, 7], [1, 2, 9, 15]], device=device)
    return _leaf(2, 4, 3, 16, device=device), _leaf(2, 4, 1, 16, device=device), cos, sin, pos


def _rotary_hf(device, backend):
    """HF layout (batch, heads, seq, head_dim), per-token (batch, seq, rotary_dim) rows, partial rotary."""
    cos, sin = xkernels.rotary_cos_sin(16, 12, device=device)
    pos = torch.tensor([[0, 3, 5, 7], [1, 2, 9, 15]], device=device)
    return _leaf(2, 3, 4, 20, device=device), _leaf(2, 1, 4, 20, device=device), cos[pos], sin[pos]


def _swiglu(device, backend):
    return _leaf(3, 5, 40, device=device), _leaf(3, 5, 40, device=device), _weights(3, 5, 40, device=device)


def _swiglu_fused(device, backend):
    return _leaf(3, 5, 80, device=device), _weights(3, 5, 40, device=device)


def _layer_norm(device, backend):
    x, w, c = _rms_norm(device, backend)
    return x, w, _leaf(32, device=device), c


def _lce(device, backend):
    t = torch.tensor([3, 0, -100, 49, 7, 21], device=device)
    return _leaf(6, 16, device=device), _leaf(50, 16, device=device, scale=0.25), t


def _lce_options(device, backend):
    h, w, t = _lce(device, backend)
    return h, w, _leaf(50, device=device, scale=0.1), t, torch.rand(50, device=device) + 0.5


def _ce_logits(device, backend):
    t = torch.tensor([3, 0, -100, 49, 7, 21], device=device)
    return _leaf(6, 50, device=device, scale=2.0), t, torch.rand(50, device=device) + 0.5


def _ns(device, backend):
    return (torch.randn(2, 12, 20, device=device),)


class _TinyLM(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(20, 16)
        self.up = torch.nn.Linear(16, 24, bias=False)
        self.down = torch.nn.Linear(24, 16, bias=False)
        self.norm = torch.nn.LayerNorm(16)


def _optimizer(device, backend, hybrid):
    from xkernels.optim import Muon, MuonWithAuxAdamW, muon_param_groups

    torch.manual_seed(0)
    model = _TinyLM().to(device)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    kw = dict(compute_dtype=torch.float32, use_kernels=backend == "triton")
    if hybrid:
        opt = MuonWithAuxAdamW(muon_param_groups(model, lr=0.01, embed_lr=0.02, weight_decay=0.1), **kw)
    else:
        opt = Muon([model.up.weight, model.down.weight], lr=0.02, **kw)
    opt.step()  # the state exists before any traced or checked step (as after a trainer's first step)
    return (opt,)


def _inplace_rotary(q, k, cos, sin, pos):
    q2, k2 = q * 1.0, k * 1.0  # non-leaf copies: in-place rotation is allowed on them
    q_out, k_out = xkernels.apply_rotary(q2, k2, cos, sin, pos, inplace=True)
    return (q_out * q.detach()).sum() + (k_out * k.detach()).sum()


CASES = [
    OpCase("rms_norm", _rms_norm, lambda x, w, c: (xkernels.rms_norm(x, w) * c).sum(),
           ("_rmsnorm_fwd_kernel", "_rmsnorm_bwd_kernel")),
    OpCase("add_rms_norm", _add_rms_norm,
           lambda x, r, w, c: sum((o * c).sum() for o in xkernels.add_rms_norm(x, r, w)),
           ("_rmsnorm_fwd_kernel", "_rmsnorm_bwd_kernel")),
    OpCase("add_rms_norm_scale", _add_rms_norm,
           lambda x, r, w, c: sum((o * c).sum() for o in xkernels.add_rms_norm(x, r, w, 1e-5, scale=0.5)),
           ("_rmsnorm_fwd_kernel", "_rmsnorm_bwd_kernel")),
    OpCase("apply_rotary", _rotary,
           lambda q, k, cos, sin, pos: sum((o * o.detach()).sum() for o in xkernels.apply_rotary(q, k, cos, sin, pos)),
           ("_rotary_kernel",)),
    OpCase("apply_rotary_inplace", _rotary, _inplace_rotary, ("_rotary_kernel",)),
    OpCase("apply_rotary_pos_emb", _rotary_hf,
           lambda q, k, cos, sin: sum((o * o.detach()).sum() for o in xkernels.apply_rotary_pos_emb(q, k, cos, sin)),
           ("_rotary_kernel",)),
    OpCase("swiglu", _swiglu, lambda g, u, c: (xkernels.swiglu(g, u) * c).sum(),
           ("_swiglu_fwd_kernel", "_swiglu_bwd_kernel")),
    OpCase("swiglu_fused", _swiglu_fused, lambda x, c: (xkernels.swiglu_fused(x) * c).sum(),
           ("_swiglu_fwd_kernel", "_swiglu_bwd_kernel")),
    OpCase("rms_norm_gemma_offset", _rms_norm,
           lambda x, w, c: (xkernels.rms_norm(x, w, 1e-5, offset=1.0, casting_mode="gemma") * c).sum(),
           ("_rmsnorm_fwd_kernel", "_rmsnorm_bwd_kernel")),
    OpCase("geglu", _swiglu, lambda g, u, c: (xkernels.geglu(g, u) * c).sum(),
           ("_swiglu_fwd_kernel", "_swiglu_bwd_kernel")),
    OpCase("layer_norm", _layer_norm, lambda x, w, b, c: (xkernels.layer_norm(x, w, b) * c).sum(),
           ("_layernorm_fwd_kernel", "_layernorm_bwd_kernel")),
    OpCase("linear_cross_entropy", _lce, lambda h, w, t: xkernels.linear_cross_entropy(h, w, t, z_loss=1e-3),
           ("_ce_chunk_kernel",)),
    OpCase("linear_cross_entropy_options", _lce_options,
           lambda h, w, b, t, cw: xkernels.linear_cross_entropy(h, w, t, bias=b, ce_weight=cw, label_smoothing=0.1,
                                                               softcap=5.0, lse_square_scale=1e-3),
           ("_ce_chunk_kernel",)),
    OpCase("cross_entropy", _ce_logits,
           lambda x, t, cw: xkernels.cross_entropy(x, t, weight=cw, label_smoothing=0.1, softcap=5.0,
                                                   lse_square_scale=1e-3),
           ("_ce_chunk_kernel",)),
    OpCase("newton_schulz", _ns, lambda g: xkernels.newton_schulz(g, 2, dtype=torch.float32).sum(),
           ("_ns_gram_kernel", "_ns_update_kernel"), backward=False),
    OpCase("muon_step", lambda d, b: _optimizer(d, b, hybrid=False), lambda opt: opt.step(),
           ("_ns_gram_kernel", "_ns_update_kernel"), backward=False),
    OpCase("muon_with_aux_adamw_step", lambda d, b: _optimizer(d, b, hybrid=True), lambda opt: opt.step(),
           ("_ns_gram_kernel", "_ns_update_kernel"), backward=False),
]  # fmt: skip
CASE_IDS = [c.name for c in CASES]
