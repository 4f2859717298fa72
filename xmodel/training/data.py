"""Training data: tokenise once into memory-mapped shards, then sample a seeded mixture of packed sequences.

**Shards.**  A shard is a flat array of token ids with a 32-byte header::

    bytes 0-7    magic  b"XMTOKv1\\0"
    bytes 8-11   uint32 bytes per token (2 = uint16, 4 = uint32)
    bytes 12-15  reserved (0)
    bytes 16-23  uint64 number of tokens
    bytes 24-31  reserved (0)

followed by the tokens (little endian).  Documents are separated by the tokenizer's EOS (one after each document).
Text inputs are tokenised once into ``<cache>/shards/<key>.bin`` (the key covers file names, sizes, mtimes, the
text field and the tokenizer), written to a temporary file and renamed when complete.

**Inputs** (one *source* each; a source may expand to many files): a ``.txt`` file (one document), a directory
(every ``.txt``/``.jsonl``/``.parquet``/``.bin`` under it), a glob, ``.jsonl`` (one document per line, the
``text_field`` string), ``.parquet`` (the ``text_field`` column; needs ``pyarrow``), or pre-tokenised ``.bin``
shards in the format above.

**Sampling.**  Each source is cut into windows of ``seq_len + 1`` tokens starting every ``seq_len`` tokens
(inputs ``w[:-1]``, targets ``w[1:]``; windows never cross shard boundaries).  Global sample ``g`` comes from the
source drawn with probability ``weight / sum(weights)`` by a generator seeded with ``(seed, g // 1024)``; within a
source, windows are visited in a seeded affine permutation per epoch.  The position (sample counter plus per-source
counters) is a small dict saved in checkpoints.  Every rank computes the same global batch and reads only its slice
(rows ``rank * batch_size ... (rank + 1) * batch_size``), so N ranks see exactly the samples one process would.
"""

from __future__ import annotations

import glob as globlib
import hashlib
import json
import math
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

MAGIC = b"XMTOKv1\x00"
HEADER = struct.Struct("<8sII Q Q")  # magic, itemsize, reserved, count, reserved -> 32 bytes
HEADER_SIZE = HEADER.size
TEXT_SUFFIXES = (".txt", ".jsonl", ".parquet")
_BLOCK = 1024  # samples per mixture-draw block


# ---------------------------------------------------------------------------------------------------------
# Shards
# ---------------------------------------------------------------------------------------------------------
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
        self.file.write(np.ascontiguousarray(tokens, dtype=self.dtype.newbyteorder("<")).tobytes())
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


# ---------------------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------------------
@dataclass
class SourceSpec:
    """One entry of ``--data``: a path/glob, its mixture weight and the text field of .jsonl/.parquet files."""

    path: str
    weight: float = 1.0
    text_field: str = "text"

    @classmethod
    def parse(cls, entry: Any, flag: str = "data") -> SourceSpec:
        if isinstance(entry, (str, Path)):
            return cls(str(entry))
        if isinstance(entry, dict) and "path" in entry:
            unknown = set(entry) - {"path", "weight", "text_field"}
            if unknown:
                raise ValueError(f"--{flag}: unknown keys {sorted(unknown)} in source {entry!r}")
            from xmodel.training.config import ConfigError, to_float

            try:
                weight = to_float(flag.replace("-", "_"), entry.get("weight", 1.0), 0, lo_open=True)
            except ConfigError:
                raise ValueError(f"--{flag}: source {entry['path']} has weight {entry.get('weight')!r}; weights must "
                                 "be positive finite numbers (e.g. 1 or 2.5e-1)") from None
            return cls(str(entry["path"]), weight, str(entry.get("text_field", "text")))
        raise ValueError(f"--{flag}: a source is a path or {{path, weight, text_field}}, got {entry!r}")

    def files(self, flag: str = "data") -> list[Path]:
        """The files this source names, sorted; raises if there are none."""
        p = Path(self.path).expanduser()
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in TEXT_SUFFIXES + (".bin",))
        elif any(ch in self.path for ch in "*?["):
            found = sorted(Path(f) for f in globlib.glob(str(p), recursive=True) if Path(f).is_file())
        elif p.is_file():
            found = [p]
        else:
            raise ValueError(f"--{flag}: no such file or directory: {self.path}")
        if not found:
            raise ValueError(f"--{flag}: {self.path} matches no .txt/.jsonl/.parquet/.bin files")
        bad = [f for f in found if f.suffix not in TEXT_SUFFIXES + (".bin",)]
        if bad:
            raise ValueError(f"--{flag}: unsupported file type {bad[0]} (use .txt, .jsonl, .parquet or .bin)")
        if any(f.suffix == ".bin" for f in found) and any(f.suffix != ".bin" for f in found):
            raise ValueError(f"--{flag}: {self.path} mixes .bin shards and text files; give them as separate sources")
        return found


