"""Model configuration for Xmodel-2.5, with the released field names and named presets.

The field names are those of the released ``configuration_xmodel2.XmodelConfig`` (HF ``config.json`` with
``model_type: "xmodel"``), so a released ``config.json`` loads here and a saved one loads there.

What the μP fields do in the forward (see :mod:`xmodel.model`), when ``use_mup`` is true::

    h      = embed(ids) * mup_input_scale
    h      = h + attn(norm(h)) * mup_attention_residual_scale / sqrt(num_hidden_layers)
    h      = h + mlp(norm(h))  * mup_ffn_residual_scale       / sqrt(num_hidden_layers)
    logits = lm_head(norm(h))  * mup_output_scale / mup_width_multiplier
    attention softmax scale = 1 / head_dim            (1 / sqrt(head_dim) without μP)

with ``mup_width_multiplier = hidden_size / mup_base_width``. Without ``use_mup`` every multiplier is 1.
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Keys that HF writes into config.json but that carry nothing for this implementation (or are derived here).
_KNOWN_EXTRA_KEYS = frozenset(
    {
        "model_type",
        "architectures",
        "auto_map",
        "torch_dtype",
        "dtype",
        "transformers_version",
        "use_cache",
        "pretraining_tp",
        "attention_dropout",
        "mup_width_multiplier",
        "head_dim",
        "_name_or_path",
        "_attn_implementation",
        "return_dict",
        "output_hidden_states",
        "output_attentions",
    }
)


@dataclass
class XmodelConfig:
    """Xmodel-2.5 architecture. Defaults are the released 1.3B model (preset ``"xmodel-2.5"``)."""

    vocab_size: int = 129280
    hidden_size: int = 1536
    intermediate_size: int = 3840  # SwiGLU inner width
    num_hidden_layers: int = 48
    num_attention_heads: int = 24
    num_key_value_heads: int = 8  # GQA: each kv head serves num_attention_heads // num_key_value_heads queries
    hidden_act: str = "silu"  # only "silu" (SwiGLU) is supported
    max_position_embeddings: int = 131072
    initializer_range: float = 0.1
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = True
    rope_theta: float = 500000.0
    rope_scaling: dict | None = None  # only None (plain RoPE) is supported
    attention_bias: bool = False  # only False is supported (the release has no biases)
    mlp_bias: bool = False  # only False is supported
    use_mup: bool = True
    mup_input_scale: float = 12.0
    mup_output_scale: float = 1.0
    mup_attention_residual_scale: float = 1.4
    mup_ffn_residual_scale: float = 1.4
    mup_base_width: int = 256
    # DeepSeek-V3 tokenizer: <｜begin▁of▁sentence｜> = 0, <｜end▁of▁sentence｜> = 1.
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    pad_token_id: int | None = None
    extra: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)  # unknown config.json keys, kept on save

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "max_position_embeddings", "mup_base_width"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads ({self.num_attention_heads})"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be divisible by "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim = hidden_size / num_attention_heads must be even for RoPE, got {self.head_dim}")
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act must be 'silu' (SwiGLU), got {self.hidden_act!r}")
        if self.rope_scaling is not None:
            raise ValueError(f"rope_scaling is not supported (the release uses plain RoPE), got {self.rope_scaling!r}")
        if self.attention_bias or self.mlp_bias:
            raise ValueError("attention_bias and mlp_bias must be False: Xmodel-2.5 linears have no bias")
        if self.rms_norm_eps <= 0 or self.rope_theta <= 0 or self.initializer_range <= 0:
            raise ValueError("rms_norm_eps, rope_theta and initializer_range must be positive")

    # ----------------------------------------------------------------------------------------- derived
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_key_value_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def mup_width_multiplier(self) -> float:
        """``hidden_size / mup_base_width`` (as in the release: defined whether or not ``use_mup`` is set)."""
        return self.hidden_size / self.mup_base_width

    @property
    def embedding_multiplier(self) -> float:
        """Factor on the token embeddings in the forward."""
        return float(self.mup_input_scale) if self.use_mup else 1.0

    @property
    def attention_residual_multiplier(self) -> float:
        """Factor on the attention branch before the residual add."""
        return self.mup_attention_residual_scale / math.sqrt(self.num_hidden_layers) if self.use_mup else 1.0

    @property
    def ffn_residual_multiplier(self) -> float:
        """Factor on the MLP branch before the residual add."""
        return self.mup_ffn_residual_scale / math.sqrt(self.num_hidden_layers) if self.use_mup else 1.0

    @property
    def logit_multiplier(self) -> float:
        """Factor on ``lm_head(h)``."""
        return self.mup_output_scale / self.mup_width_multiplier if self.use_mup else 1.0

    @property
    def attention_softmax_scale(self) -> float:
        """Scale of ``q·k`` inside the softmax: ``1/head_dim`` under μP, else ``1/sqrt(head_dim)``."""
        return 1.0 / self.head_dim if self.use_mup else 1.0 / math.sqrt(self.head_dim)

    @property
    def eos_token_ids(self) -> list[int]:
        """``eos_token_id`` as a list (HF allows an int or a list)."""
        if self.eos_token_id is None:
            return []
        return [self.eos_token_id] if isinstance(self.eos_token_id, int) else list(self.eos_token_id)

    # ------------------------------------------------------------------------------------- counting
    def _layer_linear_params(self) -> int:
        h, d = self.hidden_size, self.head_dim
        attn = h * self.num_attention_heads * d * 2 + h * self.num_key_value_heads * d * 2  # q, o, k, v
        mlp = 3 * h * self.intermediate_size  # gate, up, down
        return attn + mlp

    def num_parameters(self, non_embedding: bool = False) -> int:
        """Exact number of distinct parameters (a tied ``lm_head`` counts once).

        ``non_embedding=True`` leaves out the token embedding and an untied ``lm_head``.
        The ``"xmodel-2.5"`` preset has 1,350,059,520 (198,574,080 of them in the tied embedding).
        """
        embed = self.vocab_size * self.hidden_size
        per_layer = self._layer_linear_params() + 2 * self.hidden_size  # + input / post-attention norms
        body = self.num_hidden_layers * per_layer + self.hidden_size  # + final norm
        if non_embedding:
            return body
        return body + embed * (1 if self.tie_word_embeddings else 2)

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token (forward + backward) for sequences of ``seq_len`` tokens.

        Counts matrix multiplies only, 2 FLOPs per multiply-add and backward = 2 x forward::

            6 * (num_hidden_layers * (q,k,v,o,gate,up,down weights) + vocab_size * hidden_size)
            + 12 * num_hidden_layers * num_attention_heads * head_dim * seq_len

        The first term is the weight GEMMs including the ``lm_head`` GEMM (tied or not, it is computed);
        the second is ``q·kᵀ`` and ``p·v`` counted over the full ``seq_len`` keys (no causal halving, the
        PaLM / nanoGPT MFU convention). Norms, RoPE, softmax, SwiGLU and the embedding lookup are left out.
        """
        if seq_len <= 0:
            raise ValueError(f"seq_len must be positive, got {seq_len}")
        dense = self.num_hidden_layers * self._layer_linear_params() + self.vocab_size * self.hidden_size
        attn = self.num_hidden_layers * self.num_attention_heads * self.head_dim * seq_len
        return 6 * dense + 12 * attn

    # ----------------------------------------------------------------------------------- (de)serialise
    def to_dict(self) -> dict[str, Any]:
        """The HF ``config.json`` content: released field names plus ``model_type`` / ``architectures``."""
        out: dict[str, Any] = {"architectures": ["XmodelForCausalLM"], "model_type": "xmodel"}
        out["auto_map"] = {
            "AutoConfig": "configuration_xmodel2.XmodelConfig",
            "AutoModelForCausalLM": "modeling_xmodel2.XmodelForCausalLM",
        }
        for f in dataclasses.fields(self):
            if f.name != "extra":
                value = getattr(self, f.name)
                out[f.name] = list(value) if isinstance(value, tuple) else value
        out["head_dim"] = self.head_dim
        out["mup_width_multiplier"] = self.mup_width_multiplier
        out["use_cache"] = True
        for key, value in self.extra.items():
            out.setdefault(key, value)
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> XmodelConfig:
        """Build from a ``config.json`` dict; unknown keys are kept in ``extra`` with a warning."""
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in d.items() if k in names}
        unknown = {k: v for k, v in d.items() if k not in names and k not in _KNOWN_EXTRA_KEYS}
        if d.get("model_type", "xmodel") != "xmodel":
            warnings.warn(f"config model_type is {d['model_type']!r}, expected 'xmodel'", stacklevel=2)
        if unknown:
            warnings.warn(f"XmodelConfig ignores unknown config keys: {sorted(unknown)}", stacklevel=2)
        config = cls(**kwargs)
        config.extra = unknown
        if "head_dim" in d and d["head_dim"] is not None and int(d["head_dim"]) != config.head_dim:
            raise ValueError(f"config head_dim {d['head_dim']} != hidden_size / num_attention_heads = {config.head_dim}")
        return config

    def save_json(self, path: str | Path) -> None:
        """Write the HF ``config.json`` (``path`` is the file, or a directory to write ``config.json`` into)."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n", encoding="utf-8")

    @classmethod
    def from_json(cls, path: str | Path) -> XmodelConfig:
        """Read an HF ``config.json`` (``path`` is the file or its directory)."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))

    # --------------------------------------------------------------------------------------- presets
    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> XmodelConfig:
        """A named preset (see ``PRESETS``) with field overrides, e.g. ``from_preset("nano", vocab_size=4096)``."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def replace(self, **changes: Any) -> XmodelConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


def _family(layers: int, hidden: int, heads: int, kv_heads: int, ffn: int) -> dict[str, Any]:
    return dict(num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads,
                num_key_value_heads=kv_heads, intermediate_size=ffn)


# Every preset starts from the XmodelConfig defaults (the released 1.3B: vocab 129280, θ 500000, eps 1e-5,
# μP 12 / 1 / 1.4 / 1.4 / base 256, init 0.1) and changes the shape.
PRESETS: dict[str, dict[str, Any]] = {
    "xmodel-2.5": _family(48, 1536, 24, 8, 3840),
    # The smaller shapes of the released configuration file (head_dim 64 each).
    "nano": _family(8, 256, 4, 1, 640),
    "micro": _family(12, 384, 6, 1, 960),
    "tiny": _family(18, 512, 8, 4, 1280),
    "small": _family(30, 576, 9, 3, 1440),
    "medium": _family(32, 960, 15, 5, 2400),
    # μP proxy for hyper-parameter sweeps: the 1.3B depth and FFN ratio (2.5x) at width 256 = mup_base_width,
    # so mup_width_multiplier = 1 and tuned values transfer to the full width.
    "proxy-256": _family(48, 256, 4, 2, 640),
    # Small enough to train on a CPU in minutes, with the trainer's default 4096-token tokenizer.
    "cpu-default": {**_family(4, 256, 4, 2, 640), "vocab_size": 4096, "max_position_embeddings": 2048},
}


def parameter_table(seq_len: int = 4096) -> str:
    """A text table of every preset: shape, parameters (total / non-embedding) and training FLOPs per token."""
    lines = [f"{'preset':<12} {'L':>3} {'hidden':>6} {'heads':>6} {'ffn':>5} {'vocab':>7} "
             f"{'params':>15} {'non-embedding':>15} {f'GFLOP/token@{seq_len}':>18}"]
    for name in PRESETS:
        c = XmodelConfig.from_preset(name)
        lines.append(
            f"{name:<12} {c.num_hidden_layers:>3} {c.hidden_size:>6} "
            f"{f'{c.num_attention_heads}/{c.num_key_value_heads}':>6} {c.intermediate_size:>5} {c.vocab_size:>7} "
            f"{c.num_parameters():>15,} {c.num_parameters(non_embedding=True):>15,} "
            f"{c.flops_per_token(min(seq_len, c.max_position_embeddings)) / 1e9:>18.3f}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    print(parameter_table())
