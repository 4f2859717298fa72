"""What the Muon switch's gain is made of: the Muon lr scale, and Muon from the start, at one decay length.

Arms (all forked from the same AdamW trunk per seed, as in :mod:`xmodel.experiments.muon_switch`, except
``muon_start``, which trains its own trunk on Muon from step 0 with the same init and batches):

* ``adamw`` -- AdamW throughout (the reference of every difference);
* ``switch_x0.5`` / ``switch_x1`` / ``switch_x2`` -- the switch at the decay start with the Muon lr at 0.5 / 1 / 2
  times the recipe's ``0.2 * sqrt(max(A, B))`` scaling (``x1`` is the recipe);
* ``muon_start`` -- Muon for the hidden matrices from step 0 (no switch), recipe lr scale.

Reported: each arm minus ``adamw`` per seed and measure, mean, SE, 95% t-interval, minimum detectable effect.

    python -m xmodel.experiments.muon_ablation --jobs 2
    python -m xmodel.experiments.muon_ablation --reanalyse --out docs/results
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path
from typing import Any

from xmodel.experiments import forking as fk
from xmodel.experiments.common import make_parser, pyplot, save_figure
from xmodel.experiments.muon_switch import add_fork_options, run_or_reanalyse

NAME = "muon_ablation"
ARMS = [
    fk.Arm("adamw", "AdamW throughout"),
    fk.Arm("switch_x0.5", "switch, Muon lr x0.5", switch="decay", muon_lr_scale=0.5),
    fk.Arm("switch_x1", "switch, Muon lr x1 (recipe)", switch="decay", muon_lr_scale=1.0),
    fk.Arm("switch_x2", "switch, Muon lr x2", switch="decay", muon_lr_scale=2.0),
    fk.Arm("muon_start", "Muon from step 0 (no switch)", switch="start"),
]


def analyse(payload: dict[str, Any]) -> dict[str, Any]:
    decay = payload["setup"]["decays"][0]
    arms = list(payload["setup"]["arms"])
    return {
        "decay": decay,
        "mean_loss": {a: {m: statistics.fmean(s["branches"][f"{a}@{decay}"]["measures"][m] for s in payload["seeds"]
                                              if f"{a}@{decay}" in s["branches"]) for m in fk.MEASURES}
                      for a in arms},
        "diff_vs_adamw": {a: fk.compare(payload["seeds"], a, "adamw", decay) for a in arms if a != "adamw"},
        "diff_vs_switch": {a: fk.compare(payload["seeds"], a, "switch_x1", decay) for a in arms
                           if a not in ("adamw", "switch_x1")},
    }


def table(payload: dict[str, Any]) -> str:
    s = payload["summary"]
    labels = {a: v["label"] for a, v in payload["setup"]["arms"].items()}
    lines = [f"Decay {s['decay']} steps; differences against AdamW throughout (negative = lower loss).", "",
             "| arm | measure | loss | − AdamW, mean [95% CI] | SE | MDE (80%) | lower in | per seed | eval-set SE |",
             "|---|---|---|---|---|---|---|---|---|"]
    for a, label in labels.items():
        for m in fk.MEASURES:
            loss = s["mean_loss"][a][m]
            if a == "adamw":
                lines.append(f"| {label} | {m} | {loss:.4f} | – | – | – | – | – | – |")
                continue
            c = s["diff_vs_adamw"][a][m]
            se = f"{c['se']:.4f}" if c["se"] is not None else "–"
            mde = f"{c['mde']:.4f}" if c["mde"] is not None else "–"
            per = ", ".join(f"{v:+.4f}" for v in c["per_seed"].values())
            ese = f"{c['eval_set_se_mean']:.4f}" if "eval_set_se_mean" in c else "–"
            lines.append(f"| {label} | {m} | {loss:.4f} | {fk.fmt_ci(c)} | {se} | {mde} | {c['negative']}/{c['n']} | {per} "
                         f"| {ese} |")
    lines += ["", "Against the recipe's switch (Muon lr x1):", "",
              "| arm | measure | − switch x1, mean [95% CI] | lower in |", "|---|---|---|---|"]
    for a, by_m in s["diff_vs_switch"].items():
        for m in ("val", "unseen", "heldout"):
            c = by_m[m]
            lines.append(f"| {labels[a]} | {m} | {fk.fmt_ci(c)} | {c['negative']}/{c['n']} |")
    return "\n".join(lines) + "\n"


def plot(payload: dict[str, Any], out: Path) -> Path:
    """Each arm minus AdamW (mean, 95% CI) per measure."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 4.2))
    s = payload["summary"]
    arms = list(s["diff_vs_adamw"])
    colors = {"val": "tab:blue", "unseen": "tab:purple", "heldout": "tab:orange", "train_end": "tab:red",
              "recent": "tab:brown", "trained": "tab:green"}
    width = 0.13
    for j, m in enumerate(fk.MEASURES):
        xs, ys, err = [], [], [[], []]
        for i, a in enumerate(arms):
            c = s["diff_vs_adamw"][a][m]
            if not c["n"]:
                continue
            ci = c["ci"] or [c["mean"], c["mean"]]
            xs.append(i + (j - 2.5) * width)
            ys.append(c["mean"])
            err[0].append(c["mean"] - ci[0])
            err[1].append(ci[1] - c["mean"])
        ax.bar(xs, ys, width, yerr=err, capsize=3, color=colors[m], label=fk.MEASURE_LABELS[m])
    ax.axhline(0.0, color="black", lw=0.8)
    ax.set_xticks(range(len(arms)), [payload["setup"]["arms"][a]["label"] for a in arms], fontsize=8)
    ax.set_ylabel("loss − AdamW throughout (mean, 95% CI)")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7)
    st = payload["setup"]
    ax.set_title(f"Muon ablation: decay {s['decay']} steps forked at step {st['fork_step']}, "
                 f"{len(payload['seeds'])} seed(s); below 0 = better than AdamW", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, out, f"{NAME}.png")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = make_parser(NAME, "Muon lr scale x0.5/x1/x2 and Muon from the start vs the switch vs AdamW")
    add_fork_options(parser, decays=[100], seeds=[0, 1, 2, 3])
    args = parser.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    if len(args.decays) != 1:
        parser.error("--decays: the ablation runs at one decay length")
    return run_or_reanalyse(args, argv, ARMS, NAME, analyse, table, plot)


if __name__ == "__main__":
    main()