def iter_documents(path: Path, text_field: str = "text") -> Iterator[str]:
    """The documents of one text file."""
    if path.suffix == ".txt":
        text = path.read_text(encoding="utf-8", errors="replace")
        if text.strip():  # empty documents are skipped (no lone EOS)
            yield text
    elif path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
                text = record.get(text_field) if isinstance(record, dict) else None
                if not isinstance(text, str):
                    raise ValueError(f"{path}:{lineno}: no string field {text_field!r} (set text_field for this source)")
                if text.strip():
                    yield text
    elif path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ValueError(f"reading {path} needs pyarrow: pip install pyarrow") from None
        pf = pq.ParquetFile(path)
        if text_field not in pf.schema_arrow.names:
            raise ValueError(f"{path}: no column {text_field!r} (columns: {pf.schema_arrow.names})")
        for batch in pf.iter_batches(columns=[text_field], batch_size=1024):
            for text in batch.column(0).to_pylist():
                if text and text.strip():
                    yield text
    else:  # pragma: no cover - filtered by SourceSpec.files
        raise ValueError(f"unsupported file type {path}")


def tokenize_files(files: list[Path], tokenizer, cache_dir: Path, text_field: str = "text",
                   log=print) -> Path:
    """Tokenise text files into one cached shard (EOS after each document); returns the shard path."""
    stats = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    key = hashlib.sha1(json.dumps([stats, text_field, tokenizer.fingerprint, 1]).encode()).hexdigest()[:16]
    path = Path(cache_dir) / "shards" / f"{key}.bin"
    if path.is_file():
        try:
            read_shard(path)
            return path
        except ValueError:
            path.unlink()  # a damaged cache entry is rebuilt
    log(f"tokenizing {len(files)} file(s) ({sum(s[1] for s in stats) / 1e6:.1f} MB) -> {path}")
    writer = ShardWriter(path, token_dtype(tokenizer.vocab_size))
    eos = np.array([tokenizer.eos_id])
    try:
        chunk: list[str] = []
        for f in files:
            for doc in iter_documents(f, text_field):
                chunk.append(doc)
                if len(chunk) >= 256:
                    _write_docs(writer, tokenizer, chunk, eos)
                    chunk = []
        _write_docs(writer, tokenizer, chunk, eos)
    except BaseException:
        writer.abort()
        raise
    return writer.close()


def _write_docs(writer: ShardWriter, tokenizer, docs: list[str], eos: np.ndarray) -> None:
    if not docs:
        return
    for ids in tokenizer.encode_batch(docs):
        writer.write(np.concatenate([np.asarray(ids, dtype=np.int64), eos]))


