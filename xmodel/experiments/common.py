"""Shared pieces of the experiments: width-swept model configs, the two parametrisations, output writing, plots.

Width sweeps keep everything but the width fixed: ``head_dim`` 64 (heads = width / 64, kv heads = heads / 2),
FFN 2.5 x width (the recipe's ratio), the depth and vocabulary of the base preset.

The two parametrisations compared everywhere:

* ``"mup"`` -- the recipe: ``use_mup=True`` (embedding x 12, residual branches x 1.4/sqrt(L), softmax 1/head_dim,
  logits / width_mult), init std ``0.1 / sqrt(width_mult)`` for hidden matrices, embedding lr ``lr_embed`` and
  hidden lr ``lr_embed / width_mult``.
* ``"sp"`` -- standard parametrisation: ``use_mup=False`` (no multipliers, softmax 1/sqrt(head_dim)), every
  weight ``N(0, 0.1)`` whatever the width, one lr for every parameter.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import math
import os
import platform
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from xmodel.config import XmodelConfig
from xmodel.model import Xmodel

PARAMETRISATIONS = ("mup", "sp")
LABELS = {"mup": "μP", "sp": "SP"}
DEFAULT_OUT = Path("runs") / "experiments"


# --------------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------------
def width_overrides(width: int, param: str, head_dim: int = 64) -> dict[str, Any]:
    """:class:`XmodelConfig` fields for hidden size ``width`` (heads = width / head_dim, kv = heads / 2,
    FFN 2.5 x width) in parametrisation ``param`` (``"mup"`` or ``"sp"``)."""
    if param not in PARAMETRISATIONS:
        raise ValueError(f"param must be one of {PARAMETRISATIONS}, got {param!r}")
    if width % head_dim:
        raise ValueError(f"width must be a multiple of head_dim={head_dim}, got {width}")
    heads = width // head_dim
    return {
        "hidden_size": width,
        "num_attention_heads": heads,
        "num_key_value_heads": max(1, heads // 2),
        "intermediate_size": (5 * width) // 2,
        "use_mup": param == "mup",
    }


def width_config(width: int, param: str, preset: str = "cpu-default", head_dim: int = 64, **overrides: Any) -> XmodelConfig:
    """``preset`` with :func:`width_overrides` and further :class:`XmodelConfig` field ``overrides``."""
    return XmodelConfig.from_preset(preset, **{**width_overrides(width, param, head_dim), **overrides})


def build_model(config: XmodelConfig, seed: int, init: str = "hf") -> Xmodel:
    """An fp32 CPU model initialised with ``init`` from a generator seeded with ``seed``.

    Without μP, ``init_weights`` uses width_mult = 1, i.e. every weight ``N(0, initializer_range)`` (plain SP init).
    """
    with torch.device("meta"):
        model = Xmodel(config)
    model.to_empty(device="cpu")
    model.init_weights(scheme=init, generator=torch.Generator().manual_seed(seed))
    return model


def learning_rates(config: XmodelConfig, lr: float) -> tuple[float, float]:
    """``(hidden lr, embedding lr)`` for base lr ``lr``: μP ``(lr / width_mult, lr)``, SP ``(lr, lr)``."""
    if config.use_mup:
        return lr / config.mup_width_multiplier, lr
    return lr, lr


# --------------------------------------------------------------------------------------------------------
# Training runs through the real trainer (xmodel.train)
# --------------------------------------------------------------------------------------------------------
class Diverged(RuntimeError):
    """A training run stopped on non-finite losses."""


def train_run(out_dir: Path, name: str, **fields: Any) -> dict[str, Any]:
    """Run :func:`xmodel.train.train` with ``TrainConfig`` ``fields`` in ``<out_dir>/runs/<name>`` (a fresh run).

    The trainer's output goes to ``<out_dir>/runs/<name>.log``; its checkpoints are deleted afterwards.  Returns
    ``{"final_val_loss", "train": [(step, loss)...], "val": [(step, val_loss)...], "wall_s", "events"}``.
    Raises :class:`Diverged` when the trainer stops on non-finite steps.
    """
    import shutil

    from xmodel.train import TrainingError, train
    from xmodel.training.config import TrainConfig
    from xmodel.training.metrics import read_metrics

    runs = out_dir / "runs"
    run_dir = runs / name
    if run_dir.exists():
        shutil.rmtree(run_dir)
    runs.mkdir(parents=True, exist_ok=True)
    settings = {"save_every": 0, "keep_last": 1, "export_hf": False, "progress": False, "resume": "never"}
    cfg = TrainConfig(name=name, out_dir=str(runs), **{**settings, **fields})
    log_path = runs / f"{name}.log"
    start = time.perf_counter()
    try:
        with open(log_path, "w", encoding="utf-8") as log, contextlib.redirect_stdout(log):
            train(cfg)
    except TrainingError as exc:
        raise Diverged(str(exc)) from None
    finally:
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    wall = time.perf_counter() - start
    records = read_metrics(run_dir / "metrics.jsonl")
    train_curve = [(r["step"], r["loss"]) for r in records if r["kind"] == "train"]
    val_curve = [(r["step"], r["val_loss"]) for r in records if r["kind"] == "eval"]
    events = [{k: v for k, v in r.items() if k not in ("kind", "config", "params")} for r in records
              if r["kind"] == "event" and r["event"] not in ("start", "end")]
    return {"final_val_loss": val_curve[-1][1], "train": train_curve, "val": val_curve, "wall_s": round(wall, 1),
            "events": events}


def _worker_init(threads: int) -> None:
    torch.set_num_threads(threads)


def _train_task(out_dir: Path, name: str, fields: dict[str, Any]) -> dict[str, Any] | None:
    try:
        return train_run(out_dir, name, **fields)
    except Diverged:
        return None


def run_many(out_dir: Path, tasks: list[tuple[str, dict[str, Any]]], jobs: int = 1
             ) -> Iterator[tuple[str, dict[str, Any] | None]]:
    """:func:`train_run` each ``(name, fields)``; yields ``(name, result)`` as runs finish (``None``: diverged).

    ``jobs > 1`` runs that many at once in worker processes with one torch thread each (on a CPU, small models
    train faster as parallel single-threaded runs than one after another on all cores).  Every run is seeded on its
    own, so ``jobs`` changes no result beyond fp32 summation order (a different thread count can move last digits).
    """
    if jobs <= 1:
        for name, fields in tasks:
            yield name, _train_task(out_dir, name, fields)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    ctx = multiprocessing.get_context("spawn")  # no fork of a process that already runs torch threads
    with ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_worker_init, initargs=(1,)) as pool:
        futures = {pool.submit(_train_task, out_dir, name, fields): name for name, fields in tasks}
        for future in as_completed(futures):
            yield futures[future], future.result()


# --------------------------------------------------------------------------------------------------------
# Data that needs no tokenizer: the bytes of the Python standard library's source
# --------------------------------------------------------------------------------------------------------
def stdlib_bytes(num_tokens: int, skip: int = 0) -> torch.Tensor:
    """``num_tokens`` byte values (0..255, int64) of the stdlib ``.py`` files in sorted path order, after ``skip``."""
    root = Path(os.__file__).parent
    need = skip + num_tokens
    chunks, have = [], 0
    for path in sorted(root.glob("*.py")):
        data = path.read_bytes()
        chunks.append(data)
        have += len(data)
        if have >= need:
            break
    if have < need:
        raise RuntimeError(f"the stdlib sources hold only {have} bytes, {need} needed")
    buf = b"".join(chunks)[skip:need]
    return torch.frombuffer(bytearray(buf), dtype=torch.uint8).to(torch.int64)


# --------------------------------------------------------------------------------------------------------
# Statistics of paired differences
# --------------------------------------------------------------------------------------------------------
def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b) by its continued fraction (modified Lentz), to ~1e-14."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    if x > (a + 1.0) / (a + b + 2.0):  # the fraction converges fast only below the mean: use the symmetry
        return 1.0 - _betainc(b, a, 1.0 - x)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)) / a
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    f = d
    for m in range(1, 500):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            f *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return front * f


def t_cdf(x: float, df: int) -> float:
    """Student's t distribution function with ``df`` degrees of freedom."""
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + x * x))
    return 1.0 - tail if x >= 0 else tail


