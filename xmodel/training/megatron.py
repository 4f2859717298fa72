"""Megatron-LM indexed datasets (``PREFIX.bin`` + ``PREFIX.idx``, the "MMIDIDX" format), read and written.

Written from the format's public description (``megatron/core/datasets/indexed_dataset.py``); no code copied.
The ``.bin`` file is the token ids of every sequence back to back, no header.  The ``.idx`` file, little endian::

    9 bytes   magic b"MMIDIDX\\x00\\x00"
    uint64    version (1)
    uint8     dtype code of the .bin: 1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float64, 7 float32, 8 uint16
    uint64    S, the number of sequences
    uint64    D, the number of entries of the document index
    int32[S]  tokens per sequence
    int64[S]  byte offset of each sequence in the .bin
    int64[D]  document index: sequence index where each document starts, from 0, ending with S (D = documents + 1)
    (int8[S]  sequence modes, multimodal datasets only; not read here)

``tools/preprocess_data.py`` writes one sequence per document (``--append-eod`` adds the EOD token at its end).  The
trainer packs documents into windows, so documents must be separated by an end-of-document token: when every
document of the dataset already ends with the run's EOS the ``.bin`` is read in place (memory-mapped); otherwise the
loader inserts EOS (see :func:`xmodel.training.data.load_source`).
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np

MAGIC = b"MMIDIDX\x00\x00"
_HEAD = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequences, document index entries -> 34 bytes
DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32, 8: np.uint16}
_CODES = {np.dtype(v): k for k, v in DTYPES.items()}


def prefix_of(path: str | Path) -> Path | None:
    """The dataset prefix named by ``path`` (``PREFIX``, ``PREFIX.bin`` or ``PREFIX.idx``) when both files exist."""
    p = Path(path)
    base = p.with_suffix("") if p.suffix in (".bin", ".idx") else p
    if base.with_name(base.name + ".bin").is_file() and base.with_name(base.name + ".idx").is_file():
        return base
    return None


def _files(prefix: Path) -> tuple[Path, Path]:
    return prefix.with_name(prefix.name + ".bin"), prefix.with_name(prefix.name + ".idx")


class IndexedDataset:
    """A Megatron indexed dataset opened read-only.  ``tokens``: the whole ``.bin`` memory-mapped (the sequences in
    order); ``doc_bounds``: token offsets ``[0, end of document 0, ..., total]`` (empty documents dropped).

    Every inconsistency between the ``.idx`` and the ``.bin`` raises ``ValueError`` naming the file."""

    def __init__(self, prefix: str | Path):
        self.prefix = Path(prefix)
        self.bin_path, self.idx_path = _files(self.prefix)
        idx = self.idx_path
        size = idx.stat().st_size
        if size < _HEAD.size:
            raise ValueError(f"{idx}: {size} bytes, shorter than the {_HEAD.size}-byte Megatron index header")
        with open(idx, "rb") as f:
            magic, version, code, seqs, docs = _HEAD.unpack(f.read(_HEAD.size))
        if magic != MAGIC:
            raise ValueError(f"{idx}: not a Megatron index (magic {magic!r}, expected {MAGIC!r})")
        if version != 1:
            raise ValueError(f"{idx}: Megatron index version {version}; only version 1 is known")
        if code not in DTYPES:
            raise ValueError(f"{idx}: unknown token dtype code {code} (known: {sorted(DTYPES)})")
        self.dtype = np.dtype(DTYPES[code])
        if self.dtype.kind == "f":
            raise ValueError(f"{idx}: the .bin holds {self.dtype} values, not token ids")
        need = _HEAD.size + seqs * 4 + seqs * 8 + docs * 8
        if size < need:
            raise ValueError(f"{idx}: truncated ({size} bytes; its header announces {seqs} sequences and {docs} "
                             f"document entries, {need} bytes)")
        raw = np.memmap(idx, dtype=np.uint8, mode="r")
        off = _HEAD.size
        lengths = np.frombuffer(raw, dtype="<i4", count=seqs, offset=off).astype(np.int64)
        pointers = np.frombuffer(raw, dtype="<i8", count=seqs, offset=off + 4 * seqs)
        doc_index = np.frombuffer(raw, dtype="<i8", count=docs, offset=off + 12 * seqs)
        item = self.dtype.itemsize
        bin_size = self.bin_path.stat().st_size
        total = int(lengths.sum())
        if (lengths < 0).any() or (seqs and (pointers[0] != 0 or not np.array_equal(
                pointers[1:], np.cumsum(lengths[:-1] * item)))):
            raise ValueError(f"{idx}: sequence offsets are not contiguous; it does not describe {self.bin_path.name}")
        if bin_size != total * item:
            raise ValueError(f"{idx} does not match {self.bin_path}: the index describes {total} tokens x {item} bytes "
                             f"= {total * item} bytes, the .bin has {bin_size} (a different or truncated file?)")
        if docs == 0 or doc_index[0] != 0 or doc_index[-1] != seqs or (np.diff(doc_index) < 0).any():
            raise ValueError(f"{idx}: bad document index (must rise from 0 to the {seqs} sequences)")
        starts = np.concatenate([[0], np.cumsum(lengths)])  # token offset of each sequence, and the end
        bounds = np.unique(starts[doc_index])  # empty documents collapse
        self.doc_bounds = bounds
        self.num_tokens = total
        self.tokens = (np.memmap(self.bin_path, dtype=self.dtype.newbyteorder("<"), mode="r", shape=(total,))
                       if total else np.zeros(0, dtype=self.dtype))

    @property
    def num_documents(self) -> int:
        return len(self.doc_bounds) - 1

    def document(self, i: int) -> np.ndarray:
        return np.asarray(self.tokens[self.doc_bounds[i]:self.doc_bounds[i + 1]])

    def last_tokens(self) -> np.ndarray:
        """The last token of every document."""
        return np.asarray(self.tokens[self.doc_bounds[1:] - 1]) if self.num_documents else np.zeros(0, np.int64)

    def first_tokens(self) -> np.ndarray:
        return np.asarray(self.tokens[self.doc_bounds[:-1]]) if self.num_documents else np.zeros(0, np.int64)


def write_indexed_dataset(prefix: str | Path, documents, dtype=np.int32) -> Path:
    """Write ``documents`` (token-id sequences, one sequence per document, as ``preprocess_data.py`` does) as
    ``PREFIX.bin`` + ``PREFIX.idx``; returns the prefix.  For tests and for exporting prepared data to Megatron."""
    prefix = Path(prefix)
    dtype = np.dtype(dtype)
    if dtype not in _CODES:
        raise ValueError(f"dtype: {dtype} has no Megatron code (use one of {sorted(str(d) for d in _CODES)})")
    bin_path, idx_path = _files(prefix)
    lengths = []
    with open(bin_path, "wb") as f:
        for doc in documents:
            arr = np.asarray(doc).astype(dtype.newbyteorder("<"), copy=False)
            f.write(arr.tobytes())
            lengths.append(len(arr))
    lens = np.asarray(lengths, dtype=np.int64)
    pointers = np.concatenate([[0], np.cumsum(lens[:-1] * dtype.itemsize)]) if len(lens) else lens
    with open(idx_path, "wb") as f:
        f.write(_HEAD.pack(MAGIC, 1, _CODES[dtype], len(lens), len(lens) + 1))
        f.write(lens.astype("<i4").tobytes())
        f.write(np.asarray(pointers, dtype="<i8").tobytes())
        f.write(np.arange(len(lens) + 1, dtype="<i8").tobytes())
        f.flush()
        os.fsync(f.fileno())
    return prefix
