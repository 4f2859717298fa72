"""The Muon switch: decays forked from one stable checkpoint, AdamW throughout vs AdamW -> Muon at the decay start.

Per seed, one AdamW trunk (warmup, then stable to the fork step) is trained once; every decay length (default
30 / 100 / 300 steps) of both arms restarts from its snapshot (:mod:`xmodel.experiments.forking`), as the paper
forks the decay from a stable checkpoint.  The arms share init, trunk and every batch; the Muon arm moves the hidden
matrices (q/k/v/o, gate/up/down) to :class:`xkernels.optim.Muon` at the fork (momentum 0.95, Nesterov, 5
Newton–Schulz steps, lr scaled by the recipe's ``0.2 * sqrt(max(A, B))``, same schedule and weight decay); embedding
and norms stay on AdamW.  The recipe's μP model (``cpu-default``, Megatron init, embedding lr 0.01) on the default
corpus.

Measured per seed, decay length and arm (``forking.MEASURES``): loss on the validation split (whole files held
out), on held-out windows of the training files (never trained on), on windows trained on, and the training loss on
fresh batches over the last third of the decay.  Reported: paired differences Muon - AdamW (negative = Muon
better) per seed, their mean, standard error, 95% t-interval and minimum detectable effect.

    python -m xmodel.experiments.muon_switch --jobs 2                          # train (CPU: see docs/results.md)
    python -m xmodel.experiments.muon_switch --reanalyse --out docs/results    # tables + plot from the JSON only
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from xmodel.experiments import forking as fk
from xmodel.experiments.common import make_parser, pyplot, report, save_figure, width_overrides, write_json

NAME = "muon_switch"
ARMS = [fk.Arm("adamw", "AdamW throughout"), fk.Arm("muon", "AdamW → Muon at decay start", switch="decay")]


def _ema(values: list[float], beta: float = 0.9) -> list[float]:
    out, m = [], None
    for v in values:
        m = v if m is None else beta * m + (1 - beta) * v
        out.append(m)
    return out


def decay_window_diffs(adamw: list, muon: list, decay_start: int, steps: int, windows: int = 3) -> list[float]:
    """Mean training-loss difference (Muon - AdamW) over ``windows`` consecutive parts of the decay phase, from
    ``(step, loss)`` records (step ``s`` = the loss of the ``s``-th optimizer step)."""
    a, m = dict(map(tuple, adamw)), dict(map(tuple, muon))
    bounds = [decay_start + round(i * (steps - decay_start) / windows) for i in range(windows + 1)]
    return [statistics.fmean(m[s] - a[s] for s in range(lo + 1, hi + 1)) for lo, hi in itertools.pairwise(bounds)
            if hi > lo]


def add_fork_options(parser: argparse.ArgumentParser, decays: list[int], seeds: list[int]) -> None:
    g = parser.add_argument_group("runs (trunk to --fork, then each decay forked from its snapshot)")
    g.add_argument("--seeds", type=int, nargs="+", default=seeds)
    g.add_argument("--warmup-steps", type=int, default=30, help="warmup steps of the trunk")
    g.add_argument("--fork", type=int, default=300, help="step of the stable checkpoint the decays fork from")
    g.add_argument("--decays", type=int, nargs="+", default=decays, help="decay lengths (steps)")
    g.add_argument("--eval-batches", type=int, default=64, help="batches in each evaluation set (val, heldout)")
    g.add_argument("--batch", type=int, default=8, help="sequences per step")
    g.add_argument("--seq", type=int, default=64, help="tokens per sequence")
    g.add_argument("--lr-embed", type=float, default=0.01, help="embedding lr (hidden lr = lr_embed / width_mult)")
    g.add_argument("--preset", default="cpu-default")
    g.add_argument("--vocab", type=int, default=4096)
    g.add_argument("--corpus-mb", type=float, default=6.0)
    g.add_argument("--cache-dir", default=None)
    g.add_argument("--jobs", type=int, default=1, help="seeds at once, each in its own process with 1 thread")
    g.add_argument("--reanalyse", action="store_true", help="rebuild summary, tables and plot from <out>/<name>.json")
    g.add_argument("--merge", type=Path, nargs="+", default=[],
                   help="with --reanalyse: add the seeds of these JSON files (same run shape, other seeds or "
                        "decay lengths; a seed in two files must have different decays)")


def fork_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """``run_seed`` keyword arguments from the options; ``--quick`` shrinks everything to seconds."""
    model: dict[str, Any] = {"vocab_size": args.vocab}
    if args.quick:  # a small corpus and tokenizer, a 2-layer width-64 model, a handful of steps
        args.seeds, args.warmup_steps, args.fork, args.eval_batches = args.seeds[:2], 1, 3, 2
        args.decays = [2, 3] if len(args.decays) > 1 else [2]
        args.batch, args.seq, args.vocab, args.corpus_mb = 2, 32, 512, 0.2
        model = {"vocab_size": args.vocab, "num_hidden_layers": 2, **width_overrides(64, "mup")}
    fields = {"preset": args.preset, "model": model, "batch_size": args.batch, "seq_len": args.seq,
              "warmup": 0.0, "eval_every": 0, "vocab_size": args.vocab, "corpus_max_mb": args.corpus_mb,
              "cache_dir": args.cache_dir, "init": "megatron", "lr_embed": args.lr_embed}
    return {"fields": fields, "warmup": args.warmup_steps, "fork": args.fork, "decays": list(args.decays),
            "eval_batches": args.eval_batches, "trained_batches": 2 if args.quick else 8,
            "unseen_mb": 0.05 if args.quick else 2.0}


def train_all(args: argparse.Namespace, arms: list[fk.Arm], name: str, analyse, argv) -> dict[str, Any]:
    """Run every seed, writing ``<out>/<name>.json`` after each (partial results survive)."""
    kwargs = fork_kwargs(args)
    start = time.perf_counter()
    seeds: list[dict[str, Any]] = []
    payload: dict[str, Any] = {}
    (args.out / "seeds").mkdir(parents=True, exist_ok=True)
    for result in fk.run_seeds(args.out, args.seeds, args.jobs, arms=arms, **kwargs):
        (args.out / "seeds" / f"seed{result['seed']}.json").write_text(json.dumps(result))  # with per-row losses
        seeds.append(fk.slim(result))
        seeds.sort(key=lambda r: r["seed"])
        payload = {
            "setup": {"seeds": args.seeds, "arms": {a.name: {"label": a.label, "switch": a.switch,
                                                             "muon_lr_scale": a.muon_lr_scale} for a in arms},
                      "warmup_steps": kwargs["warmup"], "fork_step": kwargs["fork"], "decays": kwargs["decays"],
                      "eval_batches": kwargs["eval_batches"], "eval_sizes_rows": seeds[0].get("eval_sizes"),
                      "eval_tokens": seeds[0].get("eval_tokens"), "train": kwargs["fields"], "jobs": args.jobs,
                      "measures": fk.MEASURE_LABELS},
            "seeds": seeds,
            "total_seconds": round(time.perf_counter() - start, 1),
            "complete": len(seeds) == len(args.seeds),
            "quick": bool(args.quick),
        }
        payload["summary"] = analyse(payload)
        write_json(args.out, name, payload, argv)
        print(f"[{name}] seed {result['seed']} done ({result['wall_s']:.0f}s)", flush=True)
    return payload


def analyse(payload: dict[str, Any]) -> dict[str, Any]:
    """Muon - AdamW per decay length and measure (see :func:`forking.compare`), and the training-loss difference
    over the thirds of each decay per seed."""
    out: dict[str, Any] = {}
    for decay in payload["setup"]["decays"]:
        cmp = fk.compare(payload["seeds"], "muon", "adamw", decay)
        thirds = {}
        for s in payload["seeds"]:
            a, m = s["branches"].get(f"adamw@{decay}"), s["branches"].get(f"muon@{decay}")
            if a and m:
                recs_a = [(i + 1, x) for i, x in enumerate(a["train"])]
                recs_m = [(i + 1, x) for i, x in enumerate(m["train"])]
                thirds[str(s["seed"])] = decay_window_diffs(recs_a, recs_m, 0, len(a["train"]))
        out[str(decay)] = {"diff": cmp, "train_diff_decay_thirds": thirds,
                           "mean_loss": {arm: {mm: statistics.fmean(s["branches"][f"{arm}@{decay}"]["measures"][mm]
                                                                    for s in payload["seeds"]
                                                                    if f"muon@{decay}" in s["branches"]
                                                                    and f"adamw@{decay}" in s["branches"])
                                               for mm in fk.MEASURES} for arm in ("adamw", "muon")}}
    return out


def table(payload: dict[str, Any]) -> str:
    """Markdown tables: the summary per decay and measure, and every per-seed difference."""
    s, setup = payload["summary"], payload["setup"]
    lines = ["| decay steps | measure | AdamW | Muon | Muon − AdamW, mean [95% CI] | SE | MDE (80%) | Muon better in | eval-set SE |",
             "|---|---|---|---|---|---|---|---|---|"]
    for decay in setup["decays"]:
        d = s[str(decay)]
        for m in fk.MEASURES:
            c = d["diff"][m]
            se = f"{c['se']:.4f}" if c["se"] is not None else "–"
            mde = f"{c['mde']:.4f}" if c["mde"] is not None else "–"
            ese = f"{c['eval_set_se_mean']:.4f}" if "eval_set_se_mean" in c else "–"
            lines.append(f"| {decay} | {fk.MEASURE_LABELS[m]} | {d['mean_loss']['adamw'][m]:.4f} | "
                         f"{d['mean_loss']['muon'][m]:.4f} | {fk.fmt_ci(c)} | {se} | {mde} | {c['negative']}/{c['n']} | {ese} |")
    lines += ["", "Per seed, Muon − AdamW:", "",
              "| decay | measure | " + " | ".join(f"seed {x['seed']}" for x in payload["seeds"]) + " |",
              "|---|---|" + "---|" * len(payload["seeds"])]
    for decay in setup["decays"]:
        for m in fk.MEASURES:
            ps = s[str(decay)]["diff"][m]["per_seed"]
            lines.append(f"| {decay} | {m} | " + " | ".join(f"{ps[str(x['seed'])]:+.4f}" if str(x["seed"]) in ps
                                                             else "–" for x in payload["seeds"]) + " |")
    return "\n".join(lines) + "\n"


def plot(payload: dict[str, Any], out: Path) -> Path:
    """Left: Muon - AdamW (mean, 95% CI) against decay length per measure; right: the training-loss difference
    over each decay (mean over seeds, EMA)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    decays = payload["setup"]["decays"]
    colors = {"val": "tab:blue", "unseen": "tab:purple", "heldout": "tab:orange", "train_end": "tab:red",
              "recent": "tab:brown", "trained": "tab:green"}
    for j, m in enumerate(fk.MEASURES):
        xs, ys, lo, hi = [], [], [], []
        for k, decay in enumerate(decays):
            c = payload["summary"][str(decay)]["diff"][m]
            if not c["n"]:
                continue
            xs.append(decay * (1 + 0.03 * (j - 2.5)))
            ys.append(c["mean"])
            ci = c["ci"] or [c["mean"], c["mean"]]
            lo.append(c["mean"] - ci[0])
            hi.append(ci[1] - c["mean"])
        axes[0].errorbar(xs, ys, yerr=[lo, hi], fmt="o-", capsize=3, color=colors[m], label=fk.MEASURE_LABELS[m])
    axes[0].axhline(0.0, color="black", lw=0.8)
    axes[0].set_xscale("log")
    axes[0].set_xticks(decays, [str(d) for d in decays])
    axes[0].minorticks_off()
    axes[0].set_xlabel("decay length (steps, forked from the same stable checkpoint)")
    axes[0].set_ylabel("loss, Muon − AdamW (mean, 95% CI)")
    axes[0].set_title("below 0 = the switch helps", fontsize=10)
    axes[0].legend(fontsize=7)
    cmap = plt.get_cmap("viridis")
    for k, decay in enumerate(decays):
        diffs = [[m - a for m, a in zip(s["branches"][f"muon@{decay}"]["train"], s["branches"][f"adamw@{decay}"]["train"])]
                 for s in payload["seeds"] if f"muon@{decay}" in s["branches"]]
        if not diffs:
            continue
        mean = [statistics.fmean(col) for col in zip(*diffs)]
        axes[1].plot(range(1, len(mean) + 1), _ema(mean, 0.8), color=cmap(k / max(1, len(decays) - 1)),
                     label=f"decay {decay}")
    axes[1].axhline(0.0, color="black", lw=0.8)
    axes[1].set_xscale("log")
    axes[1].set_xlabel("step after the fork")
    axes[1].set_ylabel("fresh-batch training loss, Muon − AdamW")
    axes[1].set_title("seed mean, EMA 0.8", fontsize=10)
    axes[1].legend(fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3)
    st = payload["setup"]
    fig.suptitle(f"Muon switch: trunk {st['fork_step']} AdamW steps (warmup {st['warmup_steps']}), decays forked from "
                 f"it; seeds per decay: " + ", ".join(f"{d}: {payload['summary'][str(d)]['diff']['val']['n']}"
                                                        for d in decays)
                 + f"; {st['train']['batch_size']}x{st['train']['seq_len']} tokens/step",
                 fontsize=10)
    fig.tight_layout()
    return save_figure(fig, out, f"{NAME}.png")


