"""Xmodel forward against an independent plain-PyTorch implementation of the equations, μP scalars, packing,
initialisation, activation checkpointing and the fused-kernel path."""

import math

import pytest
import torch
import torch.nn.functional as F

import xkernels
from xmodel.config import XmodelConfig
from xmodel.model import Xmodel, positions_from_doc_ids


@pytest.fixture
def torch_ops():
    """For tests of model logic that the kernel backend cannot change (kernel parity has its own tests below):
    the PyTorch references instead of the slow Triton interpreter."""
    with xkernels.force_backend("torch"):
        yield


def tiny_config(**overrides) -> XmodelConfig:
    base = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=4, max_position_embeddings=256, mup_base_width=32, rope_theta=10000.0)
    return XmodelConfig(**{**base, **overrides})


def randomize_norms(model: Xmodel) -> None:
    """Norm weights are 1 after init; make them random so the test sees them."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name == "model.norm.weight":
                p.copy_(1 + 0.3 * torch.randn_like(p))


# ------------------------------------------------------------------------------------------------
# The reference: the equations of the issue, written out with nothing from xmodel / xkernels.
# ------------------------------------------------------------------------------------------------
def reference_logits(sd: dict, cfg: XmodelConfig, ids: torch.Tensor, positions: torch.Tensor | None = None):
    B, T = ids.shape
    H, Hkv, L = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.num_hidden_layers
    D = cfg.hidden_size // H
    if cfg.use_mup:
        s_in, s_out = cfg.mup_input_scale, cfg.mup_output_scale / (cfg.hidden_size / cfg.mup_base_width)
        s_attn, s_ffn = cfg.mup_attention_residual_scale / math.sqrt(L), cfg.mup_ffn_residual_scale / math.sqrt(L)
        softmax_scale = 1.0 / D
    else:
        s_in = s_out = s_attn = s_ffn = 1.0
        softmax_scale = 1.0 / math.sqrt(D)

    def rms(x, w):
        xf = x.float()
        return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps)).to(x.dtype)

    pos = torch.arange(T)[None].expand(B, T) if positions is None else positions
    freq = 1.0 / cfg.rope_theta ** (torch.arange(0, D, 2, dtype=torch.float64) / D)
    ang = pos[..., None].double() * freq  # (B, T, D/2)
    cos = torch.cat([ang.cos(), ang.cos()], -1).float()[:, None]  # (B, 1, T, D)
    sin = torch.cat([ang.sin(), ang.sin()], -1).float()[:, None]

    def rope(x):  # (B, heads, T, D)
        x1, x2 = x[..., : D // 2], x[..., D // 2 :]
        return x * cos + torch.cat([-x2, x1], -1) * sin

    causal = torch.ones(T, T, dtype=torch.bool).tril()
    h = sd["model.embed_tokens.weight"][ids] * s_in
    for i in range(L):
        p = f"model.layers.{i}."
        x = rms(h, sd[p + "input_layernorm.weight"])
        q = (x @ sd[p + "self_attn.q_proj.weight"].T).view(B, T, H, D).transpose(1, 2)
        k = (x @ sd[p + "self_attn.k_proj.weight"].T).view(B, T, Hkv, D).transpose(1, 2)
        v = (x @ sd[p + "self_attn.v_proj.weight"].T).view(B, T, Hkv, D).transpose(1, 2)
        q, k = rope(q), rope(k)
        kv_index = torch.arange(H) // (H // Hkv)  # query head h uses kv head h // groups
        k, v = k[:, kv_index], v[:, kv_index]
        scores = (q @ k.transpose(-1, -2)) * softmax_scale
        scores = scores.masked_fill(~causal, float("-inf"))
        attn = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, H * D)
        h = h + (attn @ sd[p + "self_attn.o_proj.weight"].T) * s_attn
        x = rms(h, sd[p + "post_attention_layernorm.weight"])
        gate, up = x @ sd[p + "mlp.gate_proj.weight"].T, x @ sd[p + "mlp.up_proj.weight"].T
        h = h + ((gate * torch.sigmoid(gate) * up) @ sd[p + "mlp.down_proj.weight"].T) * s_ffn
    h = rms(h, sd["model.norm.weight"])
    head = sd.get("lm_head.weight", sd["model.embed_tokens.weight"])
    return (h @ head.T) * s_out


def max_rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("use_mup", [True, False])
@pytest.mark.parametrize("kv_heads", [6, 2], ids=["gqa1", "gqa3"])
def test_matches_reference(use_mup, kv_heads):
    cfg = tiny_config(hidden_size=96, num_attention_heads=6, num_key_value_heads=kv_heads, use_mup=use_mup,
                      mup_input_scale=3.0, mup_output_scale=2.5, mup_attention_residual_scale=0.7,
                      mup_ffn_residual_scale=2.2)
    model = Xmodel(cfg)
    randomize_norms(model)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = torch.randint(0, cfg.vocab_size, (2, 13))
    with torch.no_grad():
        got = model(ids).logits
        want = reference_logits(model.state_dict(), cfg, ids)
    assert got.dtype == torch.float32 and got.shape == (2, 13, 97)
    assert max_rel_err(got, want) < 1e-5


@pytest.mark.usefixtures("torch_ops")
def test_untied_head_matches_reference():
    cfg = tiny_config(tie_word_embeddings=False, num_key_value_heads=2)
    model = Xmodel(cfg)
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    ids = torch.randint(0, cfg.vocab_size, (1, 9))
    with torch.no_grad():
        assert max_rel_err(model(ids).logits, reference_logits(model.state_dict(), cfg, ids)) < 1e-5


@pytest.mark.usefixtures("torch_ops")
def test_loss_is_mean_ce_over_aligned_labels():
    model = Xmodel(tiny_config(num_key_value_heads=2))
    ids = torch.randint(0, 97, (3, 10))
    labels = torch.randint(0, 97, (3, 10))
    labels[0, :4] = -100
    labels[2, 7] = -100
    out = model(ids, labels=labels, return_logits=True)
    want = F.cross_entropy(out.logits.reshape(-1, 97), labels.reshape(-1), ignore_index=-100)
    assert out.num_tokens.item() == 25
    torch.testing.assert_close(out.loss, want, rtol=1e-6, atol=1e-6)
    assert model(ids, labels=labels).logits is None  # logits are not materialised for the caller by default
    out = model(ids, labels=torch.full_like(ids, 7), ignore_index=7)
    assert out.num_tokens.item() == 0 and out.loss.item() == 0.0


@pytest.mark.parametrize("tied", [True, False])
def test_fused_loss_equals_loss_from_logits(tied):
    """labels without logits -> xkernels.linear_cross_entropy; with logits -> F.cross_entropy: same loss and grads."""
    model = Xmodel(tiny_config(num_key_value_heads=2, tie_word_embeddings=tied))
    ids = torch.randint(0, 97, (2, 10))
    labels = ids.roll(-1, 1)
    labels[:, -1] = -100

    def run(return_logits):
        model.zero_grad()
        out = model(ids, labels=labels, return_logits=return_logits)
        out.loss.backward()
        return out, {n: p.grad.clone() for n, p in model.named_parameters()}

    fused, grads_fused = run(False)
    plain, grads_plain = run(True)
    assert fused.logits is None and plain.logits is not None
    assert fused.num_tokens.item() == plain.num_tokens.item() == 18
    torch.testing.assert_close(fused.loss, plain.loss, rtol=1e-6, atol=1e-6)
    for name in grads_plain:
        torch.testing.assert_close(grads_fused[name], grads_plain[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.usefixtures("torch_ops")
def test_loss_backward_reaches_every_parameter():
    model = Xmodel(tiny_config(num_key_value_heads=2))
    ids = torch.randint(0, 97, (2, 8))
    model(ids, labels=ids.roll(-1, 1)).loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


# ------------------------------------------------------------------------------------------------
# μP scalars, one at a time
# ------------------------------------------------------------------------------------------------
def _logits(cfg, state, ids):
    model = Xmodel(cfg)
    model.load_state_dict(state)
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.usefixtures("torch_ops")
def test_mup_output_scale_and_base_width_scale_logits_exactly():
    cfg = tiny_config(num_key_value_heads=2)
    state = Xmodel(cfg).state_dict()
    ids = torch.randint(0, 97, (2, 7))
    ref = _logits(cfg, state, ids)
    assert torch.equal(_logits(cfg.replace(mup_output_scale=2.0), state, ids), 2 * ref)
    assert torch.equal(_logits(cfg.replace(mup_base_width=64), state, ids), 2 * ref)  # width multiplier 2 -> 1


@pytest.mark.usefixtures("torch_ops")
def test_mup_input_scale_multiplies_the_embedding():
    cfg = tiny_config(mup_input_scale=5.0)
    model = Xmodel(cfg)
    ids = torch.randint(0, 97, (2, 7))
    seen = {}
    model.model.layers[0].input_layernorm.register_forward_hook(lambda m, args, out: seen.setdefault("h", args[0]))
    with torch.no_grad():
        model(ids)
    torch.testing.assert_close(seen["h"], model.model.embed_tokens.weight[ids] * 5.0, rtol=0, atol=0)


@pytest.mark.usefixtures("torch_ops")
@pytest.mark.parametrize("branch", ["attention", "ffn"])
def test_residual_scales_multiply_their_branch(branch):
    """scale 0 == that branch's output projection zeroed; scale s -> branch * s / sqrt(L) (via the reference)."""
    field = f"mup_{branch}_residual_scale"
    proj = "self_attn.o_proj" if branch == "attention" else "mlp.down_proj"
    cfg = tiny_config(num_key_value_heads=2)
    state = Xmodel(cfg).state_dict()
    ids = torch.randint(0, 97, (2, 7))
    zeroed = {k: (torch.zeros_like(v) if proj in k else v) for k, v in state.items()}
    assert torch.equal(_logits(cfg.replace(**{field: 0.0}), state, ids), _logits(cfg, zeroed, ids))
    changed = cfg.replace(**{field: 3.0})
    got = _logits(changed, state, ids)
    assert max_rel_err(got, reference_logits(state, changed, ids)) < 1e-5
    assert max_rel_err(got, _logits(cfg, state, ids)) > 1e-3


