"""Muon / MuonWithAuxAdamW with a tensor learning rate (as torch.optim accepts for compiled or CUDA-graph steps):
the step reads the lr on the device, never on the host, and equals the step with the same float lr."""

from __future__ import annotations

import pytest
import torch

from xkernels.optim import Muon, MuonWithAuxAdamW, muon_param_groups
from xkernels.testing import no_host_sync


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(20, 16)
        self.up = torch.nn.Linear(16, 40, bias=False)  # tall and wide matrices: two lr adjustments
        self.down = torch.nn.Linear(40, 16, bias=False)
        self.norm = torch.nn.LayerNorm(16)


def _build(hybrid: bool, lr, adjust_lr_fn):
    torch.manual_seed(0)
    model = _Tiny()
    kw = dict(compute_dtype=torch.float32, adjust_lr_fn=adjust_lr_fn)
    if hybrid:
        groups = muon_param_groups(model, lr=lr, embed_lr=lr, weight_decay=0.1)
        opt = MuonWithAuxAdamW(groups, **kw)
    else:
        opt = Muon([model.up.weight, model.down.weight], lr=lr, weight_decay=0.1, **kw)
    return model, opt


def _steps(model, opt, n, check_sync=False):
    gen = torch.Generator().manual_seed(1)
    for _ in range(n):
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=gen)
        if check_sync:
            with no_host_sync():
                opt.step()
        else:
            opt.step()


@pytest.mark.parametrize("adjust_lr_fn", ["original", "match_rms_adamw"])
@pytest.mark.parametrize("hybrid", [False, True], ids=["muon", "muon_with_aux_adamw"])
def test_tensor_lr_matches_float_lr_without_host_sync(hybrid, adjust_lr_fn):
    ref_model, ref_opt = _build(hybrid, 0.02, adjust_lr_fn)
    model, opt = _build(hybrid, torch.tensor(0.02), adjust_lr_fn)
    _steps(ref_model, ref_opt, 1)
    _steps(model, opt, 1)  # first step creates the state (allocations, no sync either)
    _steps(ref_model, ref_opt, 2)
    _steps(model, opt, 2, check_sync=True)
    init = _build(hybrid, 0.02, adjust_lr_fn)[0]
    stepped = {id(p) for g in opt.param_groups for p in g["params"]}
    for (name, a), b in zip(ref_model.named_parameters(), model.parameters()):
        torch.testing.assert_close(b, a, rtol=2e-6, atol=1e-7, msg=name)
        if id(b) in stepped:
            assert not torch.equal(b, init.get_parameter(name)), f"{name} never moved"


@pytest.mark.parametrize("hybrid", [False, True], ids=["muon", "muon_with_aux_adamw"])
def test_tensor_lr_is_read_at_each_step(hybrid):
    """The lr tensor is used by value at each step: set to 0 in place, the next step leaves the weights as they are
    (weight decay is γλ, so it stops too)."""
    model, opt = _build(hybrid, torch.tensor(0.02), "original")
    _steps(model, opt, 1)
    for group in opt.param_groups:
        group["lr"].fill_(0.0)
    before = [p.detach().clone() for p in model.parameters()]
    _steps(model, opt, 1)
    for a, b in zip(before, model.parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
