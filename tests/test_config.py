"""XmodelConfig: presets, exact parameter counts, config.json round trip, validation."""

import json
import math

import pytest
import torch

from xmodel.config import PRESETS, XmodelConfig


def _count_by_hand(cfg: XmodelConfig) -> int:
    h, f, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    layer = h * (cfg.num_attention_heads * d) * 2 + h * (cfg.num_key_value_heads * d) * 2 + 3 * h * f + 2 * h
    return cfg.vocab_size * h * (1 if cfg.tie_word_embeddings else 2) + cfg.num_hidden_layers * layer + h


def test_release_preset_matches_recipe():
    cfg = XmodelConfig.from_preset("xmodel-2.5")
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == (48, 1536, 3840)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (24, 8, 64)
    assert (cfg.vocab_size, cfg.rope_theta, cfg.rms_norm_eps, cfg.max_position_embeddings) == (129280, 5e5, 1e-5, 131072)
    assert cfg.mup_width_multiplier == 6.0
    assert cfg.embedding_multiplier == 12.0
    assert cfg.attention_residual_multiplier == pytest.approx(1.4 / math.sqrt(48))
    assert cfg.ffn_residual_multiplier == pytest.approx(0.20207, abs=1e-5)
    assert cfg.logit_multiplier == pytest.approx(1 / 6)
    assert cfg.attention_softmax_scale == 1 / 64


def test_release_parameter_count_exact():
    cfg = XmodelConfig.from_preset("xmodel-2.5")
    assert cfg.num_parameters() == 1_350_059_520
    assert cfg.num_parameters() - cfg.num_parameters(non_embedding=True) == 129280 * 1536 == 198_574_080
    untied = cfg.replace(tie_word_embeddings=False)
    assert untied.num_parameters() == 1_350_059_520 + 198_574_080


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_counts_match_formula(name):
    cfg = XmodelConfig.from_preset(name)
    assert cfg.num_parameters() == _count_by_hand(cfg)
    assert cfg.head_dim == 64


def test_release_family_shapes_and_cpu_default():
    shapes = {n: (c["num_hidden_layers"], c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"],
                  c["intermediate_size"]) for n, c in PRESETS.items()}
    assert shapes["nano"] == (8, 256, 4, 1, 640)
    assert shapes["micro"] == (12, 384, 6, 1, 960)
    assert shapes["tiny"] == (18, 512, 8, 4, 1280)
    assert shapes["small"] == (30, 576, 9, 3, 1440)
    assert shapes["medium"] == (32, 960, 15, 5, 2400)
    cpu = XmodelConfig.from_preset("cpu-default")
    assert (cpu.hidden_size, cpu.num_hidden_layers, cpu.vocab_size, cpu.max_position_embeddings) == (256, 4, 4096, 2048)
    assert cpu.use_mup and cpu.mup_width_multiplier == 1.0
    assert XmodelConfig.from_preset("proxy-256").hidden_size == 256


def test_flops_per_token_formula():
    cfg = XmodelConfig.from_preset("nano", vocab_size=1000)
    n_linear = 8 * (256 * 256 * 2 + 256 * 64 * 2 + 3 * 256 * 640)
    assert cfg.flops_per_token(128) == 6 * (n_linear + 1000 * 256) + 12 * 8 * 256 * 128
    with pytest.raises(ValueError, match="seq_len"):
        cfg.flops_per_token(0)


def test_mup_off_multipliers_are_one():
    cfg = XmodelConfig.from_preset("nano", use_mup=False)
    assert cfg.embedding_multiplier == cfg.attention_residual_multiplier == cfg.logit_multiplier == 1.0
    assert cfg.attention_softmax_scale == 1 / 8


def test_json_round_trip(tmp_path):
    cfg = XmodelConfig.from_preset("tiny", vocab_size=777, use_mup=False, eos_token_id=[1, 5])
    cfg.save_json(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    assert raw["model_type"] == "xmodel" and raw["architectures"] == ["XmodelForCausalLM"]
    assert raw["mup_width_multiplier"] == 2.0
    back = XmodelConfig.from_json(tmp_path / "config.json")
    assert back == cfg and back.eos_token_ids == [1, 5]


def test_released_style_json_loads_and_warns_on_unknown(tmp_path):
    raw = XmodelConfig().to_dict()
    raw.update(pretraining_tp=1, attention_dropout=0.0, torch_dtype="bfloat16", transformers_version="4.46.0",
               some_future_field=3)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.warns(UserWarning, match="some_future_field"):
        cfg = XmodelConfig.from_json(tmp_path)
    assert cfg.num_parameters() == 1_350_059_520
    assert cfg.to_dict()["some_future_field"] == 3  # kept and written back


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(hidden_size=100, num_attention_heads=3), "divisible by num_attention_heads"),
        (dict(num_key_value_heads=3), "divisible by num_key_value_heads"),
        (dict(hidden_act="gelu"), "hidden_act"),
        (dict(vocab_size=0), "vocab_size"),
        (dict(attention_bias=True), "bias"),
        (dict(rope_scaling={"type": "linear", "factor": 2.0}), "rope_scaling"),
    ],
)
def test_invalid_configs(overrides, match):
    with pytest.raises(ValueError, match=match):
        XmodelConfig.from_preset("nano", **overrides)


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset"):
        XmodelConfig.from_preset("gigantic")


def test_meta_device_count_of_release_preset():
    from xmodel.model import Xmodel

    with torch.device("meta"):
        model = Xmodel(XmodelConfig.from_preset("xmodel-2.5"))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert sum(p.numel() for p in model.parameters()) == 1_350_059_520
    assert model.num_parameters() == 1_350_059_520


def test_parameter_table_lists_every_preset():
    from xmodel.config import parameter_table

    table = parameter_table(seq_len=2048).splitlines()
    assert len(table) == 1 + len(PRESETS)
    assert any(line.startswith("xmodel-2.5") and "1,350,059,520" in line for line in table)
