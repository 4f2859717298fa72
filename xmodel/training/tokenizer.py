"""Tokenizers: train the default byte-level BPE, or load any ``tokenizer.json``.

The default tokenizer is a byte-level BPE (GPT-2 style pre-tokenisation, every byte in the initial alphabet so no
text is ever out of vocabulary) trained with the ``tokenizers`` library, with three special tokens at fixed ids:
``<|bos|>`` = 0, ``<|eos|>`` = 1, ``<|pad|>`` = 2 -- the ids :class:`xmodel.config.XmodelConfig` expects for bos/eos.

**Framing.**  How each document becomes tokens: ``[BOS] + ids(document) + EOS``.  EOS always ends a document (it is
what separates packed documents); BOS begins it when the tokenizer's own ``tokenizer_config.json`` says
``add_bos_token: true`` (``--bos auto``; what Megatron-LM's ``preprocess_data.py`` produced for the released model,
whose HF tokenizer class honoured that flag -- note that transformers 5's generic fast tokenizer ignores it and
follows ``tokenizer.json``'s post-processor only) or when forced with ``--bos always`` / ``--bos never``.  The framing is part of the shard cache key and of
the run identity, and the HF export's tokenizer files are rewritten to encode prompts the same way
(:func:`write_export_tokenizer`).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Encoding, Tokenizer, decoders, models, pre_tokenizers, trainers

BOS_MODES = ("auto", "always", "never")
VOCAB_MULTIPLE = 128  # the model's vocabulary is the tokenizer's rounded up to this (tensor-core friendly rows)

SPECIALS = ("<|bos|>", "<|eos|>", "<|pad|>")
# End-of-document tokens of common tokenizers, tried in order when loading a tokenizer.json.
_EOS_CANDIDATES = ("<|eos|>", "<｜end▁of▁sentence｜>", "<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "[SEP]")
_BOS_CANDIDATES = ("<|bos|>", "<｜begin▁of▁sentence｜>", "<|begin_of_text|>", "<s>", "<bos>", "[CLS]")


@dataclass(frozen=True)
class Framing:
    """The tokens around each document: ``[bos_id] + ids + [eos_id]`` (``bos_id`` None: no BOS)."""

    bos_id: int | None
    eos_id: int

    @property
    def bos(self) -> bool:
        return self.bos_id is not None

    def describe(self) -> str:
        return ("BOS + document + EOS" if self.bos else "document + EOS") + (
            f" (bos {self.bos_id}, eos {self.eos_id})" if self.bos else f" (eos {self.eos_id})")

    def key(self) -> list:
        """What the shard cache key and the run identity record."""
        return [self.bos_id, self.eos_id]


def padded_vocab_size(num_ids: int, multiple: int = VOCAB_MULTIPLE) -> int:
    """``num_ids`` rounded up to a multiple of ``multiple`` (128 815 -> 128 896; 129 280 stays)."""
    return -(-num_ids // multiple) * multiple


class TextTokenizer:
    """A ``tokenizers.Tokenizer`` plus the ids the trainer needs (``eos_id`` separates documents) and the framing its
    ``tokenizer_config.json`` asks for (``add_bos_token``)."""

    def __init__(self, tokenizer: Tokenizer, path: Path, eos_id: int, bos_id: int | None,
                 add_bos_token: bool = False):
        self.tokenizer = tokenizer
        self.path = path  # the tokenizer.json
        self.eos_id = eos_id
        self.bos_id = bos_id
        self.add_bos_token = add_bos_token  # tokenizer_config.json's add_bos_token (False when absent)
        self.export_dir = path.parent  # the tokenizer files the HF export copies (see framed_tokenizer_dir)

    def framing(self, mode: str = "auto") -> Framing:
        """The document framing for ``--bos MODE``: ``auto`` follows ``add_bos_token``; ``always`` / ``never``."""
        if mode not in BOS_MODES:
            raise ValueError(f"--bos: must be one of {', '.join(BOS_MODES)}; got {mode!r}")
        want = self.add_bos_token if mode == "auto" else mode == "always"
        if want and self.bos_id is None:
            raise ValueError(f"--bos {mode}: {self.path} has no BOS token (looked for the tokenizer_config.json "
                             f"bos_token and {', '.join(_BOS_CANDIDATES)}); use --bos never")
        return Framing(self.bos_id if want else None, self.eos_id)

    @property
    def vocab_size(self) -> int:
        """Number of ids (including added/special tokens)."""
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def fingerprint(self) -> str:
        """Hash of the tokenizer.json content (token shards are cached per tokenizer)."""
        return hashlib.sha1(self.path.read_bytes()).hexdigest()[:12]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """The ids of each text, no special tokens added (the framing adds BOS/EOS)."""
        return [e.ids for e in encode_ids(self.tokenizer, texts)]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    @classmethod
    def load(cls, path: str | Path) -> TextTokenizer:
        """Load a ``tokenizer.json`` (or a directory holding one); the EOS id comes from ``tokenizer_config.json``
        when present, else from the first known end-of-text token in the vocabulary."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise ValueError(f"--tokenizer: no tokenizer.json at {path}")
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a plain Exception on bad JSON
            raise ValueError(f"--tokenizer: cannot load {path}: {exc}") from None
        eos_name, bos_name, add_bos = None, None, False
        cfg_file = path.parent / "tokenizer_config.json"
        if cfg_file.is_file():
            try:
                cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise ValueError(f"--tokenizer: {cfg_file} is not valid JSON ({exc}); fix or remove it") from None
            if not isinstance(cfg, dict):
                raise ValueError(f"--tokenizer: {cfg_file} must hold a JSON object")
            eos_name = _token_name(cfg.get("eos_token"))
            bos_name = _token_name(cfg.get("bos_token"))
            add_bos = cfg.get("add_bos_token") is True
        eos_id = _first_id(tok, ([eos_name] if eos_name else []) + list(_EOS_CANDIDATES))
        if eos_id is None:
            raise ValueError(f"--tokenizer: {path} has no end-of-text token (looked for {', '.join(_EOS_CANDIDATES)})")
        bos_id = _first_id(tok, ([bos_name] if bos_name else []) + list(_BOS_CANDIDATES))
        return cls(tok, path, eos_id, bos_id, add_bos)


