"""xkernels.patch on tiny randomly initialised Hugging Face models: logits, loss and every gradient match
the unpatched twin (fp32), and each patched op really runs."""

import copy
import functools
import importlib

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers", reason="transformers (the 'hf' extra) is not installed")

import xkernels  # noqa: E402
from xkernels import patching  # noqa: E402

TINY = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    max_position_embeddings=64,
)
ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {}),
    # non-default multipliers so the patched loss must apply 1 / logits_scaling
    "granite": (
        "GraniteConfig",
        "GraniteForCausalLM",
        {"logits_scaling": 4.0, "embedding_multiplier": 3.0, "residual_multiplier": 0.5, "attention_multiplier": 0.2},
    ),
    # Gemma: x_hat * (1 + w) norms, tanh-GELU MLPs, head_dim set explicitly (its default is 256)
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {"head_dim": 16}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 16, "query_pre_attn_scalar": 16}),  # softcap 30
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"head_dim": 16, "query_pre_attn_scalar": 16}),
    # Phi-3: fused gate_up_proj, partial rotary (half of each head rotates)
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"partial_rotary_factor": 0.5, "pad_token_id": 0, "bos_token_id": 1,
                                               "eos_token_id": 2}),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}),
}
ALL_OPS = {"rms_norm", "rotary", "swiglu", "cross_entropy"}
GEMMA_OPS = {"rms_norm", "rotary", "geglu", "cross_entropy"}  # x_hat * (1 + w) norms, tanh-GELU MLPs
PATCHED = {"gemma": GEMMA_OPS, "gemma2": GEMMA_OPS, "gemma3_text": GEMMA_OPS}  # the others: ALL_OPS


def _tiny(arch: str, **overrides) -> nn.Module:
    config_name, model_name, extra = ARCHS[arch]
    config = getattr(transformers, config_name)(**{**TINY, **extra, **overrides})
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = getattr(transformers, model_name)(config).float()
    with torch.no_grad():  # HF inits norms to ones: perturb them so the norm weight gradient matters
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.train()


def _batch(batch=2, seq=11, vocab=128):
    ids = torch.randint(0, vocab, (batch, seq))
    labels = ids.clone()
    labels[0, :4] = -100  # a prompt that is not trained on
    return ids, labels


@pytest.fixture
def spies(monkeypatch):
    """Count calls of the ops the patched model should route through."""
    counts = {"rms_norm": 0, "rotary": 0, "swiglu": 0, "cross_entropy": 0}

    def spy(module, name, key):
        original = getattr(module, name)

        @functools.wraps(original)  # keeps the signature patch() inspects for optional keywords
        def wrapper(*args, **kwargs):
            counts[key] += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(module, name, wrapper)

    spy(importlib.import_module("xkernels.rmsnorm"), "rms_norm", "rms_norm")
    spy(patching, "_xkernels_rotary", "rotary")
    spy(importlib.import_module("xkernels.swiglu"), "swiglu", "swiglu")
    spy(importlib.import_module("xkernels.swiglu"), "swiglu_fused", "swiglu")
    spy(importlib.import_module("xkernels.swiglu"), "geglu", "swiglu")  # (the MLP kernels share one counter)
    spy(importlib.import_module("xkernels.cross_entropy"), "linear_cross_entropy", "cross_entropy")
    return counts


@pytest.fixture(autouse=True)
def _torch_backend():
    """The patching wiring is checked on the PyTorch references (the kernels have their own parity tests and
    are slow under the interpreter); the first parity case re-enables the kernels (interpreted on CPU)."""
    with xkernels.force_backend("torch"):
        yield


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(
    "arch, backend",
    [("llama", "auto"), ("llama", "torch"), ("qwen2", "torch"), ("qwen3", "torch"), ("mistral", "torch"), ("granite", "torch"),
     ("gemma", "torch"), ("gemma2", "torch"), ("gemma3_text", "torch"), ("phi3", "auto"), ("phi3", "torch"),
     ("olmo2", "torch")],
)  # fmt: skip
def test_patched_model_matches_original(arch, backend, spies):
    with xkernels.force_backend(backend):
        _check_parity(arch, spies)


