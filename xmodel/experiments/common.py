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
import datetime as _dt
import json
import os
import platform
import sys
import time
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
def width_config(width: int, param: str, preset: str = "cpu-default", head_dim: int = 64, **overrides: Any) -> XmodelConfig:
    """``preset`` at hidden size ``width`` (heads = width / head_dim, kv = heads / 2, FFN 2.5 x width).

    ``param`` is ``"mup"`` or ``"sp"``; ``overrides`` are further :class:`XmodelConfig` fields.
    """
    if param not in PARAMETRISATIONS:
        raise ValueError(f"param must be one of {PARAMETRISATIONS}, got {param!r}")
    if width % head_dim:
        raise ValueError(f"width must be a multiple of head_dim={head_dim}, got {width}")
    heads = width // head_dim
    shape = dict(
        hidden_size=width,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        intermediate_size=(5 * width) // 2,
        use_mup=param == "mup",
    )
    return XmodelConfig.from_preset(preset, **{**shape, **overrides})


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
# Output: environment, JSON, figures, command line
# --------------------------------------------------------------------------------------------------------
def environment(name: str, argv: list[str] | None = None) -> dict[str, Any]:
    """Where and with what a result of experiment ``name`` was produced (``argv``: its options, else sys.argv)."""
    argv = sys.argv[1:] if argv is None else argv
    return {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
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


def apply_threads(threads: int | None) -> None:
    if threads is not None:
        torch.set_num_threads(threads)


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