@pytest.mark.usefixtures("torch_ops")
def test_mup_softmax_scale_is_one_over_head_dim():
    """With every μP multiplier neutralised, μP on vs off differ only by the attention scale 1/d vs 1/sqrt(d)."""
    L = 2
    neutral = dict(mup_input_scale=1.0, mup_output_scale=1.0, mup_attention_residual_scale=math.sqrt(L),
                   mup_ffn_residual_scale=math.sqrt(L), mup_base_width=64)
    cfg = tiny_config(**neutral)
    state = Xmodel(cfg).state_dict()
    ids = torch.randint(0, 97, (2, 9))
    on = _logits(cfg, state, ids)
    off = _logits(cfg.replace(use_mup=False), state, ids)
    assert max_rel_err(on, off) > 1e-4
    # Scaling q_proj by sqrt(d) = 4 turns 1/d into 1/sqrt(d) (k and rope are linear in q).
    scaled = {k: (v * 4 if "q_proj" in k else v) for k, v in state.items()}
    assert max_rel_err(_logits(cfg, scaled, ids), off) < 1e-5


# ------------------------------------------------------------------------------------------------
# Packing, kernels, checkpointing, init, meta device
# ------------------------------------------------------------------------------------------------
def test_positions_from_doc_ids():
    doc = torch.tensor([[0, 0, 0, 1, 1, 2], [5, 5, 5, 5, 5, 5]])
    assert positions_from_doc_ids(doc).tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]]


