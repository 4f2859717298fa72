"""Learning-rate transfer: final validation loss against lr at several widths, μP vs SP.

Every point is one run of the real trainer (:func:`xmodel.train.train`) on the default corpus (stdlib source +
pydoc topics, the default BPE): the ``cpu-default`` shape at each width (head_dim 64, FFN 2.5 x width), a WSD
schedule with AdamW throughout (no Muon switch, so only the lr changes), the same seed and data order everywhere.
The swept value is the base lr ``η`` on a grid of powers of 2:

* μP: embedding lr ``η``, hidden lr ``η / width_mult`` (``width_mult = width / 256``), the recipe's rule;
* SP: every lr ``η``, no μP multipliers, plain ``N(0, 0.1)`` init.

Under μP the best ``η`` should stay put as width grows (within one grid step); under SP it should drift down.
The JSON holds every final validation loss (``null`` for a diverged run), the argmin per width and its spread.

    python -m xmodel.experiments.lr_transfer --out runs/experiments/lr_transfer
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from xmodel.experiments.common import (
    LABELS,
    PARAMETRISATIONS,
    add_training_options,
    make_parser,
    pyplot,
    report,
    run_many,
    save_figure,
    torch_threads,
    train_fields,
    width_overrides,
    write_json,
)

NAME = "lr_transfer"


def argmins(losses: dict[str, dict[str, float | None]]) -> dict[str, int | None]:
    """Per width, the log2 lr of the lowest final loss (None when every run diverged)."""
    best = {}
    for width, by_lr in losses.items():
        finite = {int(k): v for k, v in by_lr.items() if v is not None and math.isfinite(v)}
        best[width] = min(finite, key=finite.get) if finite else None
    return best


def summarise(losses: dict[str, dict[str, dict[str, float | None]]]) -> dict:
    """Per parametrisation: argmin per width, and how many grid steps apart the widths' argmins lie."""
    summary = {}
    for param, by_width in losses.items():
        best = argmins(by_width)
        grid = sorted({int(k) for by_lr in by_width.values() for k in by_lr})
        found = [grid.index(b) for b in best.values() if b is not None]
        summary[param] = {
            "argmin_log2_lr": best,
            "argmin_lr": {w: (2.0**b if b is not None else None) for w, b in best.items()},
            "argmin_spread_grid_steps": (max(found) - min(found)) if found else None,
            "best_loss": {w: min((v for v in by_width[w].values() if v is not None), default=None) for w in by_width},
        }
    return summary


def run(out: Path, widths: list[int], lrs_log2: list[int], fields: dict, argv: list[str] | None, quick: bool,
        jobs: int = 1) -> dict:
    losses: dict[str, dict[str, dict[str, float | None]]] = {p: {str(w): {} for w in widths} for p in PARAMETRISATIONS}
    walls: dict[str, float | None] = {}
    tasks, keys = [], {}
    for width in widths:  # narrow first: an interrupted sweep still has complete small widths
        for param in PARAMETRISATIONS:
            for e in lrs_log2:
                lr = 2.0**e
                model = {**fields.get("model", {}), **width_overrides(width, param)}
                name = f"{param}_w{width}_lr2^{e}"
                tasks.append((name, {**fields, "model": model, "init": "hf", "lr_embed": lr,
                                     "lr": None if param == "mup" else lr, "decay_optimizer": "adamw"}))
                keys[name] = (param, width, e)
    start = time.perf_counter()
    payload: dict = {}
    for done, (name, result) in enumerate(run_many(out, tasks, jobs), 1):
        param, width, e = keys[name]
        loss = result["final_val_loss"] if result is not None else None
        losses[param][str(width)][str(e)] = loss
        walls[name] = result["wall_s"] if result is not None else None
        shown = f"{loss:.4f}" if loss is not None else "diverged"
        print(f"[{NAME}] {done:3d}/{len(tasks)} {LABELS[param]:>2} width {width:4d} lr 2^{e:<3d} ({2.0**e:.2e}): "
              f"val loss {shown}" + (f"  ({walls[name]:.0f}s)" if walls[name] is not None else ""), flush=True)
        payload = {
            "setup": {"widths": widths, "lrs_log2": lrs_log2, **_describe(fields), "jobs": jobs},
            "final_val_loss": losses,
            "summary": summarise(losses),
            "run_seconds": walls,
            "total_seconds": round(time.perf_counter() - start, 1),
            "complete": done == len(tasks),
            "quick": quick,
        }
        write_json(out, NAME, payload, argv)  # after every run: partial results survive an interruption
    return payload