def run_or_reanalyse(args: argparse.Namespace, argv, arms: list[fk.Arm], name: str, analyse_fn, table_fn,
                     plot_fn) -> dict[str, Any]:
    """Train every arm (or, with ``--reanalyse``, reload the JSON and ``--merge`` others), then write the JSON,
    table and plot and print where they are. The tail of every forked-decay experiment's ``main``."""
    if args.reanalyse:
        payload = reload(args.out, name)
        argv = payload.pop("_argv")
        if args.merge:
            payload = merge(payload, args.merge)
    else:
        payload = train_all(args, arms, name, analyse_fn, argv)
    report(name, finish(payload, args.out, argv, name, analyse_fn, table_fn, plot_fn))
    return payload


def finish(payload: dict[str, Any], out: Path, argv, name: str, analyse_fn, table_fn, plot_fn) -> list[Path]:
    payload["summary"] = analyse_fn(payload)
    md = out / f"{name}.md"
    md.write_text(table_fn(payload), encoding="utf-8")
    return [write_json(out, name, payload, argv), plot_fn(payload, out), md]


def reload(out: Path, name: str) -> dict[str, Any]:
    """The payload of ``<out>/<name>.json`` (for ``--reanalyse``); the training run's command line is returned as
    ``_argv`` and its environment kept as ``training_environment``."""
    path = out / f"{name}.json"
    if not path.is_file():
        raise SystemExit(f"--reanalyse: {path} does not exist; point --out at a directory holding a finished run's "
                         f"{name}.json (the committed one is in docs/results)")
    data = json.loads(path.read_text(encoding="utf-8"))
    env = data.pop("environment")
    data.setdefault("training_environment", env)
    data.pop("experiment", None)
    data["_argv"] = data["training_environment"]["command"].split()[3:]
    return data


