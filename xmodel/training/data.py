"""Training data: tokenise once into memory-mapped shards, then sample a seeded mixture of packed sequences.

**Shards** (:mod:`xmodel.training.shards`): flat arrays of token ids behind a 32-byte header.  Each document is
framed ``[BOS] + text + EOS`` (see :mod:`xmodel.training.tokenizer`).  Text inputs are tokenised once, in parallel,
into a prepared directory ``<cache>/shards/<key>/`` (parts + ``manifest.json``, see
:mod:`xmodel.training.preprocess`; the key covers file names, sizes, mtimes, the text field, the tokenizer and the
framing); its parts are read as one stream (:class:`TokenStream`).

**Inputs** (one *source* each; a source may expand to many files): a ``.txt`` file (one document), a directory
(every ``.txt``/``.jsonl``/``.parquet``/``.bin`` under it), a glob, ``.jsonl`` (one document per line, the
``text_field`` string), ``.parquet`` (the ``text_field`` column; needs ``pyarrow``), a directory made by
``python -m xmodel.prepare`` (it holds ``manifest.json``), pre-tokenised ``.bin`` shards in the format above, or a
Megatron-LM indexed dataset (``PREFIX.bin`` + ``PREFIX.idx``, named by ``PREFIX`` or ``PREFIX.bin``; see
:mod:`xmodel.training.megatron`).  Any other ``.bin`` is refused with the list of accepted formats.

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
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from xmodel.training.shards import (  # noqa: F401  (re-exported: the shard format's home is xmodel.training.shards)
    HEADER, HEADER_SIZE, MAGIC, ShardWriter, read_shard, token_dtype, write_shard,
)

TEXT_SUFFIXES = (".txt", ".jsonl", ".parquet")
_BLOCK = 1024  # samples per mixture-draw block

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
        """The files this source names, sorted: text files, ``.bin`` shards / Megatron datasets, or the manifest of a
        prepared directory; raises if there are none or they mix text with tokens."""
        from xmodel.training.megatron import prefix_of

        p = Path(self.path).expanduser()
        if p.is_dir() and (p / "manifest.json").is_file():
            return [p / "manifest.json"]
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in TEXT_SUFFIXES + (".bin",))
        elif any(ch in self.path for ch in "*?["):
            found = sorted(Path(f) for f in globlib.glob(str(p), recursive=True) if Path(f).is_file())
        elif p.is_file():
            found = [p]
        elif prefix_of(p) is not None:  # a Megatron dataset named by its prefix
            found = [p.with_name(p.name + ".bin")]
        else:
            raise ValueError(f"--{flag}: no such file or directory: {self.path}")
        if not found:
            raise ValueError(f"--{flag}: {self.path} matches no .txt/.jsonl/.parquet/.bin files")
        if p.suffix == ".idx" and prefix_of(p) is not None:
            found = [p.with_suffix(".bin")]
        bad = [f for f in found if f.suffix not in TEXT_SUFFIXES + (".bin",)]
        if bad:
            raise ValueError(f"--{flag}: unsupported file type {bad[0]}; {ACCEPTED}")
        if any(f.suffix == ".bin" for f in found) and any(f.suffix != ".bin" for f in found):
            raise ValueError(f"--{flag}: {self.path} mixes .bin shards and text files; give them as separate sources")
        return found


def iter_documents(path: Path, text_field: str = "text") -> Iterator[str]:
    """The non-empty documents of one text file (bad records raise ``ValueError`` naming the file)."""
    from xmodel.training.preprocess import Segment, _check_file, iter_segment

    size, groups = _check_file(Path(path), text_field)
    seg = Segment(0, 0, len(groups) if groups is not None else size)
    yield from iter_segment(Path(path), seg, text_field, False, {"bad": 0})


class TokenStream:
    """Token shards read as one sequence (the parts of a prepared directory), so windows run across part
    boundaries and the stream does not depend on how the work was cut.  Supports ``len`` and slicing."""

    def __init__(self, parts: list[np.ndarray]):
        self.parts = [p for p in parts if len(p)]
        self.offsets = np.concatenate([[0], np.cumsum([len(p) for p in self.parts])]).astype(np.int64)
        self.dtype = self.parts[0].dtype if self.parts else np.dtype(np.uint16)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, key: slice) -> np.ndarray:
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("TokenStream supports contiguous slices only")
        start, stop, _ = key.indices(len(self))
        if stop <= start:
            return np.zeros(0, dtype=self.dtype)
        first = int(np.searchsorted(self.offsets, start, side="right") - 1)
        out = []
        k = first
        while k < len(self.parts) and self.offsets[k] < stop:
            lo, hi = max(start, int(self.offsets[k])), min(stop, int(self.offsets[k + 1]))
            out.append(np.asarray(self.parts[k][lo - self.offsets[k]:hi - self.offsets[k]]))
            k += 1
        return out[0] if len(out) == 1 else np.concatenate(out)


ACCEPTED = ("accepted inputs: text (.txt, .jsonl, .parquet, or a directory/glob of them), a directory made by "
            "python -m xmodel.prepare (holding manifest.json), an xmodel token shard (.bin, magic XMTOKv1), or a "
            "Megatron-LM indexed dataset (PREFIX.bin + PREFIX.idx, made by its tools/preprocess_data.py; give "
            "PREFIX or PREFIX.bin)")


def file_kind(path: Path) -> str:
    """``"text"``, ``"prepared"`` (a manifest.json), ``"megatron"`` (.bin with its .idx) or ``"shard"``."""
    from xmodel.training.megatron import prefix_of

    if path.name == "manifest.json":
        return "prepared"
    if path.suffix == ".bin":
        return "megatron" if prefix_of(path) is not None else "shard"
    return "text"


def open_shard(path: Path, flag: str = "data") -> np.ndarray:
    """An xmodel token shard; a ``.bin`` in another format gets an error saying what is accepted."""
    try:
        return read_shard(path)
    except ValueError as exc:
        if "bad magic" not in str(exc):
            raise
        with open(path, "rb") as f:
            head = f.read(8)
        raise ValueError(f"--{flag}: {path} is not a token shard this trainer reads (bad magic {head!r}, and "
                         f"no {path.with_suffix('.idx').name} beside it makes it a Megatron dataset); "
                         f"{ACCEPTED}") from None


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
        return self.split_count(min(n - 1, max(1, math.ceil(fraction * n))))

    def split_count(self, tail: int) -> tuple[TokenSource, TokenSource]:
        """``(head, tail)``: the last ``tail`` windows (1 <= tail < num_windows) as the tail."""
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


def tokenize_files(files: list[Path], tokenizer, cache_dir: Path, text_field: str = "text", log=print,
                   framing=None, workers: int = 1, progress: bool = False) -> Path:
    """Tokenise text files once into ``<cache>/shards/<key>/`` (a prepared directory, see
    :mod:`xmodel.training.preprocess`; the key covers the files' names, sizes and mtimes, the text field, the
    tokenizer and the framing); returns the directory.  An interrupted run resumes where it stopped."""
    from xmodel.training.preprocess import prepare

    framing = framing or tokenizer.framing("auto")
    stats = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    key = hashlib.sha1(json.dumps([stats, text_field, tokenizer.fingerprint, framing.key(), 2]).encode()).hexdigest()
    out = Path(cache_dir) / "shards" / key[:16]
    if (out / "manifest.json").is_file():
        from xmodel.training.preprocess import read_manifest

        try:
            read_manifest(out)
            return out
        except ValueError:
            pass  # a damaged cache entry is rebuilt (finished parts are reused)
    prepare(files, tokenizer, framing, out, text_field, workers, progress=progress, log=log)
    return out


def open_prepared(directory: Path, tokenizer, framing, flag: str = "data") -> TokenStream:
    """The token stream of a prepared directory; refuses one made with another tokenizer or framing."""
    from xmodel.training.preprocess import read_manifest

    manifest = read_manifest(directory, flag)
    tok, fr = manifest["tokenizer"], manifest["framing"]
    if tokenizer is not None and tok["fingerprint"] != tokenizer.fingerprint:
        raise ValueError(f"--{flag}: {directory} was prepared with the tokenizer {tok['path']} (fingerprint "
                         f"{tok['fingerprint']}), this run uses {tokenizer.path} ({tokenizer.fingerprint}); pass "
                         f"--tokenizer {tok['path']} or prepare the data again with this tokenizer")
    if framing is not None and [fr["bos_id"], fr["eos_id"]] != framing.key():
        raise ValueError(f"--{flag}: {directory} frames documents as {fr['text']}, this run as {framing.describe()}; "
                         f"set --bos {'always' if fr['bos_id'] is not None else 'never'} to train on it as prepared, "
                         "or prepare it again with this run's --bos")
    return TokenStream([read_shard(directory / p["file"]) for p in manifest["parts"]])


def open_megatron(path: Path, tokenizer, framing, cache_dir: Path, flag: str = "data", log=print):
    """A Megatron indexed dataset as one token stream with an EOS after every document: read in place when its
    documents already end with the run's EOS (``preprocess_data.py --append-eod``), else copied once into the
    cache with EOS inserted (the document boundaries come from the ``.idx``)."""
    from xmodel.training.megatron import IndexedDataset, prefix_of

    prefix = prefix_of(path)
    try:
        ds = IndexedDataset(prefix)
    except ValueError as exc:
        raise ValueError(f"--{flag}: {exc}") from None
    if ds.num_documents == 0:
        return np.zeros(0, dtype=np.uint16)
    if (ds.tokens[:min(len(ds.tokens), 1 << 20)] < 0).any():
        raise ValueError(f"--{flag}: {ds.bin_path} holds negative token ids")
    last = ds.last_tokens()
    eos = framing.eos_id if framing is not None else None
    if eos is None:
        common = np.unique(last)
        if len(common) != 1:
            raise ValueError(f"--{flag}: the documents of {ds.bin_path} do not all end with one end-of-document "
                             "token; give --tokenizer so its EOS can be put between them")
        eos = int(common[0])
    starts_bos = framing is not None and framing.bos and bool(np.all(ds.first_tokens() == framing.bos_id))
    log(f"Megatron dataset {prefix}: {ds.num_documents:,} documents, {ds.num_tokens:,} tokens, "
        f"{'BOS + ' if starts_bos else ''}document{' + EOS' if np.all(last == eos) else ' (EOS inserted)'}")
    if framing is not None and framing.bos and not starts_bos:
        log(f"warning: this run frames text documents as {framing.describe()} but the documents of {prefix} do not "
            "all begin with BOS")
    if np.all(last == eos):
        return ds.tokens
    stat = [str(ds.bin_path.resolve()), ds.bin_path.stat().st_size, ds.bin_path.stat().st_mtime_ns,
            ds.idx_path.stat().st_mtime_ns, eos]
    out = Path(cache_dir) / "shards" / f"megatron-{hashlib.sha1(json.dumps(stat).encode()).hexdigest()[:16]}.bin"
    if out.is_file():
        try:
            return read_shard(out)
        except ValueError:
            out.unlink()
    log(f"inserting EOS between the documents of {prefix} -> {out}")
    top = int(np.max(ds.tokens)) if ds.num_tokens else 0
    writer = ShardWriter(out, token_dtype(max(top, eos) + 1))
    try:
        b = ds.doc_bounds
        for i in range(0, len(b) - 1, 65536):
            j = min(len(b) - 1, i + 65536)
            seg = np.asarray(ds.tokens[b[i]:b[j]], dtype=np.int64)
            ends = b[i + 1:j + 1] - b[i]
            need = seg[ends - 1] != eos
            writer.write(np.insert(seg, ends[need], eos))
    except BaseException:
        writer.abort()
        raise
    return read_shard(writer.close())


def load_source(spec: SourceSpec, tokenizer, cache_dir: Path, seq_len: int, flag: str = "data", log=print,
                framing=None, workers: int = 1, progress: bool = False) -> TokenSource:
    """Resolve, tokenise (cached) and window one source; errors name the flag and the path."""
    files = spec.files(flag)
    kind = file_kind(files[0])
    if kind == "text":
        if framing is None and tokenizer is not None:
            framing = tokenizer.framing("auto")
        from xmodel.training.preprocess import BadInput

        try:
            out = tokenize_files(files, tokenizer, cache_dir, spec.text_field, log, framing, workers, progress)
        except BadInput as exc:
            raise ValueError(f"--{flag}: {exc}") from None
        shards = [open_prepared(out, tokenizer, framing, flag)]
    else:
        shards = []
        for f in files:
            k = file_kind(f)
            if k == "prepared":
                shards.append(open_prepared(f.parent, tokenizer, framing, flag))
            elif k == "megatron":
                shards.append(open_megatron(f, tokenizer, framing, cache_dir, flag, log))
            else:
                shards.append(open_shard(f, flag))
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
            parts = [shard[:]] if len(shard) <= 2 * sample else [shard[:sample], shard[len(shard) - sample:]]
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


def eval_windows(sources: list[TokenSource], count: int) -> list[tuple[int, int]]:
    """``count`` distinct ``(source, window)`` pairs (at most all of them), shared round robin over the sources and
    spread evenly within each, interleaved source by source."""
    count = min(count, sum(s.num_windows for s in sources))
    per = [0] * len(sources)
    left = count
    while left:
        for k, s in enumerate(sources):
            if left and per[k] < s.num_windows:
                per[k] += 1
                left -= 1
    lists = [list(np.linspace(0, s.num_windows - 1, num=c).astype(np.int64)) if c else []
             for s, c in zip(sources, per)]
    picks: list[tuple[int, int]] = []
    for j in range(max(per, default=0)):
        picks += [(k, int(lst[j])) for k, lst in enumerate(lists) if j < len(lst)]
    return picks


def eval_batches(sources: list[TokenSource], num_batches: int, batch_size: int, rank: int = 0,
                 world: int = 1, num_windows: int | None = None) -> list[torch.Tensor]:
    """A fixed validation set: ``num_windows`` (default ``num_batches * batch_size * world``) distinct windows --
    fewer when the sources hold fewer, never a repeated one -- in global batches of ``batch_size * world``; this
    rank's rows of each.  The last batch may be smaller (the same number of rows on every rank)."""
    want = num_windows if num_windows is not None else num_batches * batch_size * world
    picks = eval_windows(sources, want)
    picks = picks[:len(picks) - len(picks) % world]
    if not picks:
        raise ValueError(f"--val-data: the validation data holds {sum(s.num_windows for s in sources)} "
                         f"sequence(s), fewer than the {world} ranks; give more validation data")
    out = []
    step = batch_size * world
    for b in range(0, len(picks), step):
        chunk = picks[b:b + step]
        per = len(chunk) // world
        rows = chunk[rank * per:(rank + 1) * per]
        out.append(torch.from_numpy(np.stack([sources[k].window(i) for k, i in rows])))
    return out