def encode_ids(tok: Tokenizer, texts: list[str]) -> list[Encoding]:
    """``tok``'s encodings of ``texts`` (no special tokens added), for their ids only: the offsets may be zeros.

    ``encode_batch_fast`` (tokenizers >= 0.21) returns the same ids as ``encode_batch`` but skips converting each
    token's byte offsets into character offsets (a byte -> character hash map of each whole document).  Measured with
    the DeepSeek-V3 tokenizer on Python source (``valgrind --tool=cachegrind``, 526 kB, 130,907 tokens): 17% fewer
    instructions per token.  Older tokenizers fall back to ``encode_batch``."""
    fast = getattr(tok, "encode_batch_fast", None)
    return (fast or tok.encode_batch)(texts, add_special_tokens=False)


def _token_name(value) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _first_id(tok: Tokenizer, names: list[str]) -> int | None:
    for name in names:
        idx = tok.token_to_id(name)
        if idx is not None:
            return idx
    return None


def train_bpe(texts: Iterable[str], vocab_size: int, path: Path) -> TextTokenizer:
    """Train a byte-level BPE of ``vocab_size`` ids (specials first) on ``texts``; write it atomically to ``path``."""
    if vocab_size < 256 + len(SPECIALS):
        raise ValueError(f"--vocab-size: a byte-level BPE needs at least {256 + len(SPECIALS)} ids, got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tok.save(str(tmp))
    os.replace(tmp, path)
    config = {"bos_token": SPECIALS[0], "eos_token": SPECIALS[1], "pad_token": SPECIALS[2],
              "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 131072}
    (path.parent / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return TextTokenizer.load(path)


def default_tokenizer(train_jsonl: Path, cache_dir: Path, vocab_size: int) -> TextTokenizer:
    """The default BPE for a corpus file, trained once and cached under ``<cache>/tokenizers/<key>/``."""
    key = hashlib.sha1(f"{train_jsonl.resolve()}:{train_jsonl.stat().st_size}:{vocab_size}:1".encode()).hexdigest()[:12]
    path = Path(cache_dir) / "tokenizers" / key / "tokenizer.json"
    if path.is_file() and (path.parent / "tokenizer_config.json").is_file():
        return TextTokenizer.load(path)

    def texts() -> Iterable[str]:
        with open(train_jsonl, encoding="utf-8") as f:
            for line in f:
                yield json.loads(line)["text"]

    return train_bpe(texts(), vocab_size, path)


def write_export_tokenizer(tokenizer: TextTokenizer, framing: Framing, out_dir: Path) -> Path:
    """Write the tokenizer files of the HF export to ``out_dir`` so that they encode a prompt the way training framed
    a document: ``tokenizer_config.json`` states ``add_bos_token`` / ``add_eos_token`` (EOS ends training documents
    but is not added to prompts), and ``tokenizer.json``'s post-processor prepends BOS exactly when training did (a
    ``tokenizers``-only reader such as ``python -m xmodel.generate`` sees the same ids as HF ``AutoTokenizer``).
    Written atomically (a temporary directory renamed); returns ``out_dir``."""
    import shutil

    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    spec = json.loads(tokenizer.path.read_text(encoding="utf-8"))
    spec["post_processor"] = _post_processor(spec.get("post_processor"), tokenizer, framing)
    (tmp / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False) + "\n", encoding="utf-8")
    cfg_file = tokenizer.path.parent / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text(encoding="utf-8")) if cfg_file.is_file() else {}
    names = {"bos_token": tokenizer.tokenizer.id_to_token(framing.bos_id) if framing.bos else None,
             "eos_token": tokenizer.tokenizer.id_to_token(framing.eos_id)}
    for key, name in names.items():
        if name is not None and key not in cfg:
            cfg[key] = name
    cfg.update(add_bos_token=framing.bos, add_eos_token=False)
    cfg.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
    (tmp / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    for extra in ("special_tokens_map.json",):
        if (tokenizer.path.parent / extra).is_file():
            shutil.copy2(tokenizer.path.parent / extra, tmp / extra)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir


def framed_tokenizer_dir(tokenizer: TextTokenizer, framing: Framing, cache_dir: Path, write: bool = True) -> Path:
    """``<cache>/tokenizers/framed/<fingerprint>-<bos>-<eos>/``: the tokenizer files as the run frames documents (for
    the HF export); written once.  Falls back to the tokenizer's own directory when the cache cannot be written."""
    out = Path(cache_dir) / "tokenizers" / "framed" / f"{tokenizer.fingerprint}-{framing.bos_id}-{framing.eos_id}"
    if write and not (out / "tokenizer_config.json").is_file():
        try:
            write_export_tokenizer(tokenizer, framing, out)
        except OSError as exc:
            print(f"warning: cannot write the export's tokenizer files to {out} ({exc}); the export copies "
                  f"{tokenizer.path.parent} as it is", flush=True)
            return tokenizer.path.parent
    return out


def _post_processor(current: dict | None, tokenizer: TextTokenizer, framing: Framing) -> dict | None:
    """``current`` without any template that adds special tokens, plus one that prepends BOS when ``framing.bos``
    (a byte-level post-processor, which only fixes offsets, is kept)."""
    kept = []
    for proc in (current.get("processors", []) if current and current.get("type") == "Sequence"
                 else [current] if current else []):
        if proc.get("type") not in ("TemplateProcessing", "BertProcessing", "RobertaProcessing"):
            kept.append(proc)
    if framing.bos:
        name = tokenizer.tokenizer.id_to_token(framing.bos_id)
        kept.append({
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": name, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": name, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": name, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {name: {"id": name, "ids": [framing.bos_id], "tokens": [name]}},
        })
    if not kept:
        return None
    return kept[0] if len(kept) == 1 else {"type": "Sequence", "processors": kept}
