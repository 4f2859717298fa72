"""Tokenising throughput: ``python -m xmodel.prepare`` side by side with Megatron-LM's ``tools/preprocess_data.py``
(same file, same tokenizer, same worker count), in alternating rounds, plus a token-for-token comparison.

    python -m benchmarks.bench_prepare --input corpus.jsonl --tokenizer DIR [--megatron PATH] [--workers 1,2]
        [--rounds 2]

``--megatron``: a Megatron-LM checkout (``fetch github:NVIDIA/Megatron-LM``; its code is run, not copied).  It is
put on ``PYTHONPATH`` together with ``--shim`` (a directory with a ``sitecustomize.py``, e.g. one that defines
``typing.override`` on Python 3.11).  Megatron runs with ``--tokenizer-type HuggingFaceTokenizer --append-eod``.

Timing: each command runs as a subprocess; the clock starts when the tool says it begins the work (ours: the
"tokenizing ..." line, Megatron: "Time to startup") and stops when the process exits, so the imports (Megatron's
take ~20 s) are not counted for either.  CPU time: user + system seconds of the tool's whole process tree over the
same span (its children's rusage at exit less the tree's CPU time read from ``/proc`` at the marker), which on a busy
shared box is steadier than wall time.  Tokens: ours from ``manifest.json``, Megatron's from its ``.idx``.  Run
this on an idle machine; on a shared box compare only the paired rounds and report the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _tree_cpu(root: int) -> float:
    """CPU seconds (user + system, including waited-for children) used so far by process ``root`` and every live
    process below it, read from ``/proc`` (0.0 where there is no ``/proc``)."""
    kids: dict[int, list[int]] = {}
    cpu: dict[int, int] = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited meanwhile
        kids.setdefault(int(fields[1]), []).append(int(entry))  # fields[1]: the parent's pid
        cpu[int(entry)] = sum(int(x) for x in fields[11:15])  # utime, stime, cutime, cstime (clock ticks)
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += cpu.get(pid, 0)
        todo += kids.get(pid, [])
    return total / os.sysconf("SC_CLK_TCK")


def timed(cmd: list[str], marker: str, env: dict) -> tuple[float, float, float]:
    """Seconds from the line containing ``marker`` to the process exit, from the start to the exit, and the CPU
    seconds (user + system) that the process and all its children used between the marker and the exit: the
    children's rusage at the end less the process tree's CPU time read from ``/proc`` at the marker."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    start = None
    cpu_at_start = 0.0
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if start is None and marker in line:
            start = time.perf_counter()
            cpu_at_start = _tree_cpu(proc.pid)
    if proc.wait() != 0 or start is None:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{''.join(lines[-20:])}")
    end = time.perf_counter()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime) - cpu_at_start
    return end - start, end - t0, cpu


def run_ours(inp: Path, tokenizer: str, workers: int, out: Path) -> tuple[tuple[float, float, float], int]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    secs = timed([sys.executable, "-m", "xmodel.prepare", str(inp), "--tokenizer", tokenizer, "--out", str(out),
                  "--workers", str(workers), "--no-progress"], "tokenizing", env)
    return secs, json.loads((out / "manifest.json").read_text())["tokens"]


def run_megatron(inp: Path, tokenizer: str, workers: int, prefix: Path, megatron: Path, shim: Path | None
                 ) -> tuple[tuple[float, float, float], int]:
    from xmodel.training.megatron import IndexedDataset

    path = os.pathsep.join(str(p) for p in (shim, megatron) if p)
    env = {**os.environ, "PYTHONPATH": path}
    secs = timed([sys.executable, str(megatron / "tools" / "preprocess_data.py"), "--input", str(inp),
                  "--output-prefix", str(prefix), "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model",
                  tokenizer, "--workers", str(workers), "--append-eod", "--log-interval", "100000000"],
                 "Time to startup", env)
    return secs, IndexedDataset(Path(f"{prefix}_text_document")).num_tokens


