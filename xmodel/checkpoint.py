"""HF-format checkpoints: ``config.json`` + ``model.safetensors`` (or shards + ``model.safetensors.index.json``).

The layout is the released Xmodel-2.5 one, so the released remote code (``trust_remote_code``) loads what
:func:`save_pretrained` writes, and ``Xmodel.from_pretrained`` (on :func:`load_state_dict` and
:func:`check_state_dict`) loads the released checkpoint:

* weights under the released names (``model.embed_tokens.weight``, ``model.layers.{i}.self_attn.q_proj.weight``, ...,
  ``model.norm.weight``); with tied embeddings ``lm_head.weight`` is not written (the embedding is the head) and,
  when a checkpoint has it, it must equal the embedding;
* shards named ``model-00001-of-0000N.safetensors`` with an index ``{"metadata": {"total_size": bytes},
  "weight_map": {name: file}}``; safetensors metadata ``{"format": "pt"}`` (transformers requires it);
* ``generation_config.json`` with the bos/eos/pad ids, and the tokenizer files copied when known.

This module is pure state I/O: it reads and writes tensors and configs and never imports :mod:`xmodel.model`
(``Xmodel.save_pretrained`` / ``Xmodel.from_pretrained`` call into it), so the imports of the package form a DAG
``config <- checkpoint <- model <- generate <- lm_eval_adapter``.  Functions that take a ``model`` only use its
``state_dict()``, ``config`` and ``tokenizer_dir``.
"""

from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from xmodel.config import XmodelConfig

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
)
# Keys some HF checkpoints carry that are not weights (recomputed from the config here).
_IGNORED_KEY = re.compile(r".*rotary_emb\.inv_freq$")
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def parse_size(size: int | str) -> int:
    """``2_000_000_000``, ``"2GB"`` (10^9) or ``"2GiB"`` (2^30) -> bytes."""
    if isinstance(size, int) and not isinstance(size, bool):
        if size <= 0:
            raise ValueError(f"max_shard_size must be positive, got {size}")
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B\s*", str(size), flags=re.IGNORECASE)
    if not match:
        raise ValueError(f"max_shard_size must be an int or like '2GB' / '500MiB', got {size!r}")
    number, prefix, binary = match.groups()
    power = "_KMGT".index(prefix.upper() or "_")
    result = int(float(number) * (1024 if binary else 1000) ** power)
    if result <= 0:
        raise ValueError(f"max_shard_size must be positive, got {size!r}")
    return result


def weight_names(config: XmodelConfig) -> list[str]:
    """The released tensor names for ``config``, in file order (``lm_head.weight`` only when untied)."""
    names = ["model.embed_tokens.weight"]
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        names += [p + f"self_attn.{x}_proj.weight" for x in "qkvo"]
        names += [p + f"mlp.{x}_proj.weight" for x in ("gate", "up", "down")]
        names += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
    names.append("model.norm.weight")
    if not config.tie_word_embeddings:
        names.append("lm_head.weight")
    return names


