"""FP8 parity: the same run in high precision and with the transformer linears in FP8.

Both arms are runs of the real trainer (:func:`xmodel.train.train`): the recipe's μP ``cpu-default`` model on the
default corpus, WSD with the AdamW -> Muon switch, identical seed, init and data order.  The high-precision arm is
fp32 on a CPU and bf16 autocast on a GPU (the trainer's ``precision=auto``); the FP8 arm adds ``--fp8 RECIPE``
(default ``delayed``: Transformer Engine's delayed scaling, E4M3 forward / E5M2 backward, amax history 128; the LM
head and embedding stay in high precision).

On a GPU with FP8 tensor cores (compute capability >= 8.9) the FP8 arm runs the real FP8 GEMMs.  Anywhere else it
is **emulated FP8 (CPU)**: ``--fp8-emulate`` runs :class:`xkernels.fp8.FP8Linear` on its PyTorch reference path,
which quantises (scales, rounding to E4M3/E5M2, saturation) exactly as the kernels do and multiplies the dequantised
values in fp32 -- the numerics of FP8 training, not its speed.

Reported: the final validation loss of each arm and the relative difference ``(fp8 - base) / base``; with several
seeds also the seed-to-seed spread of the baseline, the scale a "no quality loss" claim is judged against.

    python -m xmodel.experiments.fp8_parity --out runs/experiments/fp8_parity
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

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

NAME = "fp8_parity"
RECIPES = ("delayed", "current", "row", "block")


def fp8_hardware() -> bool:
    """Whether this machine has FP8 tensor cores (CUDA compute capability >= 8.9)."""
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


def arm_labels(recipes: list[str]) -> dict[str, str]:
    base = "bf16 autocast (GPU)" if torch.cuda.is_available() else "fp32 (CPU)"
    fp8 = "FP8 (GPU tensor cores)" if fp8_hardware() else "emulated FP8 (CPU)"
    return {"base": base, **{f"fp8_{r}": f"{fp8}, {r} scaling" for r in recipes}}


def run(out: Path, seeds: list[int], recipes: list[str], fields: dict, argv: list[str] | None, quick: bool,
        jobs: int = 1) -> dict:
    start = time.perf_counter()
    labels = arm_labels(recipes)
    emulate = not fp8_hardware()
    tasks = []
    for seed in seeds:
        for arm in labels:
            extra = {} if arm == "base" else {"fp8": arm.removeprefix("fp8_"), "fp8_emulate": emulate}
            tasks.append((f"{arm}_seed{seed}", {**fields, "seed": seed, **extra}))
    results: dict[str, dict] = {}
    payload: dict = {}
    for name, result in run_many(out, tasks, jobs):
        if result is None:
            raise RuntimeError(f"{name} diverged (non-finite losses); see {out / 'runs' / (name + '.log')}")
        results[name] = result
        arm, seed = name.rsplit("_seed", 1)
        print(f"[{NAME}] seed {seed} {labels[arm]:<36}: final val loss {result['final_val_loss']:.4f} "
              f"({result['wall_s']:.0f}s)", flush=True)
        done = [s for s in seeds if all(f"{a}_seed{s}" in results for a in labels)]
        if not done:
            continue
        payload = {
            "setup": {"seeds": seeds, "recipes": recipes, "arms": labels, "fp8_emulated": emulate,
                      "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
                      "train": fields, "init": "megatron", "decay_optimizer": "muon", "jobs": jobs},
            "final_val_loss": {str(s): {a: results[f"{a}_seed{s}"]["final_val_loss"] for a in labels} for s in done},
            "curves": {str(s): {a: {k: results[f"{a}_seed{s}"][k] for k in ("train", "val")} for a in labels}
                       for s in done},
            "run_seconds": {n: r["wall_s"] for n, r in results.items()},
            "total_seconds": round(time.perf_counter() - start, 1),
            "complete": len(done) == len(seeds),
            "quick": quick,
        }
        payload["summary"] = summarise(payload["final_val_loss"], recipes)
        write_json(out, NAME, payload, argv)
    return payload


def summarise(losses: dict[str, dict[str, float]], recipes: list[str]) -> dict:
    summary: dict = {}
    for r in recipes:
        rel = [(v[f"fp8_{r}"] - v["base"]) / v["base"] for v in losses.values()]
        summary[f"fp8_{r}"] = {"relative_diff_per_seed": rel, "mean_relative_diff": statistics.fmean(rel),
                               "max_abs_relative_diff": max(abs(x) for x in rel)}
    base = [v["base"] for v in losses.values()]
    summary["base_seed_spread_relative"] = (max(base) - min(base)) / statistics.fmean(base) if len(base) > 1 else None
    return summary


def plot(payload: dict, out: Path) -> Path:
    plt = pyplot()
    labels = payload["setup"]["arms"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    colors = dict(zip(labels, ["tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown"]))
    for i, (seed, arms) in enumerate(payload["curves"].items()):
        for arm, c in arms.items():
            steps, losses = zip(*c["train"])
            axes[0].plot(steps, losses, color=colors[arm], lw=1, alpha=0.8 if i == 0 else 0.35,
                         label=labels[arm] if i == 0 else None, ls="-" if arm == "base" else "--")
            vs, vl = zip(*c["val"])
            axes[1].plot(vs, vl, marker="o", color=colors[arm], alpha=0.9 if i == 0 else 0.4,
                         label=labels[arm] if i == 0 else None, ls="-" if arm == "base" else "--")
    axes[0].set_ylabel("training loss")
    axes[1].set_ylabel("validation loss")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    s = payload["summary"]
    parts = [f"{labels[k]}: {v['mean_relative_diff']:+.3%}" for k, v in s.items() if k.startswith("fp8_")]
    axes[1].set_title("final val loss, relative to base: " + "; ".join(parts), fontsize=9)
    t = payload["setup"]["train"]
    fig.suptitle(f"FP8 parity: {t['steps']} steps x {t['batch_size']}x{t['seq_len']} tokens, recipe run (WSD, Muon decay), "
                 f"{len(payload['curves'])} seed(s)", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, out, f"{NAME}.png")


def main(argv: list[str] | None = None) -> dict:
    parser = make_parser(NAME, "the same run in fp32/bf16 and with FP8 linears (emulated on CPU)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--recipes", nargs="+", default=["delayed"], choices=RECIPES, help="FP8 recipes to compare")
    add_training_options(parser, steps=100, seq=64)
    parser.set_defaults(decay=0.3)
    args = parser.parse_args(argv)
    fields = train_fields(args)
    fields["eval_every"] = max(args.steps // 5, 1)
    if args.quick:
        args.seeds = args.seeds[:1]
    with torch_threads(args):
        payload = run(args.out, args.seeds, args.recipes, fields, argv, args.quick, args.jobs)
    paths = [write_json(args.out, NAME, payload, argv), plot(payload, args.out)]
    report(NAME, paths)
    return payload


if __name__ == "__main__":
    main()
