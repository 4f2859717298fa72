"""The Xmodel-2.5 decoder (μP), with the released module and weight names.

Forward, for token ids ``x`` (B, T) and ``L = num_hidden_layers`` (multipliers from :class:`XmodelConfig`;
all 1 without ``use_mup``)::

    h = embed_tokens(x) * mup_input_scale
    for each layer:
        a = o_proj(attention(rope(q_proj(rms(h))), rope(k_proj(rms(h))), v_proj(rms(h))))   # GQA, causal
        h = h + a * mup_attention_residual_scale / sqrt(L)
        m = down_proj(silu(gate_proj(rms(h))) * up_proj(rms(h)))                           # SwiGLU
        h = h + m * mup_ffn_residual_scale / sqrt(L)
    logits = lm_head(rms(h)) * mup_output_scale / (hidden_size / mup_base_width)            # lm_head tied

The μP multipliers are applied where they cost least, with the same numerics up to fp32 rounding: the input
scale in place on the embedding output, each residual scale inside the fused residual add, and the logit scale
folded into the final norm's weight (so it scales the (tokens x hidden) head input, never the (tokens x vocab)
logits).

Attention is ``softmax(q kᵀ * scale) v`` with ``scale = 1/head_dim`` under μP (``1/sqrt(head_dim)`` without);
rotary embeddings use the rotate-half convention with ``rope_theta``; each RMSNorm normalises in fp32, casts back
and multiplies by its weight.  The residual adds are fused with the following RMSNorm
(:func:`xkernels.add_rms_norm`), rotary is :func:`xkernels.apply_rotary`, attention is
``F.scaled_dot_product_attention`` with the explicit scale.  All projections are plain ``nn.Linear`` (no bias) so
FP8 conversion can swap them from outside.

State-dict keys are the released names (``model.embed_tokens.weight``, ``model.layers.{i}.self_attn.q_proj.weight``,
..., ``model.norm.weight``, ``lm_head.weight``), so :mod:`xmodel.checkpoint` reads and writes the HF format.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import xkernels
from xmodel import checkpoint as ckpt
from xmodel.config import XmodelConfig

_TORCH_VERSION = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
_SDPA_HAS_GQA = _TORCH_VERSION >= (2, 5)


class KVCacheLike(Protocol):
    """What the forward needs from a KV cache (see :class:`xmodel.generate.KVCache`).

    ``length`` tokens are cached; ``update(layer, k, v)`` appends ``k, v`` (B, n_kv_heads, T, head_dim) for one
    layer and returns all cached keys/values of that layer; ``advance(T)`` is called once per forward after
    every layer has been updated.
    """

    length: int

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def advance(self, num_tokens: int) -> None: ...


@dataclass
class XmodelOutput:
    """``loss``: mean cross entropy over the non-ignored labels (0 when there are none), fp32, or None;
    ``logits``: (B, T, vocab) fp32, or None when not requested; ``num_tokens``: number of non-ignored labels
    (a 0-dim int64 tensor), or None without labels."""

    loss: torch.Tensor | None
    logits: torch.Tensor | None
    num_tokens: torch.Tensor | None


# --------------------------------------------------------------------------------------------------------
# SwiGLU and the loss: fused xkernels ops, with their plain-torch forms documented here.
# --------------------------------------------------------------------------------------------------------
def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` (:func:`xkernels.swiglu`: one pass, fp32 inside)."""
    return xkernels.swiglu(gate, up)


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Sum over positions of ``-log softmax(logits)[label]`` in fp32, skipping ``labels == ignore_index``.

    Same value as ``F.cross_entropy(logits.float(), labels, ignore_index=..., reduction="sum")``; the gradient
    ``g * (softmax(logits) - onehot(label))`` (0 on ignored rows) is formed in place in the saved log-softmax, so
    the backward makes two passes over the (tokens x vocab) buffer instead of a zero-fill, a scatter and
    ``log_softmax_backward``."""
    flat = logits.reshape(-1, logits.shape[-1])
    return _CrossEntropySum.apply(flat if flat.dtype == torch.float32 else flat.float(), labels.reshape(-1),
                                  ignore_index)


class _CrossEntropySum(torch.autograd.Function):
    """``sum_i valid_i * (lse_i - z_i[t_i])`` over fp32 logits ``z`` (N, V); backward in place (see above)."""

    @staticmethod
    def forward(ctx, logits, labels, ignore_index):
        logprobs = torch.log_softmax(logits, dim=-1)  # (N, V): saved, turned into the gradient in backward
        valid = labels != ignore_index
        safe = torch.where(valid, labels, torch.zeros_like(labels))
        picked = logprobs.gather(1, safe[:, None]).squeeze(1)
        ctx.save_for_backward(logprobs, safe, valid)
        ctx.consumed = False
        return -torch.where(valid, picked, torch.zeros_like(picked)).sum()

    @staticmethod
    def backward(ctx, grad):
        if ctx.consumed:
            raise RuntimeError("the cross entropy's saved buffer is reused by its backward: "
                               "backward through it twice (retain_graph=True) is not supported")
        ctx.consumed = True
        logprobs, safe, valid = ctx.saved_tensors
        probs = logprobs.exp_()  # softmax, in place
        probs.scatter_add_(1, safe[:, None], torch.full_like(probs[:, :1], -1.0))
        probs.mul_((valid.to(probs.dtype) * grad)[:, None])  # times the incoming gradient; 0 on ignored rows
        return probs, None, None


# --------------------------------------------------------------------------------------------------------
# Masks and positions
# --------------------------------------------------------------------------------------------------------
def positions_from_doc_ids(doc_ids: torch.Tensor) -> torch.Tensor:
    """Positions that restart at 0 wherever ``doc_ids`` changes along the sequence: (B, T) int64."""
    batch, seq = doc_ids.shape
    idx = torch.arange(seq, device=doc_ids.device).expand(batch, seq)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    start_idx = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - start_idx


def build_attention_mask(
    seq: int,
    past: int,
    doc_ids: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    device: torch.device,
) -> torch.Tensor | None:
    """Boolean ``(B or 1, 1, seq, past + seq)`` mask (True = may attend), or None when plain causal suffices.

    Query ``i`` (absolute position ``past + i``) sees key ``j`` iff ``j <= past + i``, the key is not padding
    (``attention_mask[:, j] == 1``) and both are in the same document: the same run of equal ``doc_ids`` (an id that
    comes back later in the row starts a new document).  Every query always sees
    itself, so a padding query never has an empty row (its output is unused but stays finite).
    """
    if doc_ids is None and attention_mask is None and (past == 0 or seq == 1):
        return None
    total = past + seq
    q_pos = torch.arange(past, total, device=device)[:, None]
    k_pos = torch.arange(total, device=device)[None, :]
    mask = (k_pos <= q_pos)[None]  # (1, seq, total)
    if attention_mask is not None:
        mask = mask & attention_mask.to(device=device, dtype=torch.bool)[:, None, :]
    if doc_ids is not None:
        segments = (doc_ids[:, 1:] != doc_ids[:, :-1]).cumsum(dim=1)  # a new segment at every change of id
        segments = torch.cat([torch.zeros_like(segments[:, :1]), segments], dim=1)
        mask = mask & (segments[:, :, None] == segments[:, None, :])
    mask = mask | (k_pos == q_pos)[None]
    return mask[:, None]


# --------------------------------------------------------------------------------------------------------
# Modules (names = released names)
# --------------------------------------------------------------------------------------------------------
class XmodelAttention(nn.Module):
    def __init__(self, config: XmodelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scale = config.attention_softmax_scale
        h = config.hidden_size
        self.q_proj = nn.Linear(h, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(h, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(h, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, h, bias=False)

    def forward(self, x, cos, sin, position_ids, mask, cache: KVCacheLike | None):
        batch, seq, _ = x.shape
        q = self.q_proj(x).view(batch, seq, self.num_heads, self.head_dim)  # (B, T, H, D)
        k = self.k_proj(x).view(batch, seq, self.num_kv_heads, self.head_dim)  # (B, T, Hkv, D)
        v = self.v_proj(x).view(batch, seq, self.num_kv_heads, self.head_dim)
        q, k = xkernels.apply_rotary(q, k, cos, sin, position_ids)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, D)
        causal = mask is None and (cache is None or cache.length == 0) and seq > 1
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, Hkv, past + T, D)
        groups = self.num_heads // self.num_kv_heads
        extra: dict[str, Any] = {}
        if groups > 1:
            if _SDPA_HAS_GQA and mask is None:
                extra["enable_gqa"] = True
            else:  # head h reads kv head h // groups
                k = k.repeat_interleave(groups, dim=1)
                v = v.repeat_interleave(groups, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=self.scale, **extra)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, self.num_heads * self.head_dim))


class XmodelMLP(nn.Module):
    def __init__(self, config: XmodelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


def _multiplier(value: float) -> float | None:
    """``scale=`` argument of the fused residual add: None for 1 (nothing to multiply)."""
    return None if value == 1.0 else float(value)


class XmodelDecoderLayer(nn.Module):
    def __init__(self, config: XmodelConfig, layer_idx: int):
        super().__init__()
        self.activation_checkpointing = False  # set by Xmodel.set_activation_checkpointing
        self.self_attn = XmodelAttention(config, layer_idx)
        self.mlp = XmodelMLP(config)
        self.input_layernorm = xkernels.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = xkernels.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        # None when 1 (no μP): the plain fused add.  Every layer's MLP multiplier is the same, so the next
        # layer (or the final norm) applies this layer's to the pending branch.
        self.attn_mult = _multiplier(config.attention_residual_multiplier)
        self.ffn_mult = _multiplier(config.ffn_residual_multiplier)

    def forward(self, h, pending, cos, sin, position_ids, mask, cache=None):
        """``h``: residual stream; ``pending``: the previous layer's MLP branch, not yet scaled nor added (or None).

        Returns ``(h, pending)`` with this layer's attention branch added and its MLP branch pending, so each
        residual add -- and its μP multiplier -- is fused with the RMSNorm that follows it
        (``add_rms_norm(branch, h, w, scale=m)``: ``h + m * branch`` in one op, no separate scaled copy).

        With :attr:`activation_checkpointing` (training, grad enabled, no KV cache) the body is recomputed in
        backward (non-reentrant :func:`torch.utils.checkpoint.checkpoint`).  The checkpoint sits inside the layer's
        own forward, so compiling the layer (:mod:`xmodel.training.compile`) compiles the checkpointed region too.
        """
        if self.activation_checkpointing and self.training and cache is None and torch.is_grad_enabled():
            return checkpoint(self._body, h, pending, cos, sin, position_ids, mask, None, use_reentrant=False)
        return self._body(h, pending, cos, sin, position_ids, mask, cache)

    def _body(self, h, pending, cos, sin, position_ids, mask, cache):
        # Under autocast the branches come out in the autocast dtype while the residual stream keeps its own
        # (e.g. fp32): the branch is cast to the stream's dtype before the fused add (a no-op otherwise).
        if pending is None:
            normed = self.input_layernorm(h)
        else:
            normed, h = self.input_layernorm(pending.to(h.dtype), h, scale=self.ffn_mult)
        attn = self.self_attn(normed, cos, sin, position_ids, mask, cache)
        normed, h = self.post_attention_layernorm(attn.to(h.dtype), h, scale=self.attn_mult)
        return h, self.mlp(normed)


class XmodelModel(nn.Module):
    def __init__(self, config: XmodelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([XmodelDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = xkernels.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)


class Xmodel(nn.Module):
    """Xmodel-2.5 causal LM.  Build on any device (``meta`` included), then :meth:`init_weights`.

    ``with torch.device("meta"): m = Xmodel(cfg)``; ``m.to_empty(device="cuda"); m.init_weights()``.
    A model built on a real device is initialised (``"hf"`` scheme) by the constructor.
    """

    def __init__(self, config: XmodelConfig):
        super().__init__()
        self.config = config
        self.model = XmodelModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()
        self.activation_checkpointing = False
        self.tokenizer_dir: Path | None = None  # set by from_pretrained; save_pretrained copies its tokenizer files
        self._rope_tables: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}
        if not self.lm_head.weight.is_meta:
            self.init_weights()

    # ------------------------------------------------------------------------------------------ setup
    def tie_weights(self) -> None:
        """Make ``lm_head.weight`` the very Parameter of ``model.embed_tokens.weight`` (when tied)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def _apply(self, fn, *args, **kwargs):
        # .to() / .to_empty() may replace parameters one by one; re-tie afterwards.
        out = super()._apply(fn, *args, **kwargs)
        self.tie_weights()
        self._rope_tables = {}
        return out

    @torch.no_grad()
    def init_weights(self, scheme: str = "hf", generator: torch.Generator | None = None) -> None:
        """Initialise every parameter (norm weights to 1).  ``std0 = initializer_range`` (0.1),
        ``w = mup_width_multiplier`` under μP (else 1), ``L = num_hidden_layers``:

        * ``"hf"`` -- the released ``_init_weights``: every linear ``N(0, std0 / sqrt(w))``, the (tied)
          embedding ``N(0, std0)``.
        * ``"megatron"`` -- what the paper trained with: q/k/v and gate/up ``N(0, std0 / sqrt(w))``,
          o and down ``N(0, std0 / sqrt(2 L))``, embedding ``N(0, std0)``.

        An untied ``lm_head`` gets ``N(0, std0 / sqrt(w))`` in both schemes.
        """
        if scheme not in ("hf", "megatron"):
            raise ValueError(f"scheme must be 'hf' or 'megatron', got {scheme!r}")
        cfg = self.config
        std0 = cfg.initializer_range
        width_mult = cfg.mup_width_multiplier if cfg.use_mup else 1.0
        std_in = std0 / math.sqrt(width_mult)
        std_out = std0 / math.sqrt(2 * cfg.num_hidden_layers) if scheme == "megatron" else std_in
        self.tie_weights()
        nn.init.normal_(self.model.embed_tokens.weight, 0.0, std0, generator=generator)
        for layer in self.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            for lin in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj):
                nn.init.normal_(lin.weight, 0.0, std_in, generator=generator)
            for lin in (attn.o_proj, mlp.down_proj):
                nn.init.normal_(lin.weight, 0.0, std_out, generator=generator)
            nn.init.ones_(layer.input_layernorm.weight)
            nn.init.ones_(layer.post_attention_layernorm.weight)
        nn.init.ones_(self.model.norm.weight)
        if not cfg.tie_word_embeddings:
            nn.init.normal_(self.lm_head.weight, 0.0, std_in, generator=generator)

    def set_activation_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each decoder layer in backward instead of storing its activations (training only).

        Call it before compiling the layers (:func:`xmodel.training.compile.compile_blocks`): the flag is read in
        each layer's forward, so a compiled layer guards on it."""
        self.activation_checkpointing = bool(enabled)
        for layer in self.model.layers:
            layer.activation_checkpointing = self.activation_checkpointing

    def num_parameters(self, non_embedding: bool = False) -> int:
        """Distinct parameters (tied weights once); ``non_embedding`` leaves out embedding and lm_head."""
        skip = {id(self.model.embed_tokens.weight), id(self.lm_head.weight)} if non_embedding else set()
        return sum(p.numel() for p in self.parameters() if id(p) not in skip)

    def _rope(self, needed: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 (cos, sin) tables with at least ``needed`` rows, grown by powers of two and kept per device."""
        rows = max(256, 1 << (needed - 1).bit_length())
        key = (str(device), rows)
        if key not in self._rope_tables:
            self._rope_tables = {k: v for k, v in self._rope_tables.items() if k[0] != str(device)}
            self._rope_tables[key] = xkernels.rotary_cos_sin(rows, self.config.head_dim, self.config.rope_theta, device)
        return self._rope_tables[key]

    # ---------------------------------------------------------------------------------------- forward
    def hidden_states(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        cache: KVCacheLike | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The input of ``lm_head`` (B, T, hidden): the final-normed hidden states times the logit multiplier
        (folded into the norm weight, see :meth:`_head_norm_weight`); arguments as in :meth:`forward`."""
        cfg = self.config
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape (batch, seq), got {tuple(input_ids.shape)}")
        batch, seq = input_ids.shape
        if doc_ids is not None and doc_ids.shape != input_ids.shape:
            raise ValueError(f"doc_ids must have the shape of input_ids {tuple(input_ids.shape)}, got {tuple(doc_ids.shape)}")
        past = 0 if cache is None else cache.length
        if doc_ids is not None and past:
            raise ValueError("doc_ids (packed sequences) cannot be combined with a non-empty KV cache")
        if attention_mask is not None and attention_mask.shape != (batch, past + seq):
            raise ValueError(f"attention_mask must have shape ({batch}, {past + seq}), got {tuple(attention_mask.shape)}")
        device = input_ids.device

        if position_ids is None:
            if doc_ids is not None:
                position_ids = positions_from_doc_ids(doc_ids)
            elif past:
                position_ids = torch.arange(past, past + seq, device=device)[None]
            max_pos = past + seq
        else:
            max_pos = int(position_ids.max()) + 1
        cos, sin = self._rope(max_pos, device)
        mask = build_attention_mask(seq, past, doc_ids, attention_mask, device)

        h = self.model.embed_tokens(input_ids)  # (B, T, hidden)
        if cfg.embedding_multiplier != 1.0:
            h.mul_(cfg.embedding_multiplier)  # in place: no second (B, T, hidden) tensor (the backward needs none)
        pending = None
        for layer in self.model.layers:
            h, pending = layer(h, pending, cos, sin, position_ids, mask, cache)
        h, _ = xkernels.add_rms_norm(pending.to(h.dtype), h, self._head_norm_weight(h.dtype), self.model.norm.eps,
                                     scale=_multiplier(cfg.ffn_residual_multiplier))
        if cache is not None:
            cache.advance(seq)
        return h

    def _head_norm_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The final norm's weight times the logit multiplier (a (hidden,) vector), in ``dtype``.

        ``lm_head(w * n) * s == lm_head((w * s) * n)``: folding ``s`` into the norm weight scales the head's
        (tokens x hidden) input instead of its (tokens x vocab) output.  In fp32 the logits differ from the
        unfolded product by fp32 rounding only (one rounding of ``w * s``); the product is formed in fp32 so a
        half-precision model rounds it once, on the cast."""
        weight = self.model.norm.weight
        scale = self.config.logit_multiplier
        if scale != 1.0:
            weight = weight.float() * scale
        return weight if weight.dtype == dtype else weight.to(dtype)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits in fp32 from :meth:`hidden_states` (any leading shape): ``lm_head(hidden)``, the logit
        multiplier being already folded into ``hidden``."""
        logits = self.lm_head(hidden)
        return logits if logits.dtype == torch.float32 else logits.float()

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        cache: KVCacheLike | None = None,
        ignore_index: int = -100,
        return_logits: bool | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> XmodelOutput:
        """Run the model on ``input_ids`` (B, T).

        * ``labels`` (B, T): targets ALREADY ALIGNED with the inputs -- ``labels[b, t]`` is the token that
          should follow ``input_ids[b, :t+1]`` (the caller shifts).  ``loss`` = mean over
          ``labels != ignore_index`` of ``-log softmax(logits[b, t])[labels[b, t]]``, ``num_tokens`` = their count.
        * ``position_ids`` (B, T) or (1, T): rotary positions.  Default: ``past + arange(T)`` with a cache,
          positions restarting at 0 per document with ``doc_ids``, else ``arange(T)``.
        * ``doc_ids`` (B, T): packed sequences -- a document is a run of equal ids; no attention across documents
          (combined with causal), positions restart per document.
        * ``cache``: a KV cache (:class:`xmodel.generate.KVCache`); keys/values are appended in place.
        * ``attention_mask`` (B, past + T): 1 for real tokens, 0 for padding keys (left-padded batches).
        * ``return_logits``: default (None) returns logits only when no ``labels`` are given.  With labels and
          ``return_logits=False`` the loss comes from :func:`xkernels.linear_cross_entropy` (no logits in memory);
          with ``return_logits=True`` from the logits (same value up to fp32 rounding).
        """
        if return_logits is None:
            return_logits = labels is None
        if labels is not None and labels.shape != input_ids.shape:
            raise ValueError(f"labels must have the shape of input_ids {tuple(input_ids.shape)}, got {tuple(labels.shape)}")
        h = self.hidden_states(input_ids, position_ids, doc_ids, cache, attention_mask)

        loss = num_tokens = logits = None
        if labels is not None:
            num_tokens = (labels != ignore_index).sum()
        if return_logits:
            logits = self.logits(h)  # (B, T, vocab)
            if labels is not None:
                loss = cross_entropy_sum(logits, labels, ignore_index) / num_tokens.clamp(min=1)
        elif labels is not None:
            # Chunked lm_head + cross entropy: the (B, T, vocab) logits are never materialised.
            weight = self.lm_head.weight
            loss = xkernels.linear_cross_entropy(
                h, weight if weight.dtype == h.dtype else weight.to(h.dtype), labels,
                logit_scale=1.0, ignore_index=ignore_index, reduction="mean",  # the scale is already in h
            )
        return XmodelOutput(loss=loss, logits=logits, num_tokens=num_tokens)

    # ------------------------------------------------------------------------------------ checkpoints
    def save_pretrained(
        self,
        path: str | Path,
        max_shard_size: int | str = "2GB",
        dtype: torch.dtype | None = None,
        tokenizer_dir: str | Path | None = None,
    ) -> None:
        """Write an HF checkpoint directory (see :func:`xmodel.checkpoint.save_pretrained`)."""
        ckpt.save_pretrained(self, path, max_shard_size=max_shard_size, dtype=dtype, tokenizer_dir=tokenizer_dir)

    @classmethod
    def from_pretrained(
        cls, path: str | Path, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> Xmodel:
        """Build a model from an HF checkpoint directory (the format of :mod:`xmodel.checkpoint`).

        ``device``: where the weights go (default CPU); ``dtype``: cast every weight to it (default: keep the
        stored dtypes, so bf16 stays bf16 and a round trip is bit-exact).  The model is returned in eval mode.
        Generation is :func:`xmodel.generate.generate` (``generate(model, prompts, ...)``).
        """
        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"no config.json in {path}")
        config = XmodelConfig.from_json(path / "config.json")
        device = torch.device(device if device is not None else "cpu")
        state = ckpt.load_state_dict(path, device)
        with torch.device("meta"):
            model = cls(config)
        state = ckpt.check_state_dict(state, model, source=str(path))
        if dtype is not None:
            state = {k: v.to(dtype) for k, v in state.items()}
        model.load_state_dict(state, strict=False, assign=True)
        model.tie_weights()
        model.eval()
        if any(t.is_meta for t in list(model.parameters()) + list(model.buffers())):  # pragma: no cover - invariant
            raise RuntimeError("internal error: some weights were not loaded")
        if (path / "tokenizer.json").is_file():
            model.tokenizer_dir = path
        return model