SAME_SHAPE = ("warmup_steps", "fork_step", "eval_batches", "train")


def merge(payload: dict[str, Any], paths: list[Path]) -> dict[str, Any]:
    """Add the seeds (branches) of the JSON files ``paths`` to ``payload``; the run shape must be the same."""
    by_seed = {s["seed"]: s for s in payload["seeds"]}
    commands = [payload["training_environment"]["command"]]
    for path in paths:
        other = json.loads(Path(path).read_text(encoding="utf-8"))
        for key in SAME_SHAPE:
            if other["setup"][key] != payload["setup"][key]:
                raise ValueError(f"--merge: {path} has another {key} ({other['setup'][key]!r})")
        commands.append(other.get("training_environment", other.get("environment", {})).get("command"))
        for s in other["seeds"]:
            mine = by_seed.setdefault(s["seed"], {**s, "branches": {}})
            clash = set(mine["branches"]) & set(s["branches"])
            if clash:
                raise ValueError(f"--merge: seed {s['seed']} has {sorted(clash)} in two files")
            mine["branches"].update(s["branches"])
        payload["setup"]["decays"] = sorted(set(payload["setup"]["decays"]) | set(other["setup"]["decays"]))
        payload["total_seconds"] = payload.get("total_seconds", 0) + other.get("total_seconds", 0)
    payload["seeds"] = [by_seed[k] for k in sorted(by_seed)]
    payload["setup"]["seeds"] = sorted(by_seed)
    payload["merged_commands"] = commands
    return payload