def test_packed_documents_do_not_attend_across():
    model = Xmodel(tiny_config(num_key_value_heads=2))
    a, b = torch.randint(0, 97, (1, 5)), torch.randint(0, 97, (1, 8))
    packed = torch.cat([a, b], 1)
    doc_ids = torch.tensor([[0] * 5 + [1] * 8])
    with torch.no_grad():
        got = model(packed, doc_ids=doc_ids).logits
        want = torch.cat([model(a).logits, model(b).logits], 1)
        crossed = model(packed).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (crossed[:, 5:] - want[:, 5:]).abs().max() > 1e-3
    # A document id that comes back later in the row is a new document.
    c = torch.randint(0, 97, (1, 3))
    with torch.no_grad():
        again = model(torch.cat([a, b, c], 1), doc_ids=torch.tensor([[0] * 5 + [1] * 8 + [0] * 3])).logits
    torch.testing.assert_close(again[:, 13:], model(c).logits, rtol=1e-5, atol=1e-5)


def test_fused_kernel_path_equals_torch_path():
    """Default dispatch (Triton interpreter on CPU in CI, Triton on CUDA) vs forced PyTorch references."""
    model = Xmodel(tiny_config(num_key_value_heads=2))
    randomize_norms(model)
    ids = torch.randint(0, 97, (2, 11))
    labels = ids.roll(-1, 1)

    def run():
        model.zero_grad()
        out = model(ids, labels=labels, return_logits=True)
        out.loss.backward()
        return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    logits, grads = run()
    with xkernels.force_backend("torch"):
        logits_ref, grads_ref = run()
    torch.testing.assert_close(logits, logits_ref, rtol=1e-5, atol=1e-5)
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.usefixtures("torch_ops")
def test_activation_checkpointing_same_loss_and_grads():
    model = Xmodel(tiny_config(num_key_value_heads=2))
    ids = torch.randint(0, 97, (2, 9))

    def run():
        model.zero_grad()
        loss = model(ids, labels=ids.roll(-1, 1)).loss
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    loss, grads = run()
    model.set_activation_checkpointing(True)
    calls = []
    for layer in model.model.layers:  # the checkpoint is inside each layer: its body runs again in backward
        layer.mlp.register_forward_pre_hook(lambda m, args: calls.append(m))
    loss_ckpt, grads_ckpt = run()
    assert len(calls) == 2 * len(model.model.layers)
    assert torch.equal(loss, loss_ckpt)
    for g, gc in zip(grads, grads_ckpt):
        torch.testing.assert_close(g, gc, rtol=1e-6, atol=1e-7)