def _check_parity(arch, spies):
    ref = _tiny(arch)
    model = copy.deepcopy(ref)
    report = xkernels.patch(model)
    expected = PATCHED.get(arch, ALL_OPS)
    assert set(report.patched) == expected, str(report)
    assert set(report.skipped) >= (ALL_OPS | GEMMA_OPS) - expected, str(report)
    if "rms_norm" in expected:
        assert not any(type(m).__name__.endswith("RMSNorm") and type(m) is not xkernels.RMSNorm for m in model.modules())

    ids, labels = _batch()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, atol=2e-5, rtol=1e-5)
    assert (spies["rms_norm"] > 0) == ("rms_norm" in expected) and spies["rotary"] == 2
    assert spies["swiglu"] == 2  # SwiGLU or GeGLU, one per layer

    out, out_ref = model(ids, labels=labels), ref(ids, labels=labels)
    assert (out.logits is None) == ("cross_entropy" in expected)  # training + labels: logits never formed
    assert spies["cross_entropy"] == ("cross_entropy" in expected)
    torch.testing.assert_close(out.loss, out_ref.loss, atol=1e-5, rtol=1e-5)
    out.loss.backward()
    out_ref.loss.backward()
    grads, grads_ref = _grads(model), _grads(ref)
    assert grads.keys() == grads_ref.keys() and len(grads) == len(list(ref.parameters()))
    for name in grads_ref:
        torch.testing.assert_close(grads[name], grads_ref[name], atol=2e-6, rtol=2e-4, msg=name)


def test_family_reports_and_skips_say_why(monkeypatch):
    """What each family's report says; an op the build lacks is skipped with the reason, never patched wrongly."""
    gemma2, phi3 = xkernels.patch(_tiny("gemma2")), xkernels.patch(_tiny("phi3"))
    assert "RMSNorm(offset=1.0, casting_mode='gemma')" in gemma2.patched["rms_norm"]
    assert "softcap=30" in gemma2.patched["cross_entropy"] and "xkernels.geglu" in gemma2.patched["geglu"]
    assert "SwiGLU needs silu" in gemma2.skipped["swiglu"]
    assert "partial rotary" in phi3.patched["rotary"] and "swiglu_fused" in phi3.patched["swiglu"]
    assert "the tanh GELU" in phi3.skipped["geglu"]
    assert "casting_mode='gemma'" in xkernels.patch(_tiny("olmo2")).patched["rms_norm"]  # w * x_hat in fp32, one cast

    monkeypatch.setattr(patching, "_accepts", lambda fn, name: False)  # a build without those keywords
    monkeypatch.delattr(importlib.import_module("xkernels.swiglu"), "geglu")
    model = _tiny("gemma2")
    report = xkernels.patch(model)
    assert "needs xkernels.RMSNorm(offset=1, casting_mode='gemma')" in report.skipped["rms_norm"]
    assert "needs xkernels.geglu" in report.skipped["geglu"]
    assert "final_logit_softcapping=30" in report.skipped["cross_entropy"]
    assert set(report.patched) == {"rotary"} and type(model.model.norm).__name__ == "Gemma2RMSNorm"


def test_bf16_model_close_to_original():
    """bf16: our ops round once where HF rounds twice (silu, rotary), so compare loosely by norms."""
    ref = _tiny("qwen3").to(torch.bfloat16)
    model = copy.deepcopy(ref)
    xkernels.patch(model)
    ids, labels = _batch()
    with torch.no_grad():
        logits, logits_ref = model(ids).logits.float(), ref(ids).logits.float()
    assert logits.dtype == torch.float32 and (logits - logits_ref).norm() / logits_ref.norm() < 2e-2
    loss, loss_ref = model(ids, labels=labels).loss, ref(ids, labels=labels).loss
    torch.testing.assert_close(loss.float(), loss_ref.float(), atol=3e-2, rtol=1e-2)
    loss.backward()
    loss_ref.backward()
    grads, grads_ref = _grads(model), _grads(ref)
    for name, g_ref in grads_ref.items():
        assert grads[name].dtype == torch.bfloat16
        rel = (grads[name].float() - g_ref.float()).norm() / g_ref.float().norm()
        assert rel < 4e-2, f"{name}: relative gradient difference {rel:.3g}"


