"""μP coordinate check: activation sizes over the first training steps, across widths, μP vs SP.

For each width and parametrisation (see :mod:`xmodel.experiments.common`) a model is trained for a few AdamW
steps (μP groups from :func:`xmodel.training.optim.build_adamw`, constant lr, no clipping) on byte tokens of the
stdlib source, the same batches for every model.  Before each update (and after the last) it records the RMS
``sqrt(mean(x²))`` of

* ``embedding`` -- the embedding output times its multiplier (what enters the residual stream),
* ``attention`` -- the attention block output (``o_proj``), averaged over layers,
* ``mlp``       -- the MLP block output (``down_proj``), averaged over layers,
* ``logits``    -- the logits times the output multiplier.

Under μP each curve stays flat as width grows (logits may shrink: μP's tied output layer is ``1/width``-scaled);
under SP the attention, MLP and logit sizes grow with width, at init and more so after a few updates.  The JSON
holds every RMS and, per parametrisation and layer type, the slope of ``log2 RMS`` against ``log2 width`` at the
last step (0 = flat, 0.5 = grows like sqrt(width), 1 = linearly).

    python -m xmodel.experiments.coord_check --out runs/experiments/coord_check
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from xmodel.experiments.common import (
    LABELS,
    PARAMETRISATIONS,
    Timer,
    build_model,
    learning_rates,
    make_parser,
    pyplot,
    report,
    save_figure,
    stdlib_bytes,
    torch_threads,
    width_config,
    write_json,
)
from xmodel.training.optim import build_adamw

NAME = "coord_check"
LAYER_TYPES = ("embedding", "attention", "mlp", "logits")


def _rms(x: torch.Tensor) -> float:
    return float(x.detach().float().pow(2).mean().sqrt())


def _overrides(layers: int | None) -> dict:
    # Byte tokens need a 256-entry vocabulary; a bigger one only adds never-seen rows.
    return {"vocab_size": 256, **({} if layers is None else {"num_hidden_layers": layers})}


def record_run(width: int, param: str, batches: torch.Tensor, lr: float, seed: int, init: str,
               preset: str, layers: int | None) -> dict[str, list[float]]:
    """Train one model on ``batches`` (steps, B, T+1); return per layer type the RMS before each step and after the last."""
    overrides = _overrides(layers)
    config = width_config(width, param, preset=preset, **overrides)
    model = build_model(config, seed=seed, init=init)
    hidden_lr, embed_lr = learning_rates(config, lr)
    opt = build_adamw(model, lr=hidden_lr, lr_embed=embed_lr)

    current: dict[str, list[float]] = {}
    hooks = [
        model.model.embed_tokens.register_forward_hook(
            lambda m, i, out: current.setdefault("embedding", []).append(_rms(out * config.embedding_multiplier))
        )
    ]
    for layer in model.model.layers:
        hooks.append(layer.self_attn.register_forward_hook(lambda m, i, out: current.setdefault("attention", []).append(_rms(out))))
        hooks.append(layer.mlp.register_forward_hook(lambda m, i, out: current.setdefault("mlp", []).append(_rms(out))))

    series: dict[str, list[float]] = {k: [] for k in LAYER_TYPES}
    steps = batches.shape[0]
    for t in range(steps + 1):
        batch = batches[min(t, steps - 1)]
        inputs, labels = batch[:, :-1], batch[:, 1:]
        current.clear()
        training = t < steps
        with torch.set_grad_enabled(training):
            out = model(inputs, labels=labels, return_logits=True)
        current["logits"] = [_rms(out.logits)]
        for key in LAYER_TYPES:
            series[key].append(sum(current[key]) / len(current[key]))
        if training:
            out.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    for h in hooks:
        h.remove()
    return series


def slope(widths: list[int], values: list[float]) -> float:
    """Least-squares slope of ``log2(values)`` against ``log2(widths)``."""
    xs = [math.log2(w) for w in widths]
    ys = [math.log2(max(v, 1e-30)) for v in values]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den


def run(widths: list[int], steps: int, batch: int, seq: int, lr: float, seed: int = 0, init: str = "hf",
        preset: str = "cpu-default", layers: int | None = None) -> dict:
    """The coordinate check; returns the JSON payload (without environment)."""
    tokens = stdlib_bytes(steps * batch * (seq + 1))
    batches = tokens.view(steps, batch, seq + 1)
    rms: dict[str, dict[str, dict[str, list[float]]]] = {}
    seconds: dict[str, float] = {}
    for param in PARAMETRISATIONS:
        rms[param] = {}
        for width in widths:
            with Timer() as timer:
                rms[param][str(width)] = record_run(width, param, batches, lr, seed, init, preset, layers)
            seconds[f"{param}/{width}"] = round(timer.seconds, 2)
            print(f"[{NAME}] {LABELS[param]:>2} width {width:5d}: {timer.seconds:5.1f}s  " + "  ".join(
                f"{k} {rms[param][str(width)][k][-1]:.3g}" for k in LAYER_TYPES))
    slopes = {
        param: {k: slope(widths, [rms[param][str(w)][k][-1] for w in widths]) for k in LAYER_TYPES}
        for param in PARAMETRISATIONS
    }
    growth = {
        param: {k: rms[param][str(widths[-1])][k][-1] / rms[param][str(widths[0])][k][-1] for k in LAYER_TYPES}
        for param in PARAMETRISATIONS
    }
    depth = width_config(widths[0], "mup", preset=preset, **_overrides(layers)).num_hidden_layers
    return {
        "setup": {
            "widths": widths, "steps": steps, "batch": batch, "seq_len": seq, "lr": lr, "seed": seed, "init": init,
            "preset": preset, "num_hidden_layers": depth, "vocab_size": 256, "head_dim": 64, "optimizer": "AdamW (μP groups), constant lr",
            "lr_rule": {"mup": "embedding lr, hidden lr / width_mult (mup_base_width 256)", "sp": "one lr for all"},
            "data": "bytes of the Python stdlib sources",
        },
        "rms": rms,
        "slope_last_step": slopes,
        "growth_last_step": growth,
        "seconds": seconds,
    }


def plot(result: dict, out_dir: Path) -> Path:
    plt = pyplot()
    widths = result["setup"]["widths"]
    steps = result["setup"]["steps"]
    fig, axes = plt.subplots(2, len(LAYER_TYPES), figsize=(4 * len(LAYER_TYPES), 6.5), sharex=True)
    cmap = plt.get_cmap("viridis")
    for row, param in enumerate(PARAMETRISATIONS):
        for col, key in enumerate(LAYER_TYPES):
            ax = axes[row][col]
            for t in range(steps + 1):
                ys = [result["rms"][param][str(w)][key][t] for w in widths]
                ax.plot(widths, ys, marker="o", ms=3, color=cmap(t / max(steps, 1)), label=f"t={t}")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            s = result["slope_last_step"][param][key]
            ax.set_title(f"{LABELS[param]} · {key} (slope {s:+.2f})", fontsize=10)
            if row == 1:
                ax.set_xlabel("width")
            if col == 0:
                ax.set_ylabel("RMS")
    for col, key in enumerate(LAYER_TYPES):  # same y range for μP and SP in each column
        values = [v for param in PARAMETRISATIONS for w in widths for v in result["rms"][param][str(w)][key]]
        lo, hi = min(values), max(values)
        for r in range(2):
            axes[r][col].set_ylim(lo / 1.5, hi * 1.5)
    axes[0][-1].legend(fontsize=7, title="step", title_fontsize=7, loc="best")
    fig.suptitle(f"Coordinate check: activation RMS vs width over the first {steps} AdamW steps "
                 f"(lr {result['setup']['lr']}, {result['setup']['num_hidden_layers']} layers)")
    fig.tight_layout()
    return save_figure(fig, out_dir, f"{NAME}.png")


def main(argv: list[str] | None = None) -> dict:
    parser = make_parser(NAME, "μP coordinate check: activation RMS vs width, μP vs standard parametrisation")
    parser.add_argument("--widths", type=int, nargs="+", default=[64, 128, 256, 512, 1024])
    parser.add_argument("--steps", type=int, default=8, help="AdamW steps (RMS is recorded before each and after the last)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.01, help="embedding lr (μP hidden lr = lr / width_mult); SP: every lr")
    parser.add_argument("--init", default="hf", choices=["hf", "megatron"])
    parser.add_argument("--preset", default="cpu-default")
    parser.add_argument("--layers", type=int, default=2, help="depth (the preset's when 0)")
    args = parser.parse_args(argv)
    args.layers = args.layers or None
    if args.quick:
        args.widths, args.steps, args.batch, args.seq, args.layers = [64, 256], 2, 2, 32, 2
    if len(args.widths) < 2:
        parser.error("--widths needs at least two widths")
    with torch_threads(args):
        start = time.perf_counter()
        result = run(sorted(args.widths), args.steps, args.batch, args.seq, args.lr, args.seed, args.init,
                     args.preset, args.layers)
        result["total_seconds"] = round(time.perf_counter() - start, 1)
        result["quick"] = args.quick
        paths = [write_json(args.out, NAME, result, argv), plot(result, args.out)]
    report(NAME, paths)
    return result


if __name__ == "__main__":
    main()