def _weights_to_save(model: Any, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """The released tensors only: extra state of swapped-in modules (e.g. FP8 scaling buffers) is not saved."""
    state = model.state_dict()
    names = weight_names(model.config)
    missing = [n for n in names if n not in state]
    if missing:
        raise ValueError(f"model state_dict lacks released weight names: {missing[:10]}")
    out = {}
    for name in names:
        tensor = state[name]
        if dtype is not None:
            tensor = tensor.to(dtype)
        out[name] = tensor.detach().to("cpu").contiguous()
    return out


def _shard(weights: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    """Greedy in name order (layer by layer); a tensor larger than the limit gets a shard of its own."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    used = 0
    for name, tensor in weights.items():
        size = tensor.numel() * tensor.element_size()
        if shards[-1] and used + size > max_bytes:
            shards.append({})
            used = 0
        shards[-1][name] = tensor
        used += size
    return shards


def save_pretrained(
    model: Any,
    path: str | Path,
    max_shard_size: int | str = "2GB",
    dtype: torch.dtype | None = None,
    tokenizer_dir: str | Path | None = None,
) -> None:
    """Write ``model`` as an HF checkpoint directory.

    ``dtype``: store the weights in this dtype (default: as they are).  ``max_shard_size``: above it the weights
    are split into shards with an index.  ``tokenizer_dir``: copy its tokenizer files (default: the directory the
    model was loaded from, if any).  Earlier ``model*.safetensors`` / index files in ``path`` are removed first.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    weights = _weights_to_save(model, dtype)
    shards = _shard(weights, parse_size(max_shard_size))

    for old in list(path.glob("model*.safetensors")) + [path / INDEX_NAME]:
        if old.exists():
            old.unlink()
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(path / WEIGHTS_NAME), metadata=metadata)
    else:
        weight_map = {}
        for i, shard in enumerate(shards, start=1):
            filename = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(path / filename), metadata=metadata)
            weight_map.update({name: filename for name in shard})
        total = sum(t.numel() * t.element_size() for t in weights.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (path / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    config = model.config.to_dict()
    stored = {t.dtype for t in weights.values()}
    config["torch_dtype"] = _DTYPE_NAMES.get(stored.pop(), "float32") if len(stored) == 1 else "float32"
    (path / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    generation = {k: getattr(model.config, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    (path / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n", encoding="utf-8")

    source = tokenizer_dir if tokenizer_dir is not None else getattr(model, "tokenizer_dir", None)
    if source is not None:
        source = Path(source)
        copied = [f for f in TOKENIZER_FILES if (source / f).is_file()]
        if not copied:
            warnings.warn(f"no tokenizer files ({', '.join(TOKENIZER_FILES)}) in {source}; none copied", stacklevel=2)
        for name in copied:
            if (source / name).resolve() != (path / name).resolve():
                shutil.copyfile(source / name, path / name)


def load_state_dict(path: str | Path, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory (single file or sharded), loaded onto ``device``."""
    path = Path(path)
    if (path / INDEX_NAME).is_file():
        index = json.loads((path / INDEX_NAME).read_text(encoding="utf-8"))
        files = sorted(set(index["weight_map"].values()))
    elif (path / WEIGHTS_NAME).is_file():
        files = [WEIGHTS_NAME]
    else:
        raise FileNotFoundError(f"no {WEIGHTS_NAME} or {INDEX_NAME} in {path}")
    tensors: dict[str, torch.Tensor] = {}
    for filename in files:
        with safe_open(str(path / filename), framework="pt", device=str(device)) as f:
            for name in f.keys():
                tensors[name] = f.get_tensor(name)
    return tensors


def check_state_dict(state: dict[str, torch.Tensor], model: Any, source: str = "checkpoint") -> dict:
    """Validate ``state`` against ``model``'s parameters; return it without ignorable keys (a tied
    ``lm_head.weight`` equal to the embedding, rotary ``inv_freq``).  Raises one ``ValueError`` listing every
    missing, unexpected and mis-shaped tensor."""
    expected = {name: p.shape for name, p in model.state_dict().items()}
    tied = model.config.tie_word_embeddings
    if tied:
        expected.pop("lm_head.weight", None)
    state = {k: v for k, v in state.items() if not _IGNORED_KEY.match(k)}
    if tied and "lm_head.weight" in state:
        head = state.pop("lm_head.weight")
        embed = state.get("model.embed_tokens.weight")
        if embed is not None and (head.shape != embed.shape or not torch.equal(head, embed.to(head.dtype))):
            raise ValueError(
                f"{source}: lm_head.weight differs from model.embed_tokens.weight but the config ties them "
                "(set tie_word_embeddings=false in config.json to load an untied head)"
            )
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshaped = sorted(
        f"{k} (got {tuple(state[k].shape)}, expected {tuple(expected[k])})"
        for k in set(state) & set(expected)
        if state[k].shape != expected[k]
    )
    not_float = sorted(k for k, v in state.items() if k in expected and not v.is_floating_point())
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped),
                         ("not floating point", not_float)):
        if items:
            shown = ", ".join(items[:20]) + (f", ... ({len(items) - 20} more)" if len(items) > 20 else "")
            problems.append(f"{label} ({len(items)}): {shown}")
    if problems:
        raise ValueError(f"{source} does not match the model config:\n  " + "\n  ".join(problems))
    return state