def test_num_items_in_batch_shift_labels_and_batched_positions():
    """HF's ``sum / num_items_in_batch`` reduction, explicit ``shift_labels`` and per-sample position_ids
    (cos/sin with a batch dim: the rotary table is gathered per token)."""
    ref = _tiny("llama")
    model = copy.deepcopy(ref)
    xkernels.patch(model)
    ids, labels = _batch(batch=3, seq=8)
    pos = torch.stack([torch.arange(8), torch.arange(8) + 5, torch.arange(8) + 2])
    n_items = torch.tensor(13)
    kw = dict(position_ids=pos, labels=labels, num_items_in_batch=n_items)
    loss, loss_ref = model(ids, **kw).loss, ref(ids, **kw).loss
    torch.testing.assert_close(loss, loss_ref, atol=1e-5, rtol=1e-5)
    loss.backward()
    loss_ref.backward()
    torch.testing.assert_close(_grads(model), _grads(ref), atol=2e-6, rtol=2e-4)

    shift = torch.randint(0, 128, (3, 8))
    shift[:, -1] = -100
    a, b = model(ids, labels=labels, shift_labels=shift).loss, ref(ids, labels=labels, shift_labels=shift).loss
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_lm_head_with_bias(spies):
    """A head with a bias (HF heads are bias-free, converted or fine-tuned checkpoints may not be): the fused loss
    adds it, and its gradient equals the unfused one."""
    ref = _tiny("llama")
    ref.lm_head = nn.Linear(ref.config.hidden_size, ref.config.vocab_size, bias=True)
    nn.init.normal_(ref.lm_head.bias, std=0.5)
    model = copy.deepcopy(ref)
    report = xkernels.patch(model)
    assert "cross_entropy" in report.patched, str(report)
    ids, labels = _batch()
    out, out_ref = model(ids, labels=labels), ref(ids, labels=labels)
    assert out.logits is None and spies["cross_entropy"] == 1
    torch.testing.assert_close(out.loss, out_ref.loss, atol=1e-5, rtol=1e-5)
    out.loss.backward()
    out_ref.loss.backward()
    torch.testing.assert_close(model.lm_head.bias.grad, ref.lm_head.bias.grad, atol=2e-6, rtol=2e-4)
    torch.testing.assert_close(_grads(model), _grads(ref), atol=2e-6, rtol=2e-4)


def test_eval_mode_returns_logits_and_hf_loss(spies):
    model = _tiny("qwen2")
    xkernels.patch(model)
    model.eval()
    ids, labels = _batch()
    out = model(ids, labels=labels)
    assert out.logits is not None and out.logits.shape == (2, 11, 128) and torch.isfinite(out.loss)
    assert spies["cross_entropy"] == 0


def test_all_ignored_labels_give_zero_loss():
    model = _tiny("llama")
    xkernels.patch(model)
    ids, _ = _batch()
    loss = model(ids, labels=torch.full_like(ids, -100)).loss
    loss.backward()
    assert loss.item() == 0.0
    assert all(torch.count_nonzero(p.grad) == 0 for p in model.parameters() if p.grad is not None)


def test_gradient_checkpointing(spies):
    ref = _tiny("mistral")
    model = copy.deepcopy(ref)
    xkernels.patch(model)
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    ids, labels = _batch()
    model(ids, labels=labels).loss.backward()
    ref(ids, labels=labels).loss.backward()
    assert spies["rotary"] == 4  # two layers, each run again in the backward
    torch.testing.assert_close(_grads(model), _grads(ref), atol=2e-6, rtol=2e-4)


def test_rotary_patch_is_per_model(spies):
    """The module-global rotary dispatcher routes only patched models' attention to xkernels."""
    patched, plain = _tiny("llama"), _tiny("llama")
    xkernels.patch(patched)
    ids, _ = _batch()
    with torch.no_grad():
        plain(ids)
    assert spies["rotary"] == 0
    with torch.no_grad():
        patched(ids)
    assert spies["rotary"] == 2


