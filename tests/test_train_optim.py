"""μP parameter groups and learning rates, and the AdamW -> Muon switch (exactly the hidden matrices move)."""

import pytest
import torch
from train_support import _fast_cpu  # noqa: F401  (autouse fixture: reference ops, one thread)

from xmodel.config import XmodelConfig
from xmodel.model import Xmodel
from xmodel.training.optim import TrainOptimizer, build_adamw, split_parameters


@pytest.fixture
def model():
    cfg = XmodelConfig.from_preset("cpu-default", hidden_size=64, num_hidden_layers=2, intermediate_size=160,
                                   num_attention_heads=2, num_key_value_heads=1, vocab_size=128)
    return Xmodel(cfg)


def step(model, opt):
    x = torch.randint(0, 128, (2, 17))
    model(x[:, :-1], labels=x[:, 1:]).loss.backward()
    opt.step()
    opt.zero_grad()


def test_mup_groups_lrs_and_weight_decay(model):
    groups = split_parameters(model)
    assert [n for n, _ in groups["embed"]] == ["model.embed_tokens.weight"]  # tied head counted once
    assert groups["embed"][0][1] is model.lm_head.weight
    assert len(groups["matrix"]) == 14 and all(p.dim() == 2 for _, p in groups["matrix"])
    assert {n.rsplit(".", 2)[-2] for n, _ in groups["matrix"]} == {"q_proj", "k_proj", "v_proj", "o_proj",
                                                                    "gate_proj", "up_proj", "down_proj"}
    assert len(groups["norm"]) == 5 and all("norm" in n for n, _ in groups["norm"])
    total = sum(len(g) for g in groups.values())
    assert total == len(list(model.parameters()))
    opt = build_adamw(model, lr=0.01 / 6, lr_embed=0.01)
    by = {g["name"]: g for g in opt.param_groups}
    assert by["embed"]["lr"] == 0.01 and by["embed"]["weight_decay"] == 0.1
    assert by["matrix"]["lr"] == pytest.approx(0.01 / 6) and by["matrix"]["weight_decay"] == 0.1
    assert by["norm"]["lr"] == pytest.approx(0.01 / 6) and by["norm"]["weight_decay"] == 0.0
    assert opt.defaults["betas"] == (0.9, 0.95) and opt.defaults["eps"] == 1e-8
    train = TrainOptimizer(opt, model)
    train.set_lr(0.5)
    assert train.lr_of("embed") == 0.005 and train.lr_of("matrix") == pytest.approx(0.01 / 12)


def test_switch_moves_exactly_the_hidden_matrices(model):
    opt = TrainOptimizer(build_adamw(model, lr=1e-3, lr_embed=1e-2), model)
    step(model, opt)
    embed = model.model.embed_tokens.weight
    before = {k: v.clone() for k, v in opt.opt.state[embed].items()}
    assert opt.phase == "adamw"
    moved = opt.switch_to_muon(momentum=0.95, nesterov=True, ns_steps=5, adjust_lr="match_rms_adamw")
    assert moved == 14 and opt.phase == "muon"
    assert opt.opt.compute_dtype is None  # the default: Newton-Schulz in bf16 (fp32 on CPUs without native bf16)
    muon = [g for g in opt.param_groups if g["use_muon"]]
    aux = [g for g in opt.param_groups if not g["use_muon"]]
    muon_ids = {id(p) for g in muon for p in g["params"]}
    expected = {id(p) for _, p in split_parameters(model)["matrix"]}
    assert muon_ids == expected
    assert {g["role"] for g in aux} == {"embed", "norm"}
    assert all(g["momentum"] == 0.95 and g["nesterov"] and g["ns_steps"] == 5
               and g["adjust_lr_fn"] == "match_rms_adamw" and g["weight_decay"] == 0.1 for g in muon)
    # the embedding keeps its AdamW moments; lrs keep following the schedule's peaks
    for k, v in before.items():
        torch.testing.assert_close(opt.opt.state[embed][k], v)
    opt.set_lr(1.0)
    assert opt.lr_of("matrix") == 1e-3 and opt.lr_of("embed") == 1e-2
    step(model, opt)
    assert all("momentum_buffer" in opt.opt.state[p] for g in muon for p in g["params"])
    with pytest.raises(RuntimeError, match="already"):
        opt.switch_to_muon()


def test_state_dict_round_trip_in_muon_phase(model):
    opt = TrainOptimizer(build_adamw(model, lr=1e-3, lr_embed=1e-2), model)
    step(model, opt)
    opt.switch_to_muon()
    step(model, opt)
    state = opt.state_dict()
    assert state["phase"] == "muon"
    fresh = TrainOptimizer(build_adamw(model, lr=1e-3, lr_embed=1e-2), model)
    with pytest.raises(ValueError, match="phase"):
        fresh.load_state_dict(state)
    fresh.switch_to_muon()
    fresh.load_state_dict(state)
    p = model.model.layers[0].mlp.down_proj.weight
    torch.testing.assert_close(fresh.opt.state[p]["momentum_buffer"], opt.opt.state[p]["momentum_buffer"])


def test_switch_passes_the_newton_schulz_dtype(model):
    """``--muon-dtype fp32`` reaches the Muon optimizer (the distributed-equivalence test relies on it)."""
    opt = TrainOptimizer(build_adamw(model, lr=1e-3, lr_embed=1e-2), model)
    opt.switch_to_muon(compute_dtype=torch.float32)
    assert opt.opt.compute_dtype == torch.float32
