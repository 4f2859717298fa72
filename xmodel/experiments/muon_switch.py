"""The Muon switch: the same WSD run with AdamW throughout vs AdamW then Muon from the decay start.

Both arms are runs of the real trainer (:func:`xmodel.train.train`) with identical config, seed, init and data
order; only ``decay_optimizer`` differs (``"adamw"`` / ``"muon"``).  In the Muon arm the hidden matrices (q/k/v/o,
gate/up/down) move to :class:`xkernels.optim.Muon` at the decay start (momentum 0.95, Nesterov, 5 Newton–Schulz
steps, lr matched to AdamW's RMS, same schedule and weight decay); embedding and norms stay on AdamW.  The recipe's
μP model (``cpu-default``, megatron init, embedding lr 0.01, hidden lr 0.01 / width_mult) on the default corpus.

Reported per seed: final validation loss of each arm and their difference (Muon - AdamW; negative = Muon better),
with the mean and standard deviation over seeds.

    python -m xmodel.experiments.muon_switch --out runs/experiments/muon_switch
"""

from __future__ import annotations

import itertools
import statistics
import time
from pathlib import Path

from xmodel.experiments.common import (
    add_training_options,
    make_parser,
    pyplot,
    report,
    run_many,
    save_figure,
    torch_threads,
    train_fields,
    write_json,
)

NAME = "muon_switch"
ARMS = {"adamw": "AdamW throughout", "muon": "AdamW → Muon at decay start"}


def _ema(values: list[float], beta: float = 0.9) -> list[float]:
    out, m = [], None
    for v in values:
        m = v if m is None else beta * m + (1 - beta) * v
        out.append(m)
    return out


def decay_window_diffs(adamw: list, muon: list, decay_start: int, steps: int, windows: int = 3) -> list[float]:
    """Mean training-loss difference (Muon - AdamW) over ``windows`` consecutive parts of the decay phase.

    Each training batch is seen for the first time when its loss is taken (the run is far shorter than an epoch),
    so these are held-out losses on far more tokens than the final validation.
    """
    a, m = dict(map(tuple, adamw)), dict(map(tuple, muon))
    bounds = [decay_start + round(i * (steps - decay_start) / windows) for i in range(windows + 1)]
    return [statistics.fmean(m[s] - a[s] for s in range(lo + 1, hi + 1)) for lo, hi in itertools.pairwise(bounds)
            if hi > lo]


def run(out: Path, seeds: list[int], fields: dict, lr_embed: float, argv: list[str] | None, quick: bool,
        jobs: int = 1) -> dict:
    start = time.perf_counter()
    tasks = [(f"{arm}_seed{seed}", {**fields, "seed": seed, "init": "megatron", "lr_embed": lr_embed,
                                    "decay_optimizer": arm}) for seed in seeds for arm in ARMS]
    results: dict[str, dict] = {}
    payload: dict = {}
    for name, result in run_many(out, tasks, jobs):
        if result is None:
            raise RuntimeError(f"{name} diverged (non-finite losses); see {out / 'runs' / (name + '.log')}")
        results[name] = result
        arm, seed = name.split("_seed")
        print(f"[{NAME}] seed {seed} {ARMS[arm]:<28}: final val loss {result['final_val_loss']:.4f} "
              f"({result['wall_s']:.0f}s)", flush=True)
        done = [s for s in seeds if all(f"{a}_seed{s}" in results for a in ARMS)]
        if not done:
            continue
        per_seed = {str(s): {a: results[f"{a}_seed{s}"]["final_val_loss"] for a in ARMS} for s in done}
        for v in per_seed.values():
            v["diff"] = v["muon"] - v["adamw"]
        diffs = [v["diff"] for v in per_seed.values()]
        steps = fields["steps"]
        decay_start = steps - round(fields["decay"] * steps)
        windows = {str(s): decay_window_diffs(results[f"adamw_seed{s}"]["train"], results[f"muon_seed{s}"]["train"],
                                              decay_start, steps) for s in done}
        payload = {
            "setup": {"seeds": seeds, "lr_embed": lr_embed, "init": "megatron", "train": fields, "jobs": jobs,
                      "decay_start_step": decay_start, "arms": ARMS},
            "final_val_loss": per_seed,
            "summary": {
                "mean_adamw": statistics.fmean(v["adamw"] for v in per_seed.values()),
                "mean_muon": statistics.fmean(v["muon"] for v in per_seed.values()),
                "mean_diff": statistics.fmean(diffs),
                "std_diff": statistics.stdev(diffs) if len(diffs) > 1 else None,
                "muon_better_in": sum(d < 0 for d in diffs),
                "num_seeds": len(diffs),
                "train_loss_diff_decay_thirds": windows,
            },
            "curves": {str(s): {a: {k: results[f"{a}_seed{s}"][k] for k in ("train", "val", "events")} for a in ARMS}
                       for s in done},
            "total_seconds": round(time.perf_counter() - start, 1),
            "complete": len(done) == len(seeds),
            "quick": quick,
        }
        write_json(out, NAME, payload, argv)  # after every finished seed: partial results survive
    return payload