def t_quantile(p: float, df: int) -> float:
    """Quantile ``p`` of Student's t with ``df`` degrees of freedom (bisection on :func:`t_cdf`, to ~1e-12; pure
    Python so every environment gives the same interval -- no scipy needed)."""
    if df < 1:
        raise ValueError(f"df must be >= 1, got {df}")
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        lo, hi = hi, 2.0 * hi
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


def paired_summary(diffs: list[float], level: float = 0.95, power: float = 0.8) -> dict[str, Any]:
    """Mean, sample sd, standard error and two-sided ``level`` t-interval of paired differences ``diffs`` (one per
    seed), how many are negative, and the minimum detectable effect: the true mean difference a two-sided test at
    ``1 - level`` would detect with probability ``power`` given this standard error, ``(t_{1-a/2} + t_power) * SE``.

    ``se_ok``: the standard error is at most a third of the absolute mean (the precision the experiments aim for).
    """
    import statistics

    n = len(diffs)
    mean = statistics.fmean(diffs) if n else float("nan")
    out: dict[str, Any] = {"n": n, "mean": mean, "sd": None, "se": None, "ci": None, "mde": None,
                           "negative": sum(d < 0 for d in diffs), "se_ok": None, "level": level}
    if n >= 2:
        sd = statistics.stdev(diffs)
        se = sd / n**0.5
        t = t_quantile(0.5 + level / 2, n - 1)
        out.update(sd=sd, se=se, ci=[mean - t * se, mean + t * se], t=t,
                   mde=(t + t_quantile(power, n - 1)) * se, se_ok=bool(se <= abs(mean) / 3))
    return out