def test_selective_and_idempotent_patching():
    model = _tiny("qwen3")
    report = xkernels.patch(model, rotary=False, cross_entropy=False)
    assert "rotary" in report.skipped and "cross_entropy" in report.skipped
    assert "9 Qwen3RMSNorm" in report.patched["rms_norm"]  # per layer: 2 + q_norm + k_norm; + the final norm
    weights = [id(p) for p in model.parameters()]
    again = xkernels.patch(model)
    assert "rms_norm" in again.skipped  # nothing left to replace
    assert [id(p) for p in model.parameters()] == weights  # parameters untouched (optimizer state survives)
    assert "cross_entropy" in again.patched and "already" not in again.patched["cross_entropy"]
    assert "already patched" in xkernels.patch(model).patched["cross_entropy"]
    assert "rms_norm" in str(again)


def test_non_silu_activation_skips_swiglu():
    model = _tiny("llama", hidden_act="gelu")
    report = xkernels.patch(model)
    assert "swiglu" in report.skipped and "silu" in report.skipped["swiglu"]


def test_backbone_without_head_skips_loss():
    model = transformers.LlamaModel(transformers.LlamaConfig(**TINY))
    report = xkernels.patch(model)
    assert "cross_entropy" in report.skipped and "rms_norm" in report.patched


def test_xmodel_is_already_native():
    from xmodel import model as xmodel_model
    from xmodel.config import XmodelConfig

    cfg = XmodelConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128,
    )  # fmt: skip
    with torch.device("meta"):
        model = xmodel_model.Xmodel(cfg)
    report = xkernels.patch(model)
    assert all("already native" in report.patched[op] for op in ("rms_norm", "rotary", "swiglu", "cross_entropy"))


def test_fp8_converts_the_transformer_linears():
    from xkernels import fp8
    ref = _tiny("llama")
    model = copy.deepcopy(ref)
    report = xkernels.patch(model, fp8=True)
    assert report.patched["fp8"].startswith("14 nn.Linear")  # 2 layers x (q, k, v, o, gate, up, down)
    assert not isinstance(model.lm_head, fp8.FP8Linear)
    ids, _ = _batch()
    with torch.no_grad():
        logits, logits_ref = model(ids).logits, ref(ids).logits
    assert (logits - logits_ref).norm() / logits_ref.norm() < 0.1  # fp8 quantisation noise, not a wiring error


def test_unsupported_architecture():
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64))
    with pytest.raises(ValueError, match=r"does not support GPT2LMHeadModel.*llama, qwen2, qwen3, mistral, granite"):
        xkernels.patch(gpt2)
    with pytest.raises(ValueError, match="model_type=None"):
        xkernels.patch(nn.Linear(3, 3))
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        xkernels.patch("llama")
    with pytest.raises(TypeError, match="fp8 must be None"):
        xkernels.patch(_tiny("llama"), fp8="e4m3")


def test_rotary_reuses_one_position_tensor_across_layers(monkeypatch):
    """Per-sample positions (cos/sin with a batch dim): every layer, and the next forward of the same shape,
    passes the same cached position tensor to apply_rotary (no new tensor per layer, so rotary's per-tensor
    range cache holds when the opt-in checks are on)."""
    rotary_mod = importlib.import_module("xkernels.rotary")
    seen = []
    original = rotary_mod.apply_rotary

    def spy(q, k, cos, sin, position_ids=None, *args, **kwargs):
        seen.append(position_ids)
        return original(q, k, cos, sin, position_ids, *args, **kwargs)

    monkeypatch.setattr(rotary_mod, "apply_rotary", spy)
    model = _tiny("llama")
    xkernels.patch(model)
    ids, _ = _batch(batch=3, seq=8)
    pos = torch.stack([torch.arange(8), torch.arange(8) + 5, torch.arange(8) + 2])
    with xkernels.check_inputs():
        model(ids, position_ids=pos)
        model(ids, position_ids=pos + 1)
    assert len(seen) == 2 * TINY["num_hidden_layers"]
    assert all(p is seen[0] for p in seen) and seen[0] is not None