def plot(payload: dict, out: Path) -> Path:
    """Left: training loss of both arms over the whole run; right: Muon - AdamW around and after the switch."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    colors = {"adamw": "tab:blue", "muon": "tab:red"}
    decay_start = payload["setup"]["decay_start_step"]
    total = payload["setup"]["train"]["steps"]
    cmap = plt.get_cmap("tab10")
    for i, (seed, arms) in enumerate(payload["curves"].items()):
        for arm, c in arms.items():
            steps, losses = zip(*c["train"])
            axes[0].plot(steps, _ema(list(losses)), color=colors[arm], alpha=0.8 if i == 0 else 0.3, lw=1.2,
                         label=ARMS[arm] if i == 0 else None)
        a, m = dict(map(tuple, arms["adamw"]["train"])), dict(map(tuple, arms["muon"]["train"]))
        steps = sorted(a)
        diff = _ema([m[k] - a[k] for k in steps], beta=0.8)
        axes[1].plot(steps, diff, color=cmap(i % 10), lw=1.2, label=f"seed {seed}")
    for ax in axes:
        ax.axvline(decay_start, color="gray", ls="--", lw=1)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("training loss (EMA 0.9)")
    axes[0].set_title("whole run (dashed: decay start = optimizer switch)")
    axes[0].legend()
    axes[1].axhline(0.0, color="black", lw=0.8)
    axes[1].set_xlim(max(decay_start - total // 10, 0), total + 1)
    axes[1].set_ylabel("training loss, Muon arm - AdamW arm (EMA 0.8)")
    axes[1].legend(fontsize=8, ncol=2)
    s = payload["summary"]
    spread = f" ± {s['std_diff']:.4f} (sd)" if s["std_diff"] is not None else ""
    axes[1].set_title(f"below 0 = Muon better. Final val loss: AdamW {s['mean_adamw']:.4f}, Muon {s['mean_muon']:.4f}\n"
                      f"Muon - AdamW = {s['mean_diff']:+.4f}{spread} over {s['num_seeds']} seed(s)", fontsize=10)
    t = payload["setup"]["train"]
    fig.suptitle(f"Muon switch: {t['steps']} steps x {t['batch_size']}x{t['seq_len']} tokens, WSD (decay {t['decay']:.0%}), "
                 f"{len(payload['curves'])} seed(s)", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, out, f"{NAME}.png")


def main(argv: list[str] | None = None) -> dict:
    parser = make_parser(NAME, "WSD run with AdamW throughout vs AdamW -> Muon at the decay start")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--lr-embed", type=float, default=0.01, help="embedding lr (hidden lr = lr_embed / width_mult)")
    add_training_options(parser, steps=200, seq=64)
    parser.set_defaults(decay=0.3, eval_batches=32)
    args = parser.parse_args(argv)
    fields = train_fields(args)
    if args.quick:
        args.seeds = args.seeds[:1]
    with torch_threads(args):
        payload = run(args.out, args.seeds, fields, args.lr_embed, argv, args.quick, args.jobs)
    paths = [write_json(args.out, NAME, payload, argv), plot(payload, args.out)]
    report(NAME, paths)
    return payload


if __name__ == "__main__":
    main()