@pytest.mark.usefixtures("torch_ops")
@pytest.mark.parametrize("scheme", ["hf", "megatron"])
def test_meta_build_then_init(scheme):
    cfg = tiny_config(hidden_size=256, intermediate_size=512, num_hidden_layers=8, mup_base_width=64, vocab_size=512)
    with torch.device("meta"):
        model = Xmodel(cfg)
    model.to_empty(device="cpu")
    model.init_weights(scheme, generator=torch.Generator().manual_seed(0))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    std_in = 0.1 / math.sqrt(4)  # width multiplier 256 / 64 = 4
    std_out = 0.1 / math.sqrt(2 * 8) if scheme == "megatron" else std_in
    layer = model.model.layers[3]
    assert model.model.embed_tokens.weight.std().item() == pytest.approx(0.1, rel=0.02)
    assert layer.self_attn.q_proj.weight.std().item() == pytest.approx(std_in, rel=0.02)
    assert layer.mlp.up_proj.weight.std().item() == pytest.approx(std_in, rel=0.02)
    assert layer.self_attn.o_proj.weight.std().item() == pytest.approx(std_out, rel=0.02)
    assert layer.mlp.down_proj.weight.std().item() == pytest.approx(std_out, rel=0.02)
    assert torch.equal(layer.input_layernorm.weight, torch.ones(256))
    assert torch.isfinite(model(torch.randint(0, 512, (1, 4))).logits).all()
    with pytest.raises(ValueError, match="scheme"):
        model.init_weights("xavier")


@pytest.mark.usefixtures("torch_ops")
def test_bf16_forward_close_to_fp32():
    model = Xmodel(tiny_config(num_key_value_heads=2))
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        ref = model(ids).logits
        got = model.to(torch.bfloat16)(ids).logits
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert max_rel_err(got, ref) < 5e-2


@pytest.mark.usefixtures("torch_ops")
def test_autocast_bf16_training_step():
    """fp32 weights under bf16 autocast: the residual stream stays fp32, branches are cast before each add."""
    model = Xmodel(tiny_config(num_key_value_heads=2))
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        ref = model(ids, labels=ids.roll(-1, 1)).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, labels=ids.roll(-1, 1))
    out.loss.backward()
    assert out.loss.dtype == torch.float32 and abs(out.loss.item() - ref.item()) < 5e-2 * ref.item()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.usefixtures("torch_ops")
def test_bad_inputs():
    model = Xmodel(tiny_config())
    ids = torch.randint(0, 97, (2, 5))
    with pytest.raises(ValueError, match="input_ids"):
        model(ids[0])
    with pytest.raises(ValueError, match="labels"):
        model(ids, labels=ids[:, :3])
    with pytest.raises(ValueError, match="attention_mask"):
        model(ids, attention_mask=torch.ones(2, 4))


