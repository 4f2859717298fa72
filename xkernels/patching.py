"""Drop-in patching of Hugging Face ``transformers`` causal LMs with the xkernels ops.

``report = xkernels.patch(model)`` works on a built model instance (Llama, Qwen2, Qwen3, Mistral, Granite,
Gemma, Gemma 2, Gemma 3 (text), Phi-3, OLMo 2 -- :data:`FAMILIES` records where each differs from Llama; our
:class:`xmodel.model.Xmodel` is reported as already native) and changes only that instance.  An op whose HF
semantics xkernels does not reproduce in this build is skipped with the reason in the report, never patched
approximately:

* ``rms_norm``: every ``<Arch>RMSNorm`` module is replaced by :class:`xkernels.RMSNorm` holding the very
  same weight ``Parameter`` (optimizer state, ``state_dict`` keys and tying are unchanged).
* ``rotary``: the attention modules' ``apply_rotary_pos_emb(q, k, cos, sin)`` runs
  :func:`xkernels.apply_rotary_pos_emb` (partial rotary for Phi-3: the first ``cos.shape[-1]`` features).
  HF calls that function by its module-global name, so the modeling module's global is wrapped once by a dispatcher that uses ours only while an attention module of a
  patched model is running (forward hooks on those modules) and HF's function otherwise -- other models
  of the same architecture in the process are unaffected.
* ``swiglu``: each ``<Arch>MLP`` with ``hidden_act`` silu computes ``down(swiglu(gate(x), up(x)))``
  (Phi-3: ``down(swiglu_fused(gate_up(x)))``, gate = first half as in HF).
* ``geglu``: Gemma's tanh-GELU MLPs compute ``down(geglu(gate(x), up(x)))``.
* RMSNorm per family: Gemma's ``x_hat * (1 + w)`` in fp32 with one cast is ``RMSNorm(offset=1.0,
  casting_mode="gemma")``; OLMo 2's ``w * x_hat`` in fp32 is ``casting_mode="gemma"`` with no offset.
* ``cross_entropy``: the ``*ForCausalLM`` forward, when training (``model.training``) with ``labels``,
  computes the loss with :func:`xkernels.linear_cross_entropy` from the final hidden states -- the
  ``(tokens, vocab)`` logits are never formed and ``logits`` is returned as ``None`` (Liger's convention).
  The HF loss semantics are kept: labels shifted by one (or ``shift_labels``), mean over non-ignored
  tokens, or ``sum / num_items_in_batch`` when that is given; Granite's ``1 / logits_scaling``
  becomes ``logit_scale``, Gemma 2/3's ``final_logit_softcapping`` ``softcap``.  One difference: a
  batch whose labels are all ignored gives loss 0, not NaN.  In eval mode, or without labels, the original forward runs unchanged.
* ``fp8``: ``None``/``False`` leaves the linears alone; ``True`` (default recipe) or an
  ``xkernels.fp8.FP8Recipe`` converts them with ``xkernels.fp8.convert_to_fp8``.

Numerics: in fp32 the patched model matches the original to rounding.  With an fp32 norm weight and
bf16 activations HF's RMSNorm returns fp32 (type promotion) while ours returns bf16 (the weight is cast
to the activation dtype); in a model of one dtype the two agree.
"""

from __future__ import annotations

import importlib
import inspect
import sys
import threading
import types
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass(frozen=True)
class _Family:
    """What a model family computes where it differs from Llama (read from its HF modeling file)."""

    prefix: str  # class-name prefix of its modules: <prefix>RMSNorm, <prefix>Attention, <prefix>MLP
    # RMSNorm: y = x_hat * (norm_offset + w); casting "llama": x_hat rounded to the input dtype before the weight
    # multiply (Llama, Qwen, Phi-3); "gemma": the product in fp32, rounded once (Gemma's 1 + w, OLMo 2's w)
    norm_offset: float = 0.0
    norm_casting: str = "llama"
    mlp: str = "gated"  # "gated": down(act(gate(x)) * up(x)); "fused": gate_up_proj, gate = first half (Phi-3)
    act_attr: str = "hidden_act"  # the config field naming the MLP activation
    partial_rotary: bool = False  # HF's apply_rotary_pos_emb rotates q[..., :cos.shape[-1]] only (Phi-3)
    softcap_attr: str | None = None  # config field of the final logit soft-cap (Gemma 2/3)