def same_tokens(ours: Path, prefix: Path) -> tuple[int, int]:
    """(documents equal, documents) between our stream and Megatron's documents."""
    import numpy as np

    from xmodel.training.data import open_prepared
    from xmodel.training.megatron import IndexedDataset

    stream = np.asarray(open_prepared(ours, None, None)[:], dtype=np.int64)
    ds = IndexedDataset(Path(f"{prefix}_text_document"))
    manifest = json.loads((ours / "manifest.json").read_text())
    eos = manifest["framing"]["eos_id"]
    ends = np.flatnonzero(stream == eos) + 1
    starts = np.concatenate([[0], ends[:-1]])
    equal = sum(int(np.array_equal(stream[a:b], ds.document(i)))
                for i, (a, b) in enumerate(zip(starts, ends)) if i < ds.num_documents)
    return equal, ds.num_documents


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", required=True, type=Path)
    parser.add_argument("--tokenizer", required=True, help="directory with tokenizer.json (+ tokenizer_config.json)")
    parser.add_argument("--megatron", type=Path, default=None, help="a Megatron-LM checkout (omit: ours only)")
    parser.add_argument("--shim", type=Path, default=None, help="a directory put first on Megatron's PYTHONPATH")
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    workers = [int(w) for w in args.workers.split(",")]
    mb = args.input.stat().st_size / 1e6
    print(f"input {args.input} ({mb:.1f} MB), tokenizer {args.tokenizer}, load average {os.getloadavg()[0]:.1f}")
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="bench-prepare-"))
    try:
        for r in range(args.rounds):
            for w in workers:
                order = ["ours", "megatron"] if r % 2 == 0 else ["megatron", "ours"]  # alternate who goes first
                for tool in order if args.megatron else ["ours"]:
                    out = tmp / f"{tool}-{r}-{w}"
                    if tool == "ours":
                        (secs, wall, cpu), tokens = run_ours(args.input, args.tokenizer, w, out)
                    else:
                        (secs, wall, cpu), tokens = run_megatron(args.input, args.tokenizer, w, out, args.megatron,
                                                                 args.shim)
                    rows.append((tool, r, w, secs, tokens, cpu))
                    print(f"round {r} {tool:<8} workers {w}: {tokens:,} tokens in {secs:.1f} s = "
                          f"{tokens / secs / 1e3:.0f}k tok/s, {mb / secs:.2f} MB/s; {cpu:.1f} CPU-s = "
                          f"{tokens / max(cpu, 1e-9) / 1e3:.0f}k tok/CPU-s; {wall:.1f} s with the "
                          f"start-up (load {os.getloadavg()[0]:.1f})", flush=True)
        if args.megatron:
            equal, docs = same_tokens(tmp / f"ours-0-{workers[0]}", tmp / f"megatron-0-{workers[0]}")
            print(f"token ids equal in {equal:,} of {docs:,} documents")
        print("\npaired rounds (tokens/s; ratio = ours / Megatron in the same round, same worker count):")
        rate = {(name, r, w): t / secs for name, r, w, secs, t, _ in rows}
        per_cpu = {(name, r, w): t / max(cpu, 1e-9) for name, r, w, _, t, cpu in rows}
        for w in workers:
            for r in range(args.rounds):
                ours = rate[("ours", r, w)]
                line = f"  workers {w} round {r}: ours {ours / 1e3:.0f}k"
                if args.megatron:
                    theirs = rate[("megatron", r, w)]
                    line += f", megatron {theirs / 1e3:.0f}k, ratio {ours / theirs:.2f}x"
                    line += (f"; per CPU-s ours {per_cpu[('ours', r, w)] / 1e3:.0f}k, megatron "
                             f"{per_cpu[('megatron', r, w)] / 1e3:.0f}k, ratio "
                             f"{per_cpu[('ours', r, w)] / per_cpu[('megatron', r, w)]:.2f}x")
                print(line)
        if len(workers) > 1:
            for r in range(args.rounds):
                print(f"  ours round {r}: {workers[0]} -> {workers[-1]} workers "
                      f"x{rate[('ours', r, workers[-1])] / rate[('ours', r, workers[0])]:.2f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
