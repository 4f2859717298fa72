"""HF checkpoints: bit-exact round trips, sharding, the released layout, and the error listing."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import xkernels
from xmodel.checkpoint import INDEX_NAME, WEIGHTS_NAME, load_state_dict, parse_size
from xmodel.config import XmodelConfig
from xmodel.model import Xmodel


@pytest.fixture(autouse=True)
def _torch_ops():
    """Checkpoint I/O does not depend on the kernel backend; skip the slow Triton interpreter."""
    with xkernels.force_backend("torch"):
        yield


def tiny_config(**overrides) -> XmodelConfig:
    base = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256, mup_base_width=32)
    return XmodelConfig(**{**base, **overrides})


def assert_same_weights(a: Xmodel, b: Xmodel) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert sa[name].dtype == sb[name].dtype and torch.equal(sa[name], sb[name]), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_bit_exact(tmp_path, dtype):
    model = Xmodel(tiny_config()).to(dtype)
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "generation_config.json", WEIGHTS_NAME]
    with safe_open(str(tmp_path / WEIGHTS_NAME), framework="pt") as f:
        assert "lm_head.weight" not in f.keys()  # tied: the embedding is the head
        assert f.metadata() == {"format": "pt"}
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == str(dtype).removeprefix("torch.")
    loaded = Xmodel.from_pretrained(tmp_path)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert loaded.config == model.config
    assert_same_weights(model, loaded)
    ids = torch.randint(0, 97, (2, 6))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_save_in_other_dtype_and_load_as(tmp_path):
    model = Xmodel(tiny_config())
    model.save_pretrained(tmp_path, dtype=torch.bfloat16)
    assert load_state_dict(tmp_path)["model.norm.weight"].dtype == torch.bfloat16
    loaded = Xmodel.from_pretrained(tmp_path, dtype=torch.float32)
    w = model.model.layers[1].mlp.up_proj.weight
    assert torch.equal(loaded.model.layers[1].mlp.up_proj.weight, w.to(torch.bfloat16).float())


def test_sharded_round_trip(tmp_path):
    model = Xmodel(tiny_config(tie_word_embeddings=False))
    model.save_pretrained(tmp_path / "single")
    model.save_pretrained(tmp_path, max_shard_size="40kB")  # ~25 KB per 64x96 fp32 matrix -> many shards
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 3 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert sorted(index["weight_map"]) == sorted(model.state_dict())  # untied: lm_head.weight is saved
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in model.state_dict().values())
    for f in files:
        assert (tmp_path / f).stat().st_size < 40_000 + 2_000
    assert not (tmp_path / WEIGHTS_NAME).exists()
    assert_same_weights(model, Xmodel.from_pretrained(tmp_path))
    # Saving again unsharded removes the old shards and index.
    model.save_pretrained(tmp_path)
    assert not (tmp_path / INDEX_NAME).exists() and not list(tmp_path.glob("model-0*"))


def test_released_layout_loads(tmp_path):
    """A checkpoint as the release ships it: bf16, lm_head.weight present (equal to the embedding), rotary
    inv_freq buffers, HF config keys this implementation does not use."""
    cfg = tiny_config()
    model = Xmodel(cfg)
    state = {k: v.to(torch.bfloat16).clone() for k, v in model.state_dict().items()}
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    first = {k: v for k, v in state.items() if ".layers.1." not in k}
    second = {k: v for k, v in state.items() if ".layers.1." in k}
    save_file(first, str(tmp_path / "model-00001-of-00002.safetensors"), metadata={"format": "pt"})
    save_file(second, str(tmp_path / "model-00002-of-00002.safetensors"), metadata={"format": "pt"})
    weight_map = {k: "model-00001-of-00002.safetensors" for k in first}
    weight_map.update({k: "model-00002-of-00002.safetensors" for k in second})
    (tmp_path / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": 1}, "weight_map": weight_map}))
    raw = {f.name: getattr(cfg, f.name) for f in cfg.__dataclass_fields__.values() if f.name != "extra"}
    raw.update(model_type="xmodel", architectures=["XmodelForCausalLM"], torch_dtype="bfloat16", pretraining_tp=1,
               attention_dropout=0.0, use_cache=True, mup_width_multiplier=2.0, transformers_version="4.46.3",
               auto_map={"AutoConfig": "configuration_xmodel2.XmodelConfig"})
    (tmp_path / "config.json").write_text(json.dumps(raw))
    loaded = Xmodel.from_pretrained(tmp_path)
    assert loaded.model.embed_tokens.weight.dtype == torch.bfloat16
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, state[name]), name


def _write(tmp_path, state, cfg):
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / WEIGHTS_NAME))
    cfg.save_json(tmp_path)


def test_mismatch_error_lists_every_problem(tmp_path):
    cfg = tiny_config()
    state = dict(Xmodel(cfg).state_dict())
    del state["lm_head.weight"]
    del state["model.layers.1.mlp.up_proj.weight"]
    del state["model.norm.weight"]
    state["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(5, 64)
    state["model.layers.2.mlp.up_proj.weight"] = torch.zeros(3)
    _write(tmp_path, state, cfg)
    with pytest.raises(ValueError) as err:
        Xmodel.from_pretrained(tmp_path)
    text = str(err.value)
    assert "missing (2): model.layers.1.mlp.up_proj.weight, model.norm.weight" in text
    assert "unexpected (1): model.layers.2.mlp.up_proj.weight" in text
    assert "mis-shaped (1): model.layers.0.self_attn.k_proj.weight (got (5, 64), expected (32, 64))" in text


def test_tied_head_must_equal_embedding(tmp_path):
    cfg = tiny_config()
    state = dict(Xmodel(cfg).state_dict())
    state["lm_head.weight"] = torch.randn(97, 64)
    _write(tmp_path, state, cfg)
    with pytest.raises(ValueError, match="tie_word_embeddings"):
        Xmodel.from_pretrained(tmp_path)


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        Xmodel.from_pretrained(tmp_path)
    tiny_config().save_json(tmp_path)
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        Xmodel.from_pretrained(tmp_path)


def test_tokenizer_files_are_copied_and_remembered(tmp_path):
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    (tok_dir / "tokenizer.json").write_text('{"fake": true}')
    (tok_dir / "tokenizer_config.json").write_text("{}")
    model = Xmodel(tiny_config())
    model.save_pretrained(tmp_path / "a", tokenizer_dir=tok_dir)
    assert (tmp_path / "a" / "tokenizer.json").read_text() == '{"fake": true}'
    loaded = Xmodel.from_pretrained(tmp_path / "a")
    loaded.save_pretrained(tmp_path / "b")  # tokenizer comes along from where the model was loaded
    assert (tmp_path / "b" / "tokenizer_config.json").exists()
    gen = json.loads((tmp_path / "b" / "generation_config.json").read_text())
    assert gen == {"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": None}


def test_weight_names_are_the_model_state_dict():
    from xmodel.checkpoint import weight_names

    for tied in (True, False):
        cfg = tiny_config(tie_word_embeddings=tied)
        names = set(Xmodel(cfg).state_dict()) - ({"lm_head.weight"} if tied else set())
        assert weight_names(cfg) == sorted(names, key=weight_names(cfg).index) and set(weight_names(cfg)) == names


def test_extra_module_state_is_not_saved(tmp_path):
    """Swapped-in modules (FP8 linears) may carry buffers; only the released tensors are written."""
    model = Xmodel(tiny_config())
    model.model.layers[0].self_attn.q_proj.register_buffer("amax_history", torch.zeros(4))
    model.save_pretrained(tmp_path)
    assert "model.layers.0.self_attn.q_proj.amax_history" not in load_state_dict(tmp_path)
    Xmodel.from_pretrained(tmp_path)


def test_parse_size():
    assert parse_size("2GB") == 2_000_000_000
    assert parse_size("500MiB") == 500 * 2**20
    assert parse_size(1234) == 1234
    with pytest.raises(ValueError, match="max_shard_size"):
        parse_size("lots")


def _granite(cfg: XmodelConfig):
    """HF Granite computes the Xmodel forward when both residual scales are equal: embeddings x
    embedding_multiplier, each branch x residual_multiplier, softmax scale attention_multiplier, logits /
    logits_scaling, Llama RMSNorm / RoPE / SwiGLU / GQA."""
    transformers = pytest.importorskip("transformers")
    kwargs = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, hidden_act="silu", rms_norm_eps=cfg.rms_norm_eps,
        max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=cfg.tie_word_embeddings,
        embedding_multiplier=cfg.embedding_multiplier, residual_multiplier=cfg.attention_residual_multiplier,
        attention_multiplier=cfg.attention_softmax_scale, logits_scaling=1.0 / cfg.logit_multiplier,
    )
    params = __import__("inspect").signature(transformers.GraniteConfig.__init__).parameters
    if "rope_parameters" in params:
        kwargs["rope_parameters"] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    else:
        kwargs["rope_theta"] = cfg.rope_theta
    hf_config = transformers.GraniteConfig(**kwargs)
    hf_config._attn_implementation = "eager"
    return transformers.GraniteForCausalLM(hf_config).eval()


@pytest.mark.slow
@pytest.mark.parametrize("use_mup", [True, False])
def test_saved_checkpoint_runs_identically_in_hf_granite(tmp_path, use_mup):
    """An independent implementation (transformers) reading our safetensors gives our logits."""
    cfg = tiny_config(use_mup=use_mup, mup_input_scale=3.0, mup_output_scale=2.5,
                      mup_attention_residual_scale=1.7, mup_ffn_residual_scale=1.7, rope_theta=10000.0)
    model = Xmodel(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
    model.save_pretrained(tmp_path)
    hf = _granite(cfg)
    state = load_state_dict(tmp_path)
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    ids = torch.randint(0, cfg.vocab_size, (2, 11))
    with torch.no_grad():
        want = hf(ids).logits.float()
        got = model(ids).logits
    assert ((got - want).abs().max() / want.abs().max()).item() < 1e-5
