"""The default corpus: text every Python install has, so ``python -m xmodel.train`` needs no data and no network.

Documents are the running interpreter's standard-library ``.py`` files (``sysconfig`` ``stdlib`` path, without
``site-packages``) and the topics of its bundled documentation (``pydoc_data.topics``).  Each document goes to
validation when a hash of its name falls in the validation share, so the split is by file and the same on every
machine with the same Python.  The training split is capped at ``max_mb`` (files taken in hash order), the
validation split at a tenth of that.

The result is two ``.jsonl`` files (``{"name": ..., "text": ...}`` per line) in
``<cache>/corpus/<key>/``, written atomically; ``key`` covers the Python version, stdlib path and the options.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path


def _doc_hash(name: str) -> int:
    return int.from_bytes(hashlib.sha1(name.encode("utf-8")).digest()[:8], "little")


def iter_default_documents(stdlib: Path | None = None) -> Iterator[tuple[str, str]]:
    """``(name, text)`` for every stdlib ``.py`` file (relative path) and every pydoc topic (``pydoc:<topic>``)."""
    root = Path(stdlib or sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if "site-packages" in rel.parts or "__pycache__" in rel.parts:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # a few test fixtures are deliberately not UTF-8
        if text.strip():
            yield str(rel), text
    try:
        from pydoc_data.topics import topics
    except ImportError:  # pragma: no cover - some minimal installs lack it
        topics = {}
    for topic in sorted(topics):
        yield f"pydoc:{topic}", topics[topic]


def _atomic_write_jsonl(path: Path, docs: list[tuple[str, str]]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"name": name, "text": text}, ensure_ascii=False) + "\n" for name, text in docs)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def build_default_corpus(
    cache_dir: Path, max_mb: float = 6.0, val_share: float = 0.02, stdlib: Path | None = None
) -> tuple[Path, Path]:
    """Write (or reuse) the default corpus; returns ``(train.jsonl, val.jsonl)``.

    ``val_share``: fraction of documents (by name hash) in validation.  ``stdlib``: source root (tests point it at
    a small directory; default the running interpreter's).
    """
    root = Path(stdlib or sysconfig.get_paths()["stdlib"]).resolve()
    key_src = json.dumps([sys.version, str(root), max_mb, val_share, 1])
    key = hashlib.sha1(key_src.encode()).hexdigest()[:12]
    out = Path(cache_dir) / "corpus" / key
    train_path, val_path = out / "train.jsonl", out / "val.jsonl"
    if train_path.is_file() and val_path.is_file():
        return train_path, val_path
    out.mkdir(parents=True, exist_ok=True)

    docs = sorted(iter_default_documents(root), key=lambda d: _doc_hash(d[0]))
    cutoff = int(val_share * 2**64)
    train_cap, val_cap = int(max_mb * 1e6), int(max_mb * 1e5)
    train: list[tuple[str, str]] = []
    val: list[tuple[str, str]] = []
    train_bytes = val_bytes = 0
    for name, text in docs:
        size = len(text.encode("utf-8"))
        if _doc_hash("val:" + name) < cutoff:
            if val_bytes < val_cap:
                val.append((name, text))
                val_bytes += size
        elif train_bytes < train_cap:
            train.append((name, text))
            train_bytes += size
    if not train or not val:
        raise ValueError(f"the default corpus from {root} is empty (train {len(train)}, val {len(val)} documents)")
    _atomic_write_jsonl(val_path, val)
    _atomic_write_jsonl(train_path, train)
    return train_path, val_path