# ------------------------------------------------------------------------------------------------
# Package structure: the xmodel imports form a DAG
# ------------------------------------------------------------------------------------------------
def _xmodel_import_graph() -> dict[str, set[str]]:
    """module -> the xmodel modules it imports anywhere in its source (function-level imports included)."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    modules = {}
    for path in sorted((root / "xmodel").rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
                targets = [base] + [f"{base}.{a.name}" for a in node.names]  # `from pkg import module`
            else:
                continue
            deps.update(t for t in targets if t in modules and t != name)  # self-import under __main__ is harmless
        graph[name] = deps
    return graph


def test_xmodel_imports_form_a_dag():
    graph = _xmodel_import_graph()
    assert {"xmodel.model", "xmodel.checkpoint", "xmodel.generate", "xmodel.config"} <= graph.keys()
    assert "xmodel.model" not in graph["xmodel.checkpoint"]  # checkpoint is pure state I/O
    assert "xmodel.generate" not in graph["xmodel.model"]
    state: dict[str, int] = {}  # 1 = on the current DFS path, 2 = done

    def visit(node, path):
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycle = path[path.index(dep):] + [dep]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep, path + [dep])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_each_xmodel_module_imports_alone_in_a_fresh_interpreter():
    """Each module imported first (the others unloaded) succeeds: no module needs another to be half-initialised."""
    import subprocess
    import sys
    from pathlib import Path

    names = sorted(_xmodel_import_graph())
    code = (
        "import importlib, sys\n"
        f"for name in {names!r}:\n"
        "    for m in [m for m in sys.modules if m == 'xmodel' or m.startswith('xmodel.')]:\n"
        "        del sys.modules[m]\n"
        "    importlib.import_module(name)\n"
    )
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]


# ------------------------------------------------------------------------------------------------
# μP multipliers cost nothing: no elementwise multiply over the (tokens x vocab) logits
# ------------------------------------------------------------------------------------------------
def _vocab_wide_muls(fn, vocab: int) -> list[str]:
    """The aten mul/div ops (out-of-place and in-place) by a scalar (a Python number or a 0-dim tensor) that ``fn``
    runs on a tensor whose last dim is ``vocab`` -- the form a μP multiplier on the logits takes (the loss's own
    per-row gradient factor is not one)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class Spy(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if name in ("mul", "mul_", "div", "div_"):
                shapes = [tuple(a.shape) for a in args if isinstance(a, torch.Tensor)]
                wide = [s for s in shapes if s and s[-1] == vocab]
                if wide and all(s == () or s in wide for s in shapes) and len(wide) == 1:
                    seen.append(f"{func}{shapes}")
            return func(*args, **(kwargs or {}))

    with Spy():
        fn()
    return seen


@pytest.mark.usefixtures("torch_ops")
@pytest.mark.parametrize("tied", [True, False])
def test_no_vocab_wide_multiply_in_forward_and_backward(tied):
    cfg = tiny_config(num_key_value_heads=2, tie_word_embeddings=tied, mup_output_scale=2.5)
    assert cfg.logit_multiplier != 1.0
    model = Xmodel(cfg)
    ids = torch.randint(0, 97, (2, 9))
    labels = ids.roll(-1, 1)

    def step():
        out = model(ids, labels=labels, return_logits=True)
        out.loss.backward()

    assert _vocab_wide_muls(step, cfg.vocab_size) == []
    with torch.no_grad():
        assert _vocab_wide_muls(lambda: model(ids), cfg.vocab_size) == []
    # The spy sees what it should: the unfolded product would be caught.
    with torch.no_grad():
        caught = _vocab_wide_muls(lambda: model.lm_head(torch.randn(2, 64)) * 2.0, cfg.vocab_size)
    assert len(caught) == 1


def test_cross_entropy_sum_matches_torch_value_and_gradient():
    from xmodel.model import cross_entropy_sum

    logits = torch.randn(3, 7, 97, dtype=torch.float64).float()
    labels = torch.randint(0, 97, (3, 7))
    labels[0, :3] = -100
    a = logits.clone().requires_grad_()
    b = logits.clone().requires_grad_()
    want = F.cross_entropy(a.reshape(-1, 97), labels.reshape(-1), ignore_index=-100, reduction="sum")
    got = cross_entropy_sum(b, labels, -100)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    (want * 0.37).backward()
    (got * 0.37).backward(retain_graph=True)
    torch.testing.assert_close(b.grad, a.grad, rtol=1e-6, atol=1e-7)
    assert b.grad[0, :3].abs().max() == 0  # ignored rows
    with pytest.raises(RuntimeError, match="twice"):
        got.backward()
