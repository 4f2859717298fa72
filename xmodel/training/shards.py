"""Token shards: a flat array of token ids behind a 32-byte header, written in one pass and memory-mapped to read::

    bytes 0-7    magic  b"XMTOKv1\\0"
    bytes 8-11   uint32 bytes per token (2 = uint16, 4 = uint32)
    bytes 12-15  reserved (0)
    bytes 16-23  uint64 number of tokens
    bytes 24-31  reserved (0)

followed by the tokens (little endian).  Shared by the trainer's data loading (:mod:`xmodel.training.data`) and the
parallel preparation (:mod:`xmodel.training.preprocess`), which both write and read them.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np

MAGIC = b"XMTOKv1\x00"
HEADER = struct.Struct("<8sII Q Q")  # magic, itemsize, reserved, count, reserved -> 32 bytes
HEADER_SIZE = HEADER.size


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


class ShardWriter:
    """Append token arrays to a shard; :meth:`close` writes the header, fsyncs and renames into place."""

    def __init__(self, path: Path, dtype: np.dtype):
        self.path = Path(path)
        self.dtype = np.dtype(dtype)
        self.count = 0
        self.tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.tmp, "wb")
        self.file.write(b"\0" * HEADER_SIZE)

    def write(self, tokens: np.ndarray) -> None:
        self.file.write(np.ascontiguousarray(tokens, dtype=self.dtype.newbyteorder("<")).data)  # no copy if it fits
        self.count += len(tokens)

    def close(self) -> Path:
        self.file.seek(0)
        self.file.write(HEADER.pack(MAGIC, self.dtype.itemsize, 0, self.count, 0))
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        self.file.close()
        self.tmp.unlink(missing_ok=True)


def write_shard(path: str | Path, tokens: np.ndarray, dtype: np.dtype | None = None) -> Path:
    """Write ``tokens`` as one shard (dtype uint16 when every id fits, else uint32)."""
    tokens = np.asarray(tokens)
    if dtype is None:
        dtype = token_dtype(int(tokens.max()) + 1 if tokens.size else 1)
    writer = ShardWriter(Path(path), dtype)
    writer.write(tokens)
    return writer.close()


def read_shard(path: str | Path) -> np.memmap:
    """Memory-map a shard, checking magic, dtype and that the file holds exactly ``count`` tokens."""
    path = Path(path)
    size = path.stat().st_size
    if size < HEADER_SIZE:
        raise ValueError(f"corrupt or truncated shard {path}: {size} bytes, shorter than the {HEADER_SIZE}-byte header")
    with open(path, "rb") as f:
        magic, itemsize, _, count, _ = HEADER.unpack(f.read(HEADER_SIZE))
    if magic != MAGIC:
        raise ValueError(f"corrupt shard {path}: bad magic {magic!r} (expected {MAGIC!r}; is it a token shard?)")
    if itemsize not in (2, 4):
        raise ValueError(f"corrupt shard {path}: token size {itemsize} bytes (expected 2 or 4)")
    if size != HEADER_SIZE + count * itemsize:
        raise ValueError(
            f"corrupt or truncated shard {path}: header says {count} tokens x {itemsize} bytes but the file has "
            f"{size - HEADER_SIZE} bytes of tokens"
        )
    dtype = np.dtype(np.uint16 if itemsize == 2 else np.uint32).newbyteorder("<")
    if count == 0:
        return np.zeros(0, dtype=dtype)  # type: ignore[return-value]
    return np.memmap(path, dtype=dtype, mode="r", offset=HEADER_SIZE, shape=(count,))