def _row_files(kind: str, cache_dir: str | None, corpus_mb: float, seq: int, rows: int, vocab: int,
               unseen_mb: float) -> tuple[list[str], Any]:
    """``(file names, file index of each row)`` of evaluation set ``kind`` (``"val"`` or ``"unseen"``), rebuilt
    the way :mod:`xmodel.experiments.forking` picks its rows (evenly spaced windows of the files' token stream)."""
    import numpy as np

    from xmodel.training.config import TrainConfig
    from xmodel.training.corpus import _doc_hash, build_default_corpus, iter_default_documents
    from xmodel.training.tokenizer import default_tokenizer

    cache = TrainConfig(cache_dir=cache_dir).cache_path
    train_path, val_path = build_default_corpus(cache, corpus_mb)
    tok = default_tokenizer(train_path, cache, vocab)
    split = {p: [json.loads(line) for line in open(p, encoding="utf-8")] for p in (train_path, val_path)}
    if kind == "val":
        docs = [(d["name"], d["text"]) for d in split[val_path]]
    else:
        used = {d["name"] for v in split.values() for d in v}
        docs, size = [], 0
        for name, text in sorted((d for d in iter_default_documents() if d[0] not in used),
                                 key=lambda d: _doc_hash(d[0])):
            if size >= unseen_mb * 1e6:
                break
            docs.append((name, text))
            size += len(text.encode("utf-8"))
    lengths = [len(ids) + 1 for ids in tok.encode_batch([t for _, t in docs])]  # + EOS
    ends = np.cumsum(lengths) - 1  # position of each document's EOS
    n = (int(ends[-1]) + 1 - 1) // seq
    starts = np.linspace(0, n - 1, num=min(n, rows) if kind == "val" else rows).astype(np.int64) * seq
    return [name for name, _ in docs], np.searchsorted(ends, starts)