FAMILIES = {  # config.model_type -> family
    "llama": _Family("Llama"),
    "qwen2": _Family("Qwen2"),
    "qwen3": _Family("Qwen3"),
    "mistral": _Family("Mistral"),
    "granite": _Family("Granite"),
    "gemma": _Family("Gemma", norm_offset=1.0, norm_casting="gemma"),
    "gemma2": _Family(
        "Gemma2", norm_offset=1.0, norm_casting="gemma", act_attr="hidden_activation",
        softcap_attr="final_logit_softcapping",
    ),  # fmt: skip
    "gemma3_text": _Family(
        "Gemma3", norm_offset=1.0, norm_casting="gemma", act_attr="hidden_activation",
        softcap_attr="final_logit_softcapping",
    ),  # fmt: skip
    "phi3": _Family("Phi3", mlp="fused", partial_rotary=True),
    "olmo2": _Family("Olmo2", norm_casting="gemma"),
}
SUPPORTED = {model_type: family.prefix for model_type, family in FAMILIES.items()}
OPS = ("rms_norm", "rotary", "swiglu", "geglu", "cross_entropy", "fp8")


@dataclass
class PatchReport:
    """What :func:`patch` did.  ``patched[op]`` describes the change, ``skipped[op]`` says why not."""

    architecture: str
    patched: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"xkernels.patch({self.architecture}):"]
        lines += [f"  patched  {op:<13} {what}" for op, what in self.patched.items()]
        lines += [f"  skipped  {op:<13} {why}" for op, why in self.skipped.items()]
        return "\n".join(lines)


def supported_architectures() -> list[str]:
    """``model_type`` values :func:`patch` accepts (plus our own ``xmodel``)."""
    return [*SUPPORTED, "xmodel"]


# ----------------------------------------------------------------------------------------------------
# RMSNorm
# ----------------------------------------------------------------------------------------------------


def _patch_rms_norm(model: nn.Module, family: _Family) -> tuple[str | None, str | None]:
    from xkernels.rmsnorm import RMSNorm

    cls_name = f"{family.prefix}RMSNorm"
    options = {}
    if family.norm_offset or family.norm_casting != "llama":
        if not _accepts(RMSNorm, "offset") or not _accepts(RMSNorm, "casting_mode"):
            what = "x_hat * (1 + w)" if family.norm_offset else "w * x_hat"
            return None, (
                f"{cls_name} computes {what} in fp32 and casts once: needs xkernels.RMSNorm(offset="
                f"{family.norm_offset:g}, casting_mode='gemma'), not in this build; HF's norm is kept"
            )
        options = {"offset": family.norm_offset, "casting_mode": family.norm_casting}
    targets = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if type(child).__name__ == cls_name
    ]
    for parent, name, old in targets:
        eps = getattr(old, "variance_epsilon", getattr(old, "eps", None))
        if eps is None or not isinstance(getattr(old, "weight", None), nn.Parameter) or old.weight.dim() != 1:
            raise ValueError(f"{cls_name} module {name!r} has no 1-D weight / variance_epsilon; cannot patch it")
        new = RMSNorm(old.weight.shape[0], eps=float(eps), device="meta", **options)
        new.weight = old.weight  # the same Parameter: optimizer state, tying and state_dict keys survive
        setattr(parent, name, new)
    opts = "".join(f", {k}={v!r}" for k, v in options.items())
    return (f"{len(targets)} {cls_name} -> xkernels.RMSNorm{f'({opts[2:]})' if opts else ''}" if targets else None), None


def _accepts(fn, name: str) -> bool:
    """Whether ``fn`` (a function or class) takes the keyword ``name`` (ops other branches are adding)."""
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


# ----------------------------------------------------------------------------------------------------
# Rotary
# ----------------------------------------------------------------------------------------------------

_rotary_state = threading.local()  # .depth: > 0 while an attention module of a patched model runs


def _rotary_active() -> bool:
    return getattr(_rotary_state, "depth", 0) > 0


def _enter_attention(module, args, kwargs=None):
    _rotary_state.depth = getattr(_rotary_state, "depth", 0) + 1


def _leave_attention(module, args, output):
    _rotary_state.depth = max(0, getattr(_rotary_state, "depth", 0) - 1)


