"""Tokenising text corpora into token shards with N worker processes: the engine of ``python -m xmodel.prepare`` and
of the trainer's own tokenisation of ``--data`` text files.

**Plan.**  The inputs are cut into *tasks* that do not depend on the worker count: a ``.jsonl`` file into byte
ranges of about :func:`chunk_size` (1/64 of the input, 1-64 MiB) ending at line ends, a ``.parquet`` file into row groups of about that much
data, consecutive ``.txt`` files (one document each) into groups of about that size.  Task ``i`` writes
``parts/NNNNNN.bin`` (a token shard, see :mod:`xmodel.training.data`) and then ``parts/NNNNNN.json`` (its counts and
a key of everything that determines its content).  The token stream -- the parts in task order -- is therefore the
same whatever ``workers``, and an interrupted run redoes only the tasks without a matching ``.json``.

**Memory** is bounded by the workers' tasks (each reads one chunk, tokenises it in batches and writes as it goes),
whatever the corpus size.  Each worker's tokenizer is single-threaded: the ``tokenizers`` library's own threads,
measured on a 2-core box, made one process 1.4x *slower* (214k vs 382k tokens/s), and processes scale instead.

**Manifest.**  ``manifest.json`` is written last (atomically); a directory with it is complete.  It records the
tokenizer (path, fingerprint, ids), the document framing, the inputs and each part's token/document counts; the
trainer reads it for ``--data DIR``.

**Bad input.**  Before any work: every file must be readable and non-empty, a ``.jsonl`` file's first record must be
a JSON object with the text field, a ``.parquet`` file must have the column -- else ``ValueError`` naming the file
(or, with ``skip_bad``, the file is skipped and counted).  During the work, a line that is not UTF-8, not JSON or
without the field is an error naming the file and the line's byte offset (or a counted skip with ``skip_bad``).
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Text per task: about 1/64 of the input (so 2-16 workers stay busy to the end), within [1 MiB, 64 MiB] (per-part
# overheads, files per directory).  It depends on the inputs only, never on --workers: the same parts for any N.
MIN_CHUNK, MAX_CHUNK, CHUNKS = 1 << 20, 64 << 20, 64
BATCH_DOCS = 256  # documents per encode_batch_fast call
FORMAT = "xmodel-prepared"
VERSION = 1
TEXT_SUFFIXES = (".txt", ".jsonl", ".parquet")


class BadInput(ValueError):
    """A bad input file or record (the message names the file)."""


@dataclass(frozen=True)
class Segment:
    """Part of one input file: bytes ``[start, stop)`` of a ``.jsonl``, row groups ``[start, stop)`` of a
    ``.parquet``, or a whole ``.txt`` (``0, size``)."""

    file: int
    start: int
    stop: int


@dataclass
class Plan:
    files: list[Path]
    sizes: list[int]
    tasks: list[list[Segment]]
    task_bytes: list[int]
    skipped: list[str]  # "FILE: reason" of files skipped with skip_bad


def _check_file(path: Path, text_field: str) -> tuple[int, list[int] | None]:
    """``(size, parquet row-group byte sizes or None)``; raises :class:`BadInput` naming the file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(1 << 16)
    except OSError as exc:
        raise BadInput(f"{path}: cannot read it ({exc.strerror or exc})") from None
    if size == 0:
        raise BadInput(f"{path}: the file is empty")
    if path.suffix == ".jsonl":
        with open(path, "rb") as f:
            line = b""
            for line in f:
                if line.strip():
                    break
        if not line.strip():
            raise BadInput(f"{path}: holds only blank lines")
        record = _parse_line(path, line, 0, text_field)
        if record is None:
            raise BadInput(f"{path}: the first record has no string field {text_field!r} (choose the field with "
                           "--text-field, or text_field in the --data source)")
    elif path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise BadInput(f"{path}: reading .parquet needs pyarrow (pip install pyarrow)") from None
        try:
            meta = pq.ParquetFile(path).metadata
        except Exception as exc:  # pyarrow raises its own error types
            raise BadInput(f"{path}: not a readable parquet file ({exc})") from None
        names = meta.schema.to_arrow_schema().names
        if text_field not in names:
            raise BadInput(f"{path}: no column {text_field!r} (columns: {', '.join(names)}); choose one with "
                           "--text-field")
        col = names.index(text_field)
        return size, [max(1, meta.row_group(g).column(col).total_uncompressed_size) for g in range(meta.num_row_groups)]
    elif path.suffix == ".txt":
        try:
            head.decode("utf-8")
        except UnicodeDecodeError as exc:
            if exc.start < len(head) - 4:  # not merely a character cut by the 64 KiB read
                raise BadInput(f"{path}: not UTF-8 text (byte {exc.start})") from None
    else:
        raise BadInput(f"{path}: unsupported file type (use .txt, .jsonl or .parquet)")
    return size, None