def by_file(out: Path, cache_dir: str | None, corpus_mb: float, seq: int, rows: int, vocab: int = 4096,
            unseen_mb: float = 2.0) -> dict[str, Any]:
    """Break the differences on the file-level evaluation sets (``val``, ``unseen``) down by file: each file's share
    of the rows, its AdamW loss and Muon - AdamW per decay length (means over the seeds in ``<out>/seeds/``, which
    hold per-row losses), and each set's paired difference without the file holding most rows.  Writes
    ``<out>/muon_switch_by_file.json``."""
    import numpy as np

    from xmodel.experiments.common import paired_summary

    seeds = [json.loads(p.read_text()) for p in sorted((out / "seeds").glob("seed*.json"))]
    decays = sorted({b["decay"] for r in seeds for b in r["branches"].values()})
    result: dict[str, Any] = {"seeds": [r["seed"] for r in seeds]}
    for kind in ("val", "unseen"):
        names, doc = _row_files(kind, cache_dir, corpus_mb, seq, rows, vocab, unseen_mb)
        files: dict[str, Any] = {}
        res: dict[str, Any] = {"rows": int(len(doc)), "files": files, "files_with_rows": int(len(np.unique(doc))),
                               "without_largest": {}}
        def rows_of(r, arm, d):
            return np.asarray(r["branches"][f"{arm}@{d}"]["eval_rows"][kind])

        for k in np.unique(doc):
            sel = doc == k
            entry = {"rows": int(sel.sum()), "adamw": {}, "diff": {}}
            for d in decays:
                pairs = [(rows_of(r, "adamw", d)[sel].mean(), rows_of(r, "muon", d)[sel].mean()) for r in seeds
                         if f"muon@{d}" in r["branches"]]
                if pairs:
                    entry["adamw"][str(d)] = float(np.mean([a for a, _ in pairs]))
                    entry["diff"][str(d)] = float(np.mean([m - a for a, m in pairs]))
            files[names[int(k)]] = entry
        largest = int(np.bincount(doc).argmax())
        keep = doc != largest
        res["largest_file"] = names[largest]
        res["largest_file_share"] = float(1 - keep.mean())
        for d in decays if keep.any() else []:
            per_seed = {str(r["seed"]): float((rows_of(r, "muon", d) - rows_of(r, "adamw", d))[keep].mean())
                        for r in seeds if f"muon@{d}" in r["branches"]}
            if per_seed:
                res["without_largest"][str(d)] = {"per_seed": per_seed, **paired_summary(list(per_seed.values()))}
        result[kind] = res
    path = out / f"{NAME}_by_file.json"
    path.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = make_parser(NAME, "Decays forked from one stable checkpoint: AdamW throughout vs AdamW -> Muon")
    add_fork_options(parser, decays=[30, 100, 300], seeds=[0, 1, 2, 3, 4, 5])
    parser.add_argument("--by-file", action="store_true", help="break the val/unseen differences down by file "
                        "(needs <out>/seeds/ with per-row losses from a training run)")
    args = parser.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    if args.by_file:
        return by_file(args.out, args.cache_dir, args.corpus_mb, args.seq, args.eval_batches * args.batch,
                       args.vocab, 0.05 if args.quick else 2.0)
    return run_or_reanalyse(args, argv, ARMS, NAME, analyse, table, plot)


if __name__ == "__main__":
    main()
