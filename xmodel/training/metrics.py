"""Progress bar, ``metrics.jsonl``, MFU and the end-of-run plot (rank 0 only; other ranks get no-op loggers).

``metrics.jsonl`` has one JSON object per line, with ``kind``:

* ``"train"`` -- ``step`` (completed optimizer steps), ``loss``, ``lr`` (peak-lr group ``matrix``), ``lr_embed``,
  ``grad_norm``, ``tokens`` (seen so far), ``tok_per_s``, ``flops_per_s``, ``mfu`` (or null), ``phase``
* ``"eval"``  -- ``step``, ``val_loss``
* ``"event"`` -- ``step``, ``event`` (``start``, ``resume``, ``switch_to_muon``, ``nonfinite``, ``stop``, ``end``), details
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch

# Dense bf16 peak FLOP/s (no sparsity) of common accelerators, for MFU.
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "H800": 989e12,
    "A100": 312e12,
    "A800": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
    "A10": 125e12,
    "4090": 165e12,
}


def peak_flops(device: torch.device, override: float | None = None) -> float | None:
    """Peak FLOP/s for MFU: the override, else a known GPU's bf16 dense peak, else None (CPU: MFU not reported)."""
    if override:
        return float(override)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_FLOPS.items():
        if key in name:
            return value
    return None


class MetricsLogger:
    """Writes ``metrics.jsonl`` and drives the tqdm bar; a disabled logger (non-zero ranks) does nothing."""

    def __init__(self, run_dir: Path | None, total_steps: int, start_step: int, enabled: bool, progress: bool,
                 flops_per_token: float, peak: float | None, append: bool = True):
        self.enabled = enabled
        self.flops_per_token = flops_per_token
        self.peak = peak
        self.bar = None
        self.file = None
        self.last_time = time.perf_counter()
        if not enabled:
            return
        assert run_dir is not None
        self.path = Path(run_dir) / "metrics.jsonl"
        # a resumed run appends (the plot keeps each step's last record); a fresh start replaces a failed attempt's
        if append and self.path.is_file() and self.path.stat().st_size:
            with open(self.path, "rb") as f:  # a process killed mid-line left no newline: end that line first
                f.seek(-1, 2)
                torn = f.read(1) != b"\n"
        else:
            torn = False
        self.file = open(self.path, "a" if append else "w", encoding="utf-8")
        if torn:
            self.file.write("\n")
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                            desc="train", smoothing=0.1)

    def write(self, record: dict[str, Any]) -> None:
        if self.file is not None:
            self.file.write(json.dumps(record, default=float) + "\n")
            self.file.flush()

    def event(self, step: int, event: str, **details: Any) -> None:
        self.write({"kind": "event", "step": step, "event": event, **details})

    def message(self, text: str) -> None:
        """Print without breaking the bar."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def train(self, step: int, loss: float, lr: float, lr_embed: float, grad_norm: float, tokens: int,
              step_tokens: int, phase: str, write: bool) -> None:
        now = time.perf_counter()
        dt, self.last_time = now - self.last_time, now
        tok_s = step_tokens / dt if dt > 0 else 0.0
        flops = tok_s * self.flops_per_token
        mfu = flops / self.peak if self.peak else None
        if write:
            self.write({"kind": "train", "step": step, "loss": loss, "lr": lr, "lr_embed": lr_embed,
                        "grad_norm": grad_norm, "tokens": tokens, "tok_per_s": tok_s, "flops_per_s": flops,
                        "mfu": mfu, "phase": phase})
        if self.bar is not None:
            post = {"loss": f"{loss:.3f}", "lr": f"{lr:.2e}", "tok/s": f"{tok_s:,.0f}", "phase": phase}
            if mfu is not None:
                post["mfu"] = f"{100 * mfu:.1f}%"
            self.bar.set_postfix(post, refresh=False)
            self.bar.update(1)

    def reset_clock(self) -> None:
        """Exclude eval/checkpoint time from the next step's throughput."""
        self.last_time = time.perf_counter()

    def eval(self, step: int, val_loss: float) -> None:
        self.write({"kind": "eval", "step": step, "val_loss": val_loss})
        self.message(f"step {step}: val loss {val_loss:.4f}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.file is not None:
            self.file.close()
            self.file = None


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl``; a line cut short by a killed process is skipped."""
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
    return records


def plot_metrics(metrics_path: Path, out_png: Path) -> Path:
    """Train/val loss and learning rate versus step (a resumed run's repeated steps keep their last value)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train: dict[int, dict] = {}
    evals: dict[int, float] = {}
    switches = []
    for r in read_metrics(metrics_path):
        if r["kind"] == "train" and math.isfinite(r["loss"]):
            train[r["step"]] = r
        elif r["kind"] == "eval":
            evals[r["step"]] = r["val_loss"]
        elif r["kind"] == "event" and r["event"] == "switch_to_muon":
            switches.append(r["step"])
    steps = sorted(train)
    fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, height_ratios=[2, 1])
    ax_loss.plot(steps, [train[s]["loss"] for s in steps], lw=1, alpha=0.8, label="train loss")
    if evals:
        es = sorted(evals)
        ax_loss.plot(es, [evals[s] for s in es], "o-", lw=1.5, label="val loss")
    ax_loss.set_ylabel("loss")
    ax_loss.grid(alpha=0.3)
    ax_lr.plot(steps, [train[s]["lr"] for s in steps], label="lr")
    ax_lr.plot(steps, [train[s]["lr_embed"] for s in steps], "--", label="lr (embedding)")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("step")
    ax_lr.grid(alpha=0.3)
    for s in switches[:1]:
        for ax in (ax_loss, ax_lr):
            ax.axvline(s, color="gray", ls=":", lw=1)
        ax_lr.annotate("AdamW -> Muon", (s, ax_lr.get_ylim()[1]), fontsize=8, ha="left", va="top")
    ax_loss.legend()
    ax_lr.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