class TokenSource:
    """The windows of one source: memory-mapped shards cut into ``seq_len + 1``-token windows."""

    def __init__(self, name: str, shards: list[np.ndarray], seq_len: int, weight: float = 1.0):
        self.name = name
        self.shards = shards
        self.seq_len = seq_len
        self.weight = weight
        counts = [max(0, (len(s) - 1) // seq_len) for s in shards]
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)  # first window of each shard
        self.begin, self.end = 0, int(self.offsets[-1])  # window range in use (train/val split narrows it)
        self.num_tokens = sum(len(s) for s in shards)

    @property
    def num_windows(self) -> int:
        return self.end - self.begin

    def split(self, fraction: float) -> tuple[TokenSource, TokenSource]:
        """``(head, tail)``: the last ``ceil(fraction * n)`` windows (at least 1) as the tail."""
        n = self.num_windows
        tail = min(n - 1, max(1, math.ceil(fraction * n)))
        head, rest = TokenSource.__new__(TokenSource), TokenSource.__new__(TokenSource)
        head.__dict__.update(self.__dict__)
        rest.__dict__.update(self.__dict__)
        head.end = self.end - tail
        rest.begin = self.end - tail
        rest.name = f"{self.name} (held out)"
        return head, rest

    def window(self, index: int) -> np.ndarray:
        """Window ``index`` (0 <= index < num_windows) as ``seq_len + 1`` int64 tokens."""
        w = self.begin + index
        shard = int(np.searchsorted(self.offsets, w, side="right") - 1)
        start = (w - int(self.offsets[shard])) * self.seq_len
        return np.asarray(self.shards[shard][start:start + self.seq_len + 1], dtype=np.int64)


def load_source(spec: SourceSpec, tokenizer, cache_dir: Path, seq_len: int, flag: str = "data", log=print) -> TokenSource:
    """Resolve, tokenise (cached) and window one source; errors name the flag and the path."""
    files = spec.files(flag)
    if files[0].suffix == ".bin":
        shards = [read_shard(f) for f in files]
    else:
        shards = [read_shard(tokenize_files(files, tokenizer, cache_dir, spec.text_field, log=log))]
    source = TokenSource(spec.path, shards, seq_len, spec.weight)
    if source.num_tokens == 0:
        raise ValueError(f"--{flag}: {spec.path} is empty (no tokens)")
    if source.num_windows == 0:
        raise ValueError(
            f"--{flag}: {spec.path} has {source.num_tokens} tokens, fewer than one sequence "
            f"(--seq-len {seq_len} needs {seq_len + 1})"
        )
    return source


def check_token_ids(sources: list[TokenSource], vocab_size: int, flag: str = "data", sample: int = 1 << 22) -> None:
    """Raise if a shard holds ids >= ``vocab_size``: whole shards up to ``2 * sample`` tokens, else their first and
    last ``sample`` tokens (the sampler checks every batch too, so a bad id in the middle is still caught)."""
    for src in sources:
        for shard in src.shards:
            parts = [shard] if len(shard) <= 2 * sample else [shard[:sample], shard[-sample:]]
            top = max((int(np.max(p)) for p in parts if len(p)), default=0)
            if top >= vocab_size:
                raise ValueError(f"--{flag}: {src.name} holds token id {top} >= the model's vocab_size {vocab_size} "
                                 "(shards made with another tokenizer?)")


# ---------------------------------------------------------------------------------------------------------
# Mixture sampling
# ---------------------------------------------------------------------------------------------------------
def _affine_permutation(n: int, seed: int, source: int, epoch: int) -> tuple[int, int]:
    """``(a, b)`` with ``gcd(a, n) = 1``: ``i -> (a * i + b) % n`` visits every window once per epoch, O(1) memory."""
    rng = np.random.default_rng([seed, 7, source, epoch])
    if n == 1:
        return 1, 0
    while True:
        a = int(rng.integers(1, n))
        if math.gcd(a, n) == 1:
            return a, int(rng.integers(0, n))


class MixtureSampler:
    """Deterministic weighted mixture over sources; :meth:`state_dict` is the resumable data position."""

    def __init__(self, sources: list[TokenSource], seed: int):
        if not sources:
            raise ValueError("--data: no training sources")
        self.sources = sources
        self.seed = seed
        w = np.array([s.weight for s in sources], dtype=np.float64)
        self.probs = w / w.sum()
        self.vocab_size: int | None = None  # when set, every row is checked against it (e.g. foreign .bin shards)
        self.sample = 0  # global samples drawn so far
        self.counts = [0] * len(sources)  # windows drawn per source
        self._block: tuple[int, np.ndarray] | None = None
        self._perm: dict[tuple[int, int], tuple[int, int]] = {}

    def _source_of(self, g: int) -> int:
        block = g // _BLOCK
        if self._block is None or self._block[0] != block:
            rng = np.random.default_rng([self.seed, 3, block])
            self._block = (block, rng.choice(len(self.sources), size=_BLOCK, p=self.probs))
        return int(self._block[1][g % _BLOCK])

    def _next_window(self, k: int) -> tuple[int, int]:
        n = self.sources[k].num_windows
        c = self.counts[k]
        self.counts[k] += 1
        epoch, i = divmod(c, n)
        if (k, epoch) not in self._perm:
            self._perm = {key: v for key, v in self._perm.items() if key[0] != k}
            self._perm[(k, epoch)] = _affine_permutation(n, self.seed, k, epoch)
        a, b = self._perm[(k, epoch)]
        return k, (a * i + b) % n

    def next_batch(self, batch_size: int, rank: int = 0, world: int = 1) -> torch.Tensor:
        """This rank's ``(batch_size, seq_len + 1)`` int64 rows of the next global batch of ``batch_size * world``."""
        picks = []
        for _ in range(batch_size * world):
            picks.append(self._next_window(self._source_of(self.sample)))
            self.sample += 1
        mine = picks[rank * batch_size:(rank + 1) * batch_size]
        rows = np.stack([self.sources[k].window(i) for k, i in mine])
        if self.vocab_size is not None and rows.size and int(rows.max()) >= self.vocab_size:
            bad = next(k for k, i in mine if int(self.sources[k].window(i).max()) >= self.vocab_size)
            raise ValueError(
                f"--data: {self.sources[bad].name} holds token id {int(rows.max())} >= the model's vocab_size "
                f"{self.vocab_size} (shards made with another tokenizer?)"
            )
        return torch.from_numpy(rows)

    def state_dict(self) -> dict[str, Any]:
        return {"sample": self.sample, "counts": list(self.counts), "seed": self.seed,
                "sources": [s.name for s in self.sources]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["counts"]) != len(self.sources):
            raise ValueError(f"data position has {len(state['counts'])} sources, this run has {len(self.sources)}")
        self.sample = int(state["sample"])
        self.counts = [int(c) for c in state["counts"]]


def eval_batches(sources: list[TokenSource], num_batches: int, batch_size: int, rank: int = 0,
                 world: int = 1) -> list[torch.Tensor]:
    """A fixed validation set: ``num_batches`` global batches of windows spread evenly over all validation windows
    (round robin over sources); this rank's rows of each."""
    total = num_batches * batch_size * world
    picks: list[tuple[int, int]] = []
    per = [np.linspace(0, s.num_windows - 1, num=min(s.num_windows, total)).astype(np.int64) for s in sources]
    i = 0
    while len(picks) < total:
        k = i % len(sources)
        j = i // len(sources)
        picks.append((k, int(per[k][j % len(per[k])])))
        i += 1
    out = []
    for b in range(num_batches):
        rows = picks[(b * world + rank) * batch_size:(b * world + rank + 1) * batch_size]
        out.append(torch.from_numpy(np.stack([sources[k].window(i) for k, i in rows])))
    return out