def _xkernels_rotary(q, k, cos, sin):
    """HF layout: q, k ``(B, heads, S, D)``; cos, sin ``(B or 1, S, R)`` already gathered per position
    (and multiplied by HF's ``attention_scaling``): :func:`xkernels.apply_rotary_pos_emb`."""
    from xkernels.rotary import apply_rotary_pos_emb

    return apply_rotary_pos_emb(q, k, cos, sin)


def _make_rotary_dispatcher(original, partial: bool):
    """``partial``: the family's HF function rotates only ``q[..., :cos.shape[-1]]`` (Phi-3); elsewhere cos
    spans the whole head and any other shape goes to HF's function."""

    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        unsqueeze_dim = kwargs.get("unsqueeze_dim", 1)
        rot = cos.shape[-1] if cos.dim() == 3 else -1
        standard = (
            _rotary_active()
            and not args
            and set(kwargs) <= {"unsqueeze_dim"}
            and unsqueeze_dim == 1
            and q.dim() == 4
            and k.dim() == 4
            and cos.dim() == 3
            and cos.shape == sin.shape
            and cos.shape[0] in (1, q.shape[0])
            and cos.shape[1] == q.shape[2]
            and (rot == q.shape[3] or (partial and 0 < rot < q.shape[3] and rot % 2 == 0))
        )
        if not standard:
            return original(q, k, cos, sin, *args, **kwargs)
        return _xkernels_rotary(q, k, cos, sin)

    apply_rotary_pos_emb._xkernels_original = original
    apply_rotary_pos_emb.__doc__ = "xkernels dispatcher around HF's apply_rotary_pos_emb (see xkernels.patching)."
    return apply_rotary_pos_emb


def _patch_rotary(model: nn.Module, family: _Family) -> str | None:
    attn_cls = f"{family.prefix}Attention"
    attns = [m for m in model.modules() if type(m).__name__ == attn_cls]
    if not attns:
        return None
    module = sys.modules[type(attns[0]).__module__]
    fn = getattr(module, "apply_rotary_pos_emb", None)
    if fn is None:
        raise ValueError(f"{module.__name__} has no apply_rotary_pos_emb; this transformers version is not supported")
    if not hasattr(fn, "_xkernels_original"):
        module.apply_rotary_pos_emb = _make_rotary_dispatcher(fn, family.partial_rotary)
    count = 0
    for attn in attns:
        if getattr(attn, "_xkernels_rotary_hooks", None):
            continue
        pre = attn.register_forward_pre_hook(_enter_attention)
        post = attn.register_forward_hook(_leave_attention, always_call=True)
        attn._xkernels_rotary_hooks = (pre, post)
        count += 1
    partial = " (partial rotary: the first cos.shape[-1] features)" if family.partial_rotary else ""
    return f"{len(attns)} {attn_cls} use xkernels.apply_rotary_pos_emb{partial} ({count} newly hooked)"


# ----------------------------------------------------------------------------------------------------
# SwiGLU
# ----------------------------------------------------------------------------------------------------


def _swiglu_mlp_forward(self, x):
    from xkernels.swiglu import swiglu

    return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


def _swiglu_fused_mlp_forward(self, x):
    """Phi-3: ``gate, up = gate_up_proj(x).chunk(2)``; ``down(up * silu(gate))`` -- swiglu_fused's halves."""
    from xkernels.swiglu import swiglu_fused

    return self.down_proj(swiglu_fused(self.gate_up_proj(x)))


def _geglu_mlp_forward(self, x):
    """Gemma: ``down(gelu_tanh(gate(x)) * up(x))``."""
    from xkernels.swiglu import geglu

    return self.down_proj(geglu(self.gate_proj(x), self.up_proj(x)))


_GELU_TANH = ("gelu_pytorch_tanh", "gelu_tanh")