def _parse_line(path: Path, line: bytes, offset: int, text_field: str) -> str | None:
    """The text of one ``.jsonl`` line; None when it lacks the field; raises :class:`BadInput` for bad bytes/JSON."""
    try:
        record = json.loads(line)
    except UnicodeDecodeError:
        raise BadInput(f"{path}: the line at byte {offset} is not UTF-8") from None
    except ValueError as exc:
        raise BadInput(f"{path}: the line at byte {offset} is not valid JSON ({getattr(exc, 'msg', exc)})") from None
    text = record.get(text_field) if isinstance(record, dict) else None
    return text if isinstance(text, str) else None


def chunk_size(total_bytes: int) -> int:
    return int(min(MAX_CHUNK, max(MIN_CHUNK, total_bytes // CHUNKS)))


def plan(files: list[Path], text_field: str = "text", skip_bad: bool = False,
         chunk_bytes: int | None = None) -> Plan:
    """Check every file and cut the work into tasks of ``chunk_bytes`` (default :func:`chunk_size` of the total)."""
    kept, sizes, groups, skipped = [], [], [], []
    for path in files:
        try:
            size, rg = _check_file(Path(path), text_field)
        except BadInput as exc:
            if not skip_bad:
                raise
            skipped.append(str(exc))
            continue
        kept.append(Path(path))
        sizes.append(size)
        groups.append(rg)
    if chunk_bytes is None:
        chunk_bytes = chunk_size(sum(sizes))
    tasks: list[list[Segment]] = []
    task_bytes: list[int] = []
    pending: list[Segment] = []
    pending_bytes = 0

    def flush() -> None:
        nonlocal pending, pending_bytes
        if pending:
            tasks.append(pending)
            task_bytes.append(pending_bytes)
        pending, pending_bytes = [], 0

    for i, (path, size, rg) in enumerate(zip(kept, sizes, groups)):
        if path.suffix == ".txt":  # one document: grouped with its neighbours
            if pending_bytes + size > chunk_bytes:
                flush()
            pending.append(Segment(i, 0, size))
            pending_bytes += size
            continue
        flush()
        if path.suffix == ".parquet":
            start, acc = 0, 0
            for g, b in enumerate(rg or []):
                acc += b
                if acc >= chunk_bytes:
                    tasks.append([Segment(i, start, g + 1)])
                    task_bytes.append(round(size * acc / max(1, sum(rg))))
                    start, acc = g + 1, 0
            if start < len(rg or []):
                tasks.append([Segment(i, start, len(rg))])
                task_bytes.append(round(size * acc / max(1, sum(rg))))
        else:  # .jsonl: byte ranges ending at line ends
            with open(path, "rb") as f:
                start = 0
                while start < size:
                    f.seek(min(size, start + chunk_bytes))
                    if f.tell() < size:
                        f.readline()
                    stop = min(size, f.tell())
                    tasks.append([Segment(i, start, stop)])
                    task_bytes.append(stop - start)
                    start = stop
    flush()
    return Plan(kept, sizes, tasks, task_bytes, skipped)


def iter_segment(path: Path, seg: Segment, text_field: str, skip_bad: bool, counts: dict) -> Iterator[str]:
    """The non-empty documents of one segment.  ``counts['bad']`` counts skipped records (``skip_bad``)."""
    if path.suffix == ".txt":
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as exc:
            if not skip_bad:
                raise BadInput(f"{path}: not UTF-8 text (byte {exc.start})") from None
            counts["bad"] += 1
            return
        if text.strip():
            yield text
    elif path.suffix == ".jsonl":
        with open(path, "rb") as f:
            f.seek(seg.start)
            data = f.read(seg.stop - seg.start)
        offset = seg.start
        for line in data.split(b"\n"):
            here = offset
            offset += len(line) + 1
            if not line.strip():
                continue
            try:
                text = _parse_line(path, line, here, text_field)
                if text is None:
                    raise BadInput(f"{path}: the line at byte {here} has no string field {text_field!r}")
            except BadInput:
                if not skip_bad:
                    raise
                counts["bad"] += 1
                continue
            if text.strip():
                yield text
    else:  # .parquet
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        for g in range(seg.start, seg.stop):
            for text in pf.read_row_group(g, columns=[text_field]).column(0).to_pylist():
                if isinstance(text, str):
                    if text.strip():
                        yield text
                elif text is not None:
                    if not skip_bad:
                        raise BadInput(f"{path}: row group {g} holds a non-string {text_field!r} value ({text!r:.40})")
                    counts["bad"] += 1


# ---------------------------------------------------------------------------------------------------------
# Workers
# ---------------------------------------------------------------------------------------------------------
_WORKER: dict = {}


def _init_worker() -> None:
    """Pool initializer: the tokenizer and framing come with the fork (``_WORKER`` is set before it), so no worker
    parses the tokenizer file again (about a second for a 128k-id tokenizer.json)."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per process: processes scale better (see above)


def _run_task(job: tuple) -> dict:
    """Tokenise one task into ``part`` (atomically), then write its ``.json``; returns the counts."""
    from xmodel.training.shards import ShardWriter
    from xmodel.training.tokenizer import encode_ids

    index, segments, files, text_field, skip_bad, part, key = job
    tok, bos, eos = _WORKER["tok"], _WORKER["bos"], _WORKER["eos"]
    counts = {"bad": 0}
    docs = tokens = 0
    writer = ShardWriter(Path(part), _WORKER["dtype"])
    t0 = time.perf_counter()
    counted = [0, 0]  # characters and tokens reported to the progress bar so far

    def _report(chars: int, ntok: int) -> None:
        if chars > 0:
            counted[0] += chars
            counted[1] += ntok
        live = _WORKER.get("live")
        if live is not None:
            with live.get_lock():
                live[0] += chars
                live[1] += ntok
        tick = _WORKER.get("tick")
        if tick is not None:
            tick()

    def flush(batch: list[str]) -> None:
        nonlocal docs, tokens
        ids = [enc.ids for enc in encode_ids(tok, batch)]
        arr = _framed(ids, bos, eos, writer.dtype)
        writer.write(arr)
        docs += len(batch)
        tokens += len(arr)
        _report(sum(map(len, batch)), len(arr))

    try:
        batch: list[str] = []
        for seg in segments:
            for text in iter_segment(Path(files[seg.file]), seg, text_field, skip_bad, counts):
                batch.append(text)
                if len(batch) >= BATCH_DOCS:
                    flush(batch)
                    batch = []
        if batch:
            flush(batch)
    except BaseException:
        writer.abort()
        raise
    writer.close()
    _report(-counted[0], -counted[1])  # the driver now counts this task exactly
    stats = {"key": key, "index": index, "tokens": tokens, "documents": docs, "bad": counts["bad"],
             "bytes": Path(part).stat().st_size, "seconds": round(time.perf_counter() - t0, 3)}
    _atomic_text(Path(part).with_suffix(".json"), json.dumps(stats) + "\n")
    return stats


def _framed(ids: list[list[int]], bos: int | None, eos: int, dtype: np.dtype) -> np.ndarray:
    """``[bos] + ids[0] + [eos] + [bos] + ids[1] + ...`` as one array of ``dtype``: each list is copied once, by
    numpy, straight into its slice (no Python loop over the tokens, no int64 detour)."""
    extra = 1 + (bos is not None)
    out = np.empty(sum(map(len, ids)) + extra * len(ids), dtype=dtype)
    pos = 0
    for doc in ids:
        if bos is not None:
            out[pos] = bos
            pos += 1
        out[pos:pos + len(doc)] = doc
        pos += len(doc)
        out[pos] = eos
        pos += 1
    return out


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------------
# The driver
# ---------------------------------------------------------------------------------------------------------
def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - macOS
        return max(1, os.cpu_count() or 1)


def _fmt_rate(x: float) -> str:
    return f"{x / 1e6:.2f}M" if x >= 1e6 else f"{x / 1e3:.1f}k"


def prepare(files: list[Path], tokenizer, framing, out_dir: Path, text_field: str = "text", workers: int = 0,
            skip_bad: bool = False, progress: bool = True, log: Callable[[str], None] = print,
            chunk_bytes: int | None = None) -> dict:
    """Tokenise ``files`` into ``out_dir`` (parts + ``manifest.json``); returns the manifest.  Resumable: parts whose
    ``.json`` key matches are kept.  ``workers`` 0 = one per core.  Raises :class:`BadInput` naming the file."""
    from xmodel.training.shards import read_shard, token_dtype

    out_dir = Path(out_dir)
    workers = workers or default_workers()
    t0 = time.perf_counter()
    p = plan([Path(f) for f in files], text_field, skip_bad, chunk_bytes)
    if not p.tasks:
        raise BadInput(f"no usable input among {len(files)} file(s)" + (f": {'; '.join(p.skipped)}" if p.skipped
                                                                          else ""))
    for s in p.skipped:
        log(f"skipped (--skip-bad): {s}")
    parts_dir = out_dir / "parts"
    parts_dir.mkdir(parents=True, exist_ok=True)
    manifest_path = out_dir / "manifest.json"
    if manifest_path.exists():
        manifest_path.unlink()  # rewritten when every part is done: a directory without it is incomplete
    dtype = token_dtype(tokenizer.vocab_size)
    base = [FORMAT, VERSION, tokenizer.fingerprint, framing.key(), text_field, skip_bad, str(dtype)]
    jobs, done = [], {}
    for i, segs in enumerate(p.tasks):
        ident = [[str(p.files[s.file].resolve()), p.sizes[s.file], p.files[s.file].stat().st_mtime_ns, s.start,
                  s.stop] for s in segs]
        key = hashlib.sha1(json.dumps([base, ident]).encode()).hexdigest()[:20]
        part = parts_dir / f"{i:06d}.bin"
        side = part.with_suffix(".json")
        if side.is_file() and part.is_file():
            try:
                stats = json.loads(side.read_text(encoding="utf-8"))
                if stats.get("key") == key and len(read_shard(part)) == stats["tokens"]:
                    done[i] = stats
                    continue
            except (ValueError, OSError, KeyError):
                pass  # a damaged or partly written part (or its record): tokenised again below
        side.unlink(missing_ok=True)
        jobs.append((i, segs, [str(f) for f in p.files], text_field, skip_bad, str(part), key))
    total_bytes = sum(p.task_bytes)
    reused_bytes = sum(p.task_bytes[i] for i in done)
    if done:
        log(f"resuming: {len(done)} of {len(p.tasks)} part(s) already done in {parts_dir}")
    log(f"tokenizing {len(p.files)} file(s), {total_bytes / 1e6:.1f} MB in {len(p.tasks)} part(s) with "
        f"{min(workers, max(1, len(jobs)))} worker(s) -> {out_dir}")
    bar = None
    if progress and jobs:
        from tqdm import tqdm

        bar = tqdm(total=total_bytes, initial=reused_bytes, unit="B", unit_scale=True, desc="tokenizing",
                   file=sys.stderr, dynamic_ncols=True, smoothing=0.1)
    t_work = time.perf_counter()
    new_tokens = 0
    results = dict(done)
    ctx = multiprocessing.get_context("fork")
    live = ctx.Array("q", 2)  # characters and tokens of the tasks in flight (all workers), for the bar
    finished = [reused_bytes]

    def refresh() -> None:
        if bar is None:
            return
        with live.get_lock():
            chars, toks = live[0], live[1]
        dt = max(1e-9, time.perf_counter() - t_work)
        bar.set_postfix_str(f"{_fmt_rate((new_tokens + toks) / dt)} tok/s", refresh=False)
        bar.update(max(0, min(total_bytes, finished[0] + chars) - bar.n))

    _WORKER.update(tok=tokenizer.tokenizer, bos=framing.bos_id, eos=framing.eos_id, dtype=dtype, live=live)
    saved_env = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # also keeps the fork below quiet and safe
    pool = None
    try:
        if workers == 1 or len(jobs) <= 1:
            _WORKER["tick"] = refresh  # in this process: the bar moves after every batch
            stream = map(_run_task, jobs)
        else:
            pool = ctx.Pool(min(workers, len(jobs)), _init_worker)
            stream = pool.imap_unordered(_run_task, jobs)
        left = len(jobs)
        while left:
            try:
                stats = stream.next(timeout=0.5) if pool is not None else next(stream)
            except multiprocessing.TimeoutError:
                refresh()  # the workers' in-flight progress
                continue
            left -= 1
            results[stats["index"]] = stats
            new_tokens += stats["tokens"]
            finished[0] += p.task_bytes[stats["index"]]
            refresh()
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        if bar is not None:
            bar.close()
        _WORKER.clear()
        if saved_env is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = saved_env
    for stale in parts_dir.glob("*.bin"):  # parts of an earlier, longer plan
        if stale.stem.isdigit() and int(stale.stem) >= len(p.tasks):
            stale.unlink()
            stale.with_suffix(".json").unlink(missing_ok=True)
    ordered = [results[i] for i in range(len(p.tasks))]
    seconds = time.perf_counter() - t0
    manifest = {
        "format": FORMAT, "version": VERSION,
        "tokenizer": {"path": str(Path(tokenizer.path).resolve()), "fingerprint": tokenizer.fingerprint,
                      "ids": tokenizer.vocab_size},
        "framing": {"bos_id": framing.bos_id, "eos_id": framing.eos_id, "text": framing.describe()},
        "text_field": text_field, "dtype": str(dtype),
        "inputs": [{"path": str(f.resolve()), "bytes": s} for f, s in zip(p.files, p.sizes)],
        "skipped_files": p.skipped,
        "parts": [{"file": f"parts/{i:06d}.bin", "tokens": s["tokens"], "documents": s["documents"]}
                  for i, s in enumerate(ordered)],
        "documents": sum(s["documents"] for s in ordered), "tokens": sum(s["tokens"] for s in ordered),
        "bad_records": sum(s["bad"] for s in ordered), "bytes_written": sum(s["bytes"] for s in ordered),
        "seconds": round(seconds, 2), "workers": workers,
    }
    _atomic_text(manifest_path, json.dumps(manifest, indent=1) + "\n")
    work = time.perf_counter() - t_work
    log(summary(manifest, seconds, new_tokens, work, len(done)))
    return manifest


def summary(manifest: dict, seconds: float, new_tokens: int, work_seconds: float, reused: int) -> str:
    extra = []
    if reused:
        extra.append(f"{reused} part(s) reused")
    if manifest["bad_records"]:
        extra.append(f"{manifest['bad_records']} bad record(s) skipped")
    if manifest["skipped_files"]:
        extra.append(f"{len(manifest['skipped_files'])} file(s) skipped")
    rate = new_tokens / work_seconds if work_seconds > 0 and new_tokens else 0.0
    mb = sum(i["bytes"] for i in manifest["inputs"]) / 1e6
    return (f"prepared {manifest['documents']:,} documents, {manifest['tokens']:,} tokens "
            f"({manifest['framing']['text']}) in {seconds:.1f} s: {_fmt_rate(rate)} tokens/s, "
            f"{mb / max(seconds, 1e-9):.1f} MB/s of text; wrote {manifest['bytes_written'] / 1e6:.1f} MB"
            + (f" ({', '.join(extra)})" if extra else ""))


def read_manifest(directory: Path, flag: str = "data") -> dict:
    """The manifest of a prepared directory, checked against its parts (``ValueError`` naming the directory)."""
    from xmodel.training.shards import read_shard

    directory = Path(directory)
    path = directory / "manifest.json"
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"--{flag}: cannot read {path} ({exc}); prepare the directory again with "
                         "python -m xmodel.prepare") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"--{flag}: {path} is not an xmodel prepared-data manifest")
    for part in manifest["parts"]:
        shard = read_shard(directory / part["file"])
        if len(shard) != part["tokens"]:
            raise ValueError(f"--{flag}: {directory / part['file']} holds {len(shard)} tokens, the manifest says "
                             f"{part['tokens']}; prepare the directory again")
    return manifest