def seeds_needed(sd: float, effect: float, ratio: float = 3.0) -> int:
    """Seeds for a standard error of at most ``|effect| / ratio`` when paired differences have sd ``sd``."""
    if effect == 0:
        return 10**9
    return max(2, math.ceil((ratio * sd / abs(effect)) ** 2 - 1e-9))


# --------------------------------------------------------------------------------------------------------
# Output: environment, JSON, figures, command line
# --------------------------------------------------------------------------------------------------------
def environment(name: str, argv: list[str] | None = None) -> dict[str, Any]:
    """Where and with what a result of experiment ``name`` was produced (``argv``: its options, else sys.argv)."""
    argv = sys.argv[1:] if argv is None else argv
    return {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),  # noqa: UP017 (3.10)
        "command": " ".join([f"python -m xmodel.experiments.{name}", *map(str, argv)]),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def write_json(out_dir: Path, name: str, payload: dict[str, Any], argv: list[str] | None = None) -> Path:
    """Write ``<out_dir>/<name>.json`` (``payload`` plus an ``environment`` entry) and return its path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    body = {"experiment": name, **payload, "environment": environment(name, argv)}
    path.write_text(json.dumps(body, indent=2, sort_keys=False, default=_json_default) + "\n", encoding="utf-8")
    return path


def _json_default(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def pyplot():
    """matplotlib's pyplot on the non-interactive Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, out_dir: Path, filename: str) -> Path:
    """Save ``fig`` as a PNG in ``out_dir``, close it, return the path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / filename
    fig.savefig(path, dpi=110, bbox_inches="tight")
    pyplot().close(fig)
    return path


def make_parser(name: str, description: str) -> argparse.ArgumentParser:
    """The options every experiment takes: ``--out``, ``--quick``, ``--seed``, ``--threads``."""
    parser = argparse.ArgumentParser(prog=f"python -m xmodel.experiments.{name}", description=description)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT / name, help="output directory (JSON + PNG)")
    parser.add_argument("--quick", action="store_true", help="a tiny version for CI (seconds, not minutes)")
    parser.add_argument("--seed", type=int, default=0, help="seed of init and data order")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    return parser


def add_training_options(parser: argparse.ArgumentParser, steps: int, batch: int = 8, seq: int = 128) -> None:
    """Options of experiments that train with :mod:`xmodel.train` (the run shape and the default corpus)."""
    g = parser.add_argument_group("training runs (xmodel.train)")
    g.add_argument("--steps", type=int, default=steps, help="optimizer steps per run")
    g.add_argument("--batch", type=int, default=batch, help="sequences per step")
    g.add_argument("--seq", type=int, default=seq, help="tokens per sequence")
    g.add_argument("--warmup", type=float, default=0.1, help="warmup: fraction of --steps")
    g.add_argument("--decay", type=float, default=0.2, help="decay: fraction of --steps (WSD, exponential, to peak/16)")
    g.add_argument("--eval-batches", type=int, default=8, help="validation micro-batches at the end of each run")
    g.add_argument("--preset", default="cpu-default", help="XmodelConfig preset")
    g.add_argument("--vocab", type=int, default=4096, help="default BPE vocabulary (= the model's vocab_size)")
    g.add_argument("--corpus-mb", type=float, default=6.0, help="size cap of the default corpus (MB)")
    g.add_argument("--cache-dir", default=None, help="corpus/tokenizer/shard cache (default: the trainer's)")
    g.add_argument("--jobs", type=int, default=1, help="runs at once, each in its own process with 1 thread")


def train_fields(args: argparse.Namespace) -> dict[str, Any]:
    """``TrainConfig`` fields from :func:`add_training_options`; ``--quick`` shrinks them to a seconds-long run."""
    model: dict[str, Any] = {"vocab_size": args.vocab}
    if args.quick:  # a small corpus and tokenizer, a 2-layer width-64 model, a tiny batch, three steps
        args.steps, args.batch, args.seq, args.eval_batches = 3, 2, 32, 1
        args.vocab, args.corpus_mb = 512, 0.2
        model = {"vocab_size": args.vocab, "num_hidden_layers": 2, **width_overrides(64, "mup")}
    return {
        "preset": args.preset, "model": model, "seed": args.seed, "steps": args.steps, "batch_size": args.batch,
        "seq_len": args.seq, "warmup": float(args.warmup), "decay": float(args.decay),
        "eval_batches": args.eval_batches, "eval_every": 0, "vocab_size": args.vocab,
        "corpus_max_mb": args.corpus_mb, "cache_dir": args.cache_dir,
    }


@contextlib.contextmanager
def torch_threads(args: argparse.Namespace) -> Iterator[None]:
    """Run with ``--threads`` CPU threads (``--quick``: 1, as tiny ops only pay thread synchronisation); restore after."""
    threads = args.threads if args.threads is not None else (1 if args.quick else None)
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class Timer:
    """``with Timer() as t: ...; t.seconds``."""

    def __enter__(self) -> Timer:
        self.start = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.start


def report(name: str, paths: list[Path]) -> None:
    """Print where the outputs went."""
    print(f"[{name}] wrote:")
    for p in paths:
        print(f"  {p}")
