"""WSD schedule values at the phase boundaries, and TrainConfig parsing / validation."""

import math

import pytest

from xmodel.training.config import TrainConfig, parse_args, shipped_config
from xmodel.training.schedule import WSDSchedule


# ------------------------------------------------------------------------------------------------ schedule
def test_wsd_exponential_boundaries():
    s = WSDSchedule(warmup=10, decay_start=50, decay=20, min_ratio=1 / 16, shape="exp")
    assert s.factor(0) == pytest.approx(0.1)
    assert s.factor(4) == pytest.approx(0.5)
    assert s.factor(9) == 1.0  # warmup reaches the peak on its last step
    assert s.factor(10) == 1.0 and s.factor(49) == 1.0  # stable
    # Megatron's coefficient 2 * 0.5^(t/T) - 1 with t = step - start + 1
    for step in (50, 55, 60, 69):
        t = step - 50 + 1
        coef = 2 * 0.5 ** (t / 20) - 1
        assert s.factor(step) == pytest.approx(1 / 16 + (1 - 1 / 16) * coef, rel=1e-12)
    assert s.factor(69) == pytest.approx(1 / 16)  # the last decay step is at the floor
    assert s.factor(70) == s.factor(1000) == pytest.approx(1 / 16)
    assert [s.phase(i) for i in (0, 9, 10, 49, 50, 80)] == ["warmup", "warmup", "stable", "stable", "decay", "decay"]


@pytest.mark.parametrize(
    "shape, mid",
    [("linear", 0.5), ("cosine", 0.5), ("sqrt", 1 - math.sqrt(0.5)), ("exp", 2 * 0.5**0.5 - 1)],
)
def test_decay_shapes_midpoint_and_monotone(shape, mid):
    s = WSDSchedule(warmup=0, decay_start=0, decay=10, min_ratio=0.1, shape=shape)
    assert s.factor(4) == pytest.approx(0.1 + 0.9 * mid)  # t/T = 5/10
    values = [s.factor(i) for i in range(12)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert values[0] < 1.0 and values[9] == pytest.approx(0.1)


def test_no_decay_keeps_peak_and_bad_schedules_raise():
    s = WSDSchedule(warmup=2, decay_start=5, decay=0)
    assert [s.factor(i) for i in range(8)] == [0.5, 1, 1, 1, 1, 1, 1, 1]
    with pytest.raises(ValueError, match="shape"):
        WSDSchedule(1, 2, 3, shape="step")
    with pytest.raises(ValueError, match="warmup"):
        WSDSchedule(10, 5, 3)


# ------------------------------------------------------------------------------------------------ config
def test_config_fractions_and_derived_steps():
    cfg = TrainConfig(steps=200, warmup=0.1, decay=0.25)
    assert (cfg.warmup_steps, cfg.decay_start_step, cfg.decay_steps) == (20, 150, 50)
    cfg = TrainConfig(steps=200, warmup=5, decay=40, decay_start=100)
    assert (cfg.warmup_steps, cfg.decay_start_step, cfg.decay_steps) == (5, 100, 40)
    cfg = TrainConfig(steps=200, decay_start=0.5, decay=0.25)
    assert cfg.decay_start_step == 100


def test_parse_args_overrides_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("steps: 40\nlr_embed: 0.02\nmodel:\n  hidden_size: 64\n  num_attention_heads: 2\n")
    cfg = parse_args(["--config", str(path), "--lr-embed", "0.005", "--model.num_hidden_layers", "3",
                      "--compile", "--no-export-hf", "--fp8=delayed", "--fp8-emulate", "--decay", "10"])
    assert cfg.steps == 40 and cfg.lr_embed == 0.005
    assert cfg.model == {"hidden_size": 64, "num_attention_heads": 2, "num_hidden_layers": 3}
    assert cfg.compile is True and cfg.export_hf is False and cfg.fp8 == "delayed" and cfg.fp8_emulate is True
    assert cfg.decay_steps == 10 and isinstance(cfg.decay, int)


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--stepz", "3"], "unknown config key 'stepz'"),
        (["--steps", "0"], "--steps"),
        (["--warmup", "50", "--steps", "60", "--decay", "20"], "--warmup"),
        (["--decay", "1.5"], "--decay"),
        (["--decay-shape", "step"], "--decay-shape"),
        (["--fp8", "e4m3"], "--fp8"),
        (["--fp8-emulate"], "--fp8-emulate"),
        (["--decay-optimizer", "sgd"], "--decay-optimizer"),
        (["--config", "/nonexistent.yaml"], "--config"),
        (["positional"], "unexpected argument"),
        (["--lr"], "needs a value"),
        (["--resume", "/no/such/checkpoint"], "--resume"),
    ],
)
def test_bad_config_raises_naming_the_flag(argv, match):
    with pytest.raises(ValueError, match=match):
        parse_args(argv)


@pytest.mark.parametrize("name", ["paper-stable", "paper-decay", "paper-long-context", "mup-proxy"])
def test_shipped_configs_load(name):
    cfg = parse_args(["--config", name])
    assert shipped_config(name).is_file()
    assert cfg.preset in ("xmodel-2.5", "proxy-256")
    assert cfg.decay_start_step <= cfg.steps


def test_help_lists_every_key(capsys):
    from xmodel.train import main

    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for key in ("--lr-embed", "--decay-optimizer", "--fp8-emulate", "--init-from", "--model.FIELD"):
        assert key in out
