"""Tokenizers: train the default byte-level BPE, or load any ``tokenizer.json``.

The default tokenizer is a byte-level BPE (GPT-2 style pre-tokenisation, every byte in the initial alphabet so no
text is ever out of vocabulary) trained with the ``tokenizers`` library, with three special tokens at fixed ids:
``<|bos|>`` = 0, ``<|eos|>`` = 1, ``<|pad|>`` = 2 -- the ids :class:`xmodel.config.XmodelConfig` expects for bos/eos.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SPECIALS = ("<|bos|>", "<|eos|>", "<|pad|>")
# End-of-document tokens of common tokenizers, tried in order when loading a tokenizer.json.
_EOS_CANDIDATES = ("<|eos|>", "<｜end▁of▁sentence｜>", "<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "[SEP]")
_BOS_CANDIDATES = ("<|bos|>", "<｜begin▁of▁sentence｜>", "<|begin_of_text|>", "<s>", "<bos>", "[CLS]")


class TextTokenizer:
    """A ``tokenizers.Tokenizer`` plus the ids the trainer needs (``eos_id`` separates documents)."""

    def __init__(self, tokenizer: Tokenizer, path: Path, eos_id: int, bos_id: int | None):
        self.tokenizer = tokenizer
        self.path = path  # the tokenizer.json
        self.eos_id = eos_id
        self.bos_id = bos_id

    @property
    def vocab_size(self) -> int:
        """Number of ids (including added/special tokens)."""
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def fingerprint(self) -> str:
        """Hash of the tokenizer.json content (token shards are cached per tokenizer)."""
        return hashlib.sha1(self.path.read_bytes()).hexdigest()[:12]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]

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
        eos_name, bos_name = None, None
        cfg_file = path.parent / "tokenizer_config.json"
        if cfg_file.is_file():
            try:
                cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
            except json.JSONDecodeError:
                cfg = {}
            eos_name = _token_name(cfg.get("eos_token"))
            bos_name = _token_name(cfg.get("bos_token"))
        eos_id = _first_id(tok, ([eos_name] if eos_name else []) + list(_EOS_CANDIDATES))
        if eos_id is None:
            raise ValueError(f"--tokenizer: {path} has no end-of-text token (looked for {', '.join(_EOS_CANDIDATES)})")
        bos_id = _first_id(tok, ([bos_name] if bos_name else []) + list(_BOS_CANDIDATES))
        return cls(tok, path, eos_id, bos_id)


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