def _patch_mlp(model: nn.Module, family: _Family, op: str) -> tuple[str | None, str | None]:
    """``op`` = "swiglu" (silu MLPs) or "geglu" (Gemma's tanh-GELU MLPs)."""
    act = getattr(getattr(model, "config", None), family.act_attr, None)
    wants = ("silu", "swish") if op == "swiglu" else _GELU_TANH
    if act not in wants:
        kind = "SwiGLU needs silu" if op == "swiglu" else "GeGLU needs the tanh GELU"
        return None, f"{family.act_attr}={act!r}: {kind}, does not apply"
    if op == "geglu" and not hasattr(importlib.import_module("xkernels.swiglu"), "geglu"):
        return None, (
            f"{family.act_attr}={act!r}: GeGLU needs xkernels.geglu, not in this build; HF's MLP is kept"
        )
    if op == "geglu" and family.mlp == "fused":
        return None, f"{family.prefix}MLP: a fused gate_up GeGLU is not wired here; HF's MLP is kept"
    mlp_cls = f"{family.prefix}MLP"
    mlps = [m for m in model.modules() if type(m).__name__ == mlp_cls]
    names, forward, what = ("gate_proj", "up_proj", "down_proj"), _swiglu_mlp_forward, "down(xkernels.swiglu(gate, up))"
    if op == "geglu":
        forward, what = _geglu_mlp_forward, "down(xkernels.geglu(gate, up))"
    elif family.mlp == "fused":
        names, forward = ("gate_up_proj", "down_proj"), _swiglu_fused_mlp_forward
        what = "down(xkernels.swiglu_fused(gate_up))"
    for mlp in mlps:
        if not all(hasattr(mlp, n) for n in names):
            raise ValueError(f"{mlp_cls} has no {'/'.join(names)}; cannot patch it")
        mlp.forward = types.MethodType(forward, mlp)
    return (f"{len(mlps)} {mlp_cls} -> {what}" if mlps else None), None


# ----------------------------------------------------------------------------------------------------
# Loss
# ----------------------------------------------------------------------------------------------------

_LOSS_ONLY_KWARGS = ("num_items_in_batch", "shift_labels", "ignore_index")