def _describe(fields: dict) -> dict:
    keys = ("preset", "steps", "warmup", "decay", "decay_shape", "batch_size", "seq_len", "eval_batches", "seed",
            "vocab_size", "corpus_max_mb", "weight_decay", "grad_clip")
    return {"train": {k: fields[k] for k in keys if k in fields}, "init": "hf",
            "optimizer": "AdamW throughout (decay_optimizer=adamw)",
            "lr_rule": {"mup": "embedding lr = η, hidden lr = η / (width / 256)", "sp": "every lr = η"}}


def plot(payload: dict, out: Path) -> Path:
    plt = pyplot()
    widths = payload["setup"]["widths"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    cmap = plt.get_cmap("plasma")
    finite = [v for p in PARAMETRISATIONS for w in widths for v in payload["final_val_loss"][p][str(w)].values()
              if v is not None]
    top = max(finite, default=1.0) + 0.05
    for ax, param in zip(axes, PARAMETRISATIONS):
        summary = payload["summary"][param]
        for i, width in enumerate(widths):
            by_lr = payload["final_val_loss"][param][str(width)]
            xs = sorted(int(k) for k in by_lr)
            pts = [(2.0**x, by_lr[str(x)]) for x in xs if by_lr[str(x)] is not None]
            color = cmap(i / max(len(widths) - 1, 1) * 0.85)
            if pts:
                ax.plot(*zip(*pts), marker="o", color=color, label=f"width {width}")
            best = summary["argmin_log2_lr"].get(str(width))
            if best is not None:
                ax.plot([2.0**best], [by_lr[str(best)]], marker="*", ms=16, color=color, mec="black")
            diverged = [2.0**x for x in xs if by_lr[str(x)] is None]
            if diverged:
                ax.plot(diverged, [top] * len(diverged), "x", color=color, ms=9)
        ax.set_xscale("log", base=2)
        spread = summary["argmin_spread_grid_steps"]
        ax.set_title(f"{LABELS[param]}: best lr moves {spread} grid step(s) across widths")
        ax.set_xlabel("base lr η (μP: embedding η, hidden η/width_mult)" if param == "mup" else "lr η (all parameters)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("final validation loss")
    axes[0].legend()
    t = payload["setup"]["train"]
    fig.suptitle(f"lr transfer: {t.get('steps')} steps x {t.get('batch_size')}x{t.get('seq_len')} tokens, WSD + AdamW, "
                 "default corpus (★ = best per width, x = diverged)", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, out, f"{NAME}.png")


def main(argv: list[str] | None = None) -> dict:
    parser = make_parser(NAME, "lr sweep at several widths, μP vs SP (final validation loss)")
    parser.add_argument("--widths", type=int, nargs="+", default=[64, 128, 256, 512])
    parser.add_argument("--lrs", type=int, nargs="+", default=list(range(-10, -3)),
                        help="log2 of the base lr grid (default -10 ... -4)")
    add_training_options(parser, steps=100, seq=64)
    args = parser.parse_args(argv)
    if args.quick:
        args.widths, args.lrs = [64, 128], [-7, -4]
    fields = train_fields(args)
    with torch_threads(args):
        payload = run(args.out, sorted(args.widths), sorted(args.lrs), fields, argv, args.quick, args.jobs)
    paths = [write_json(args.out, NAME, payload, argv), plot(payload, args.out)]
    report(NAME, paths)
    return payload


if __name__ == "__main__":
    main()
