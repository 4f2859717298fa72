"""``python -m xmodel.train --compile``: per-block compilation (xmodel.training.compile) trains through the
AdamW -> Muon switch with its graphs and recompilations counted -- nothing is compiled after the switch -- with and
without emulated FP8; compile_blocks keeps parameter names and numerics."""

import json

import pytest
import torch

import xmodel.train as train_cli
from xmodel.config import XmodelConfig
from xmodel.model import Xmodel
from xmodel.training.compile import RecompileLog, compile_blocks, compile_counters, decoder_blocks, is_compiled

from train_support import _fast_cpu, tiny, tiny_args  # noqa: F401  (fixtures: reference ops, one thread)

# 3 layers: the first sees no pending MLP branch, the other two share one graph -> the count does not grow with depth
ARGS = ["--steps", "8", "--eval-every", "4", "--save-every", "0", "--warmup", "2", "--decay", "4",
        "--model.num_hidden_layers", "3", "--compile"]
# (train, eval) x (first layer, other layers)
MAX_FRAMES = 4


def _run_compiled(tiny_dir, out, monkeypatch, *extra):
    """Run the trainer CLI in-process; returns (records, counters at the switch, counters at the end, recompiles
    before the switch, recompiles after)."""
    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    counters.clear()
    at_switch = {}
    switch = train_cli._switch

    def spy(optimizer, cfg):
        at_switch.update(compile_counters(), recompiles=len(log.reasons))
        return switch(optimizer, cfg)

    monkeypatch.setattr(train_cli, "_switch", spy)
    with RecompileLog() as log:
        assert train_cli.main(tiny_args(tiny_dir, out, "--name", "c", *ARGS, *extra)) == 0
    records = [json.loads(line) for line in (out / "c" / "metrics.jsonl").read_text().splitlines()]
    return records, at_switch, compile_counters(), log.reasons[: at_switch["recompiles"]], \
        log.reasons[at_switch["recompiles"]:]


def _check_run(records, at_switch, end, after):
    assert len([r for r in records if r.get("event") == "switch_to_muon"]) == 1
    phases = {r["step"]: r["phase"] for r in records if r["kind"] == "train"}
    assert phases[2] == "warmup/adamw" and phases[4] == "stable/adamw" and phases[8] == "decay/muon"
    evals = [r["val_loss"] for r in records if r["kind"] == "eval"]
    assert len(evals) == 3 and all(map(lambda v: v == v, evals)) and evals[-1] < evals[0]
    assert 0 < at_switch["frames"] <= MAX_FRAMES, at_switch
    # The switch changes only the optimizer, which is outside every compiled block: nothing compiles after it.
    assert end["frames"] == at_switch["frames"] and end["unique_graphs"] == at_switch["unique_graphs"], (at_switch, end)
    assert after == [], after


def test_compile_trains_through_muon_switch_without_recompiling(tiny, tmp_path, monkeypatch):  # noqa: F811
    """Inductor, as ``--compile`` uses it.  Its CPU backend writes scalar C++ here (no SIMD): half the compile
    time on a cold cache (34 s -> 17 s), and what is checked -- graphs, recompiles, training through the switch --
    does not depend on the vector width of the generated C++ (on a GPU inductor writes Triton)."""
    import torch._inductor.config as inductor_config

    monkeypatch.setattr(inductor_config.cpp, "vec_isa_ok", False)
    records, at_switch, end, before, after = _run_compiled(tiny, tmp_path, monkeypatch)
    _check_run(records, at_switch, end, after)
    assert end["graph_breaks"] == 0, end


def test_compile_with_fp8_emulation_trains_through_muon_switch(tiny, tmp_path, monkeypatch):  # noqa: F811
    """Traced by dynamo + AOTAutograd (``aot_eager``): the emulated FP8 block is thousands of ops, and inductor's
    CPU code generation for it takes minutes; what is checked here is tracing, graph breaks and recompiles."""
    import functools

    import xmodel.training.compile as compile_mod

    monkeypatch.setattr(compile_mod, "compile_blocks", functools.partial(compile_mod.compile_blocks, backend="aot_eager"))
    records, at_switch, end, before, after = _run_compiled(tiny, tmp_path, monkeypatch,
                                                           "--fp8", "delayed", "--fp8-emulate",
                                                           "--model.num_hidden_layers", "2", "--steps", "6",
                                                           "--decay", "2", "--eval-every", "3",
                                                           "--eval-batches", "1")  # time: the switch at step 4
    assert len([r for r in records if r.get("event") == "switch_to_muon"]) == 1
    evals = [r["val_loss"] for r in records if r["kind"] == "eval"]
    assert len(evals) == 3 and evals[-1] < evals[0]
    assert end["frames"] == at_switch["frames"] and end["unique_graphs"] == at_switch["unique_graphs"], (at_switch, end)
    assert after == [], after
    assert end["graph_breaks"] == 0, end


def tiny_model():
    cfg = XmodelConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, mup_base_width=32)
    return Xmodel(cfg)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_compile_blocks_keeps_names_and_numerics(checkpointing):
    """Compiled in place (state-dict keys unchanged), one block graph shared by the layers, same loss and grads."""
    torch.manual_seed(0)
    eager = tiny_model()
    compiled = tiny_model()
    compiled.load_state_dict(eager.state_dict())
    for m in (eager, compiled):
        m.set_activation_checkpointing(checkpointing)
    keys = list(compiled.state_dict())
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compile_blocks(compiled, backend="aot_eager")
    assert is_compiled(compiled) and not is_compiled(eager) and list(compiled.state_dict()) == keys
    assert len(decoder_blocks(compiled)) == 3
    ids = torch.randint(0, 97, (2, 12))
    losses, grads = [], []
    for m in (eager, compiled):
        loss = m(ids, labels=ids.roll(-1, 1)).loss
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad for n, p in m.named_parameters()})
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-6, atol=1e-6)
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-6, msg=name)
    assert compile_counters()["frames"] <= 2  # first layer + the two others sharing a graph


def test_compile_blocks_rejects_other_modules():
    with pytest.raises(TypeError, match="Xmodel"):
        compile_blocks(torch.nn.Linear(2, 2))