def _make_causal_lm_forward(model: nn.Module, logit_scale: float, softcap: float | None = None):
    original = model.forward  # bound method of the class
    signature = inspect.signature(original)
    var_kw = next((p.name for p in signature.parameters.values() if p.kind is p.VAR_KEYWORD), None)

    def forward(self, *args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        named = {k: v for k, v in bound.arguments.items() if k != var_kw}
        named.update(bound.arguments.get(var_kw, {}) if var_kw else {})
        labels = named.pop("labels", None)
        logits_to_keep = named.pop("logits_to_keep", named.pop("num_logits_to_keep", 0))
        if labels is None or not self.training or not isinstance(logits_to_keep, int) or logits_to_keep != 0:
            return original(*args, **kwargs)
        from transformers.modeling_outputs import CausalLMOutputWithPast

        from xkernels.cross_entropy import linear_cross_entropy

        num_items = named.pop("num_items_in_batch", None)
        shift_labels = named.pop("shift_labels", None)
        ignore_index = named.pop("ignore_index", -100)
        return_dict = named.pop("return_dict", None)
        outputs = self.model(**named)
        hidden = outputs[0]  # (B, T, H) after the final norm
        if shift_labels is None:
            shift_labels = nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
        shift_labels = shift_labels.to(hidden.device)
        weight, bias = self.lm_head.weight, self.lm_head.bias
        if weight.dtype != hidden.dtype:
            weight = weight.to(hidden.dtype)
        options = {} if softcap is None else {"softcap": float(softcap)}  # Gemma 2/3: tanh soft-cap of the logits
        if bias is not None:  # a head with a bias (e.g. a fine-tuned or converted checkpoint): logits + b in fp32
            options["bias"] = bias if bias.dtype == hidden.dtype else bias.to(hidden.dtype)
        if num_items is None:
            loss = linear_cross_entropy(hidden, weight, shift_labels, logit_scale, ignore_index, "mean", **options)
        else:
            loss = linear_cross_entropy(hidden, weight, shift_labels, logit_scale, ignore_index, "sum", **options)
            loss = loss / (num_items.to(loss.device) if torch.is_tensor(num_items) else num_items)
        fields = CausalLMOutputWithPast.__dataclass_fields__
        extra = {
            name: getattr(outputs, name, None)
            for name in ("past_key_values", "cache", "hidden_states", "attentions")
            if name in fields
        }
        out = CausalLMOutputWithPast(loss=loss, logits=None, **extra)
        return out.to_tuple() if return_dict is False else out

    forward._xkernels_patched = True
    return forward


def _patch_cross_entropy(model: nn.Module, model_type: str, family: _Family) -> tuple[str | None, str | None]:
    if getattr(model.forward, "_xkernels_patched", False):
        return f"{type(model).__name__}.forward already patched", None
    head = getattr(model, "lm_head", None)
    if not isinstance(head, nn.Linear) or not isinstance(getattr(model, "model", None), nn.Module):
        return None, f"{type(model).__name__} has no lm_head Linear over a .model backbone (not a *ForCausalLM)"
    from xkernels.cross_entropy import linear_cross_entropy

    softcap = getattr(model.config, family.softcap_attr, None) if family.softcap_attr else None
    if softcap is not None and not _accepts(linear_cross_entropy, "softcap"):
        return None, (
            f"{family.softcap_attr}={softcap:g}: the loss needs linear_cross_entropy(softcap=...), not in this "
            "build; HF's loss is kept"
        )
    logit_scale = 1.0
    if model_type == "granite":
        logit_scale = 1.0 / float(model.config.logits_scaling)
    fn = _make_causal_lm_forward(model, logit_scale, softcap)
    model.forward = types.MethodType(fn, model)
    scale = f", logit_scale={logit_scale:g}" if logit_scale != 1.0 else ""
    scale += f", softcap={softcap:g}" if softcap is not None else ""
    return f"{type(model).__name__}.forward: training loss via xkernels.linear_cross_entropy{scale}", None


# ----------------------------------------------------------------------------------------------------
# FP8
# ----------------------------------------------------------------------------------------------------


def _patch_fp8(model: nn.Module, fp8) -> str:
    from xkernels.fp8 import FP8Linear, convert_to_fp8
    before = sum(isinstance(m, FP8Linear) for m in model.modules())
    convert_to_fp8(model, None if fp8 is True else fp8)
    after = sum(isinstance(m, FP8Linear) for m in model.modules())
    return f"{after - before} nn.Linear -> xkernels.fp8.FP8Linear (lm_head and embeddings stay high precision)"


# ----------------------------------------------------------------------------------------------------
# Public entry point
# ----------------------------------------------------------------------------------------------------


def _is_xmodel(model: nn.Module) -> bool:
    return type(model).__module__.split(".")[0] == "xmodel"


def patch(
    model: nn.Module,
    rms_norm: bool = True,
    rotary: bool = True,
    swiglu: bool = True,
    cross_entropy: bool = True,
    geglu: bool = True,
    fp8=None,
) -> PatchReport:
    """Swap the xkernels ops into ``model`` in place (see the module docstring); returns a :class:`PatchReport`.

    Raises ``ValueError`` for an architecture outside :func:`supported_architectures` (the message lists
    them).  Calling it twice is harmless (the second report says what was already in place).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if fp8 is not None and not isinstance(fp8, bool) and not hasattr(fp8, "__dataclass_fields__"):
        raise TypeError(f"fp8 must be None, a bool or an xkernels.fp8.FP8Recipe, got {type(fp8).__name__}")
    wanted = {"rms_norm": rms_norm, "rotary": rotary, "swiglu": swiglu, "cross_entropy": cross_entropy}

    if _is_xmodel(model):
        report = PatchReport(type(model).__name__)
        for op, on in wanted.items():
            (report.patched if on else report.skipped)[op] = "already native (xmodel uses xkernels)" if on else "not requested"
        if fp8:
            report.patched["fp8"] = _patch_fp8(model, fp8)
        return report

    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED:
        raise ValueError(
            f"xkernels.patch does not support {type(model).__name__} (model_type={model_type!r}); supported: "
            f"Hugging Face transformers {', '.join(SUPPORTED)} models and xmodel.Xmodel"
        )
    family = FAMILIES[model_type]
    prefix = family.prefix
    report = PatchReport(f"{type(model).__name__} ({model_type})")

    def record(op, done, reason=None):
        if done:
            report.patched[op] = done
        else:
            report.skipped[op] = reason or f"no {prefix} module of this kind found"

    if rms_norm:
        record("rms_norm", *_patch_rms_norm(model, family))
    else:
        report.skipped["rms_norm"] = "not requested"
    if rotary:
        record("rotary", _patch_rotary(model, family))
    else:
        report.skipped["rotary"] = "not requested"
    for op, on in (("swiglu", swiglu), ("geglu", geglu)):
        if on:
            record(op, *_patch_mlp(model, family, op))
        else:
            report.skipped[op] = "not requested"
    if cross_entropy:
        record("cross_entropy", *_patch_cross_entropy(model, model_type, family))
    else:
        report.skipped["cross_entropy"] = "not requested"
    if fp8:
        report.patched["fp8"] = _patch_fp8(model, fp8)
    return report
