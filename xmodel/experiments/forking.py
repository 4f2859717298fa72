"""In-process WSD runs that fork their decays from one stable checkpoint, and the evaluation sets they are scored on.

The paper forks the decay from a stable checkpoint; so does :func:`run_seed`: one trunk (warmup + stable, AdamW) per
seed, a snapshot of model + optimizer + data position at the fork step, then every *arm* (AdamW throughout, the
AdamW -> Muon switch, a Muon lr scale, ...) and every decay length restarts from that snapshot.  All arms of a seed
therefore share init, trunk and the batches they see after the fork; they differ only in what the arm changes.

The model, optimizer, data sampler and the AdamW -> Muon switch are the trainer's own (:func:`xmodel.train.setup`,
:meth:`TrainOptimizer.switch_to_muon`); :func:`train_step` is :func:`xmodel.train.train_loop`'s step without
gradient accumulation, logging and checkpoints.

Evaluation sets (fixed per seed, the same for every arm and decay of that seed, stored as tensors):

* ``val`` -- the trainer's validation split of the default corpus: whole *files* held out by a hash of the name
  (:mod:`xmodel.training.corpus`), windows spread evenly over them (:func:`xmodel.training.data.eval_batches`).
* ``heldout`` -- windows of the *training files* that this seed's run never trains on: the last positions of
  epoch 0 of the sampler's per-source permutation (the run uses far less than one epoch).  Same distribution as
  the training stream, which is what the training loss on fresh batches measures.
* ``unseen`` -- windows of standard-library files in *neither* split (the default corpus caps its training split,
  so most files are unused): unseen documents of the same distribution as training, from far more files than
  ``val``, so a few large atypical files cannot dominate it.
* ``trained`` -- windows the trunk trained on (its last batches before the fork): how well seen text is fitted.
* ``recent`` -- the branch's own last batches (trained on just before the end; the same for every arm of a decay
  length): how much of the fresh-batch training loss is fitting what was just seen.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from xmodel.experiments.common import Diverged

EVAL_SETS = ("val", "unseen", "heldout", "trained")


@dataclass
class Arm:
    """What one branch of the decay does: ``switch`` to Muon at the fork (``"decay"``), from step 0 (``"start"``,
    the whole run on Muon, no trunk sharing) or never (``None``); ``muon_lr_scale`` multiplies the Muon lr
    (the recipe's ``0.2 * sqrt(max(A, B))`` scaling is 1)."""

    name: str
    label: str
    switch: str | None = None
    muon_lr_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.switch not in (None, "decay", "start"):
            raise ValueError(f"switch must be None, 'decay' or 'start', got {self.switch!r}")


@dataclass
class SeedResult:
    seed: int
    fork_step: int
    eval_sizes: dict[str, int]
    trunk_train: list = field(default_factory=list)
    branches: dict = field(default_factory=dict)  # "<arm>@<decay>" -> {"eval": {set: loss}, "train": [...], ...}
    wall_s: float = 0.0


def make_run(out_dir: Path, name: str, fields: dict[str, Any]):
    """The trainer's :class:`xmodel.train.Run` for ``TrainConfig`` ``fields`` (log to ``<out>/runs/<name>.log``)."""
    from xmodel.train import setup
    from xmodel.training.config import TrainConfig

    runs = out_dir / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    settings = {"save_every": 0, "keep_last": 1, "export_hf": False, "progress": False, "resume": "never"}
    cfg = TrainConfig(name=name, out_dir=str(runs), **{**settings, **fields})
    with open(runs / f"{name}.log", "a", encoding="utf-8") as log, contextlib.redirect_stdout(log):
        return setup(cfg)


def switch_to_muon(run, lr_scale: float = 1.0) -> None:
    """The trainer's AdamW -> Muon switch; the Muon groups' peak lr times ``lr_scale``."""
    from xmodel.train import _switch

    _switch(run.optimizer, run.cfg)
    for g in run.optimizer.param_groups:
        if g.get("use_muon", False):
            g["base_lr"] *= lr_scale


def train_step(run, factor: float, keep: list | None = None) -> float:
    """One optimizer step at ``factor`` x the peak lr on the sampler's next batch (appended to ``keep`` when given);
    returns the batch loss (taken before the update, so on a batch the model has not seen)."""
    from xmodel.train import grad_norm, micro_batch_loss

    opt = run.optimizer
    opt.set_lr(factor)
    batch = run.sampler.next_batch(run.cfg.batch_size)
    if keep is not None:
        keep.append(batch)
    loss = micro_batch_loss(run, batch)
    loss.backward()
    norm = grad_norm(run)
    value = float(loss.detach())
    if not (math.isfinite(value) and math.isfinite(norm)):
        raise Diverged(f"non-finite loss/gradient (loss {value}, grad norm {norm})")
    opt.step()
    opt.zero_grad()
    return value


def snapshot(run) -> tuple[bytes, dict, dict]:
    """Model + optimizer (serialised together, so the optimizer keeps pointing at the model's parameters), the
    data position, and the optimizer's plain attributes (``torch.optim.Optimizer`` pickles only its defaults,
    state and groups; Muon's options such as ``distributed`` live in attributes)."""
    buf = io.BytesIO()
    torch.save((run.model, run.optimizer), buf)
    attrs = {k: v for k, v in vars(run.optimizer.opt).items() if k not in ("defaults", "state", "param_groups")
             and not isinstance(v, (torch.Tensor, dict, list))}
    return buf.getvalue(), copy.deepcopy(run.sampler.state_dict()), attrs


def restore(run, snap: tuple[bytes, dict, dict]) -> None:
    blob, data, attrs = snap
    run.model, run.optimizer = torch.load(io.BytesIO(blob), weights_only=False)  # our own bytes, just written
    for k, v in attrs.items():
        if not hasattr(run.optimizer.opt, k):
            setattr(run.optimizer.opt, k, v)
    run.sampler.load_state_dict(data)


# ---------------------------------------------------------------------------------------------------------
# Evaluation sets
# ---------------------------------------------------------------------------------------------------------
def heldout_windows(sampler, num: int, used: int) -> torch.Tensor:
    """``num`` windows (rows) of the training sources that the first ``used`` samples of ``sampler``'s stream never
    visit: the last positions of each source's epoch-0 permutation, sources in proportion to their weights."""
    from xmodel.training.data import _affine_permutation

    k_of = np.array([sampler._source_of(g) for g in range(used)], dtype=np.int64) if used else np.zeros(0, np.int64)
    rows = []
    share = np.floor(sampler.probs * num).astype(int)
    share[: num - share.sum()] += 1
    for k, (src, m) in enumerate(zip(sampler.sources, share)):
        n = src.num_windows
        drawn = int((k_of == k).sum())
        if drawn + m > n:
            raise ValueError(f"source {src.name}: {drawn} windows trained + {m} held out > {n} windows in an epoch")
        a, b = _affine_permutation(n, sampler.seed, k, 0)
        rows += [src.window((a * i + b) % n) for i in range(n - m, n)]
    return torch.from_numpy(np.stack(rows))


def unseen_file_windows(run, num: int, max_mb: float) -> torch.Tensor:
    """``num`` windows spread evenly over the standard-library documents in neither split of the default corpus
    (at most ``max_mb`` of text, taken in the corpus's hash order), tokenised with the run's tokenizer."""
    from xmodel.training.corpus import _doc_hash, build_default_corpus, iter_default_documents
    from xmodel.training.tokenizer import TextTokenizer

    cfg = run.cfg
    train_path, val_path = build_default_corpus(cfg.cache_path, cfg.corpus_max_mb)
    used = set()
    for path in (train_path, val_path):
        with open(path, encoding="utf-8") as f:
            used.update(json.loads(line)["name"] for line in f)
    docs = sorted((d for d in iter_default_documents() if d[0] not in used), key=lambda d: _doc_hash(d[0]))
    texts, size = [], 0
    for _, text in docs:
        if size >= max_mb * 1e6:
            break
        texts.append(text)
        size += len(text.encode("utf-8"))
    tok = TextTokenizer.load(run.tokenizer_dir)
    ids = np.concatenate([np.append(np.asarray(t, dtype=np.int64), tok.eos_id) for t in tok.encode_batch(texts)])
    seq = cfg.seq_len
    n = (len(ids) - 1) // seq
    if n < 1:
        raise ValueError("no standard-library text outside the default corpus's splits")
    starts = np.linspace(0, n - 1, num=num).astype(np.int64) * seq
    return torch.from_numpy(np.stack([ids[i:i + seq + 1] for i in starts]))


def make_eval_sets(run, num_batches: int, used: int, trained_rows: torch.Tensor, unseen_mb: float = 2.0
                   ) -> dict[str, torch.Tensor]:
    """``{"val", "unseen", "heldout", "trained"}`` -> ``(rows, seq_len + 1)`` int64 tensors (``num_batches`` x
    batch rows each; ``trained`` as many as given)."""
    rows = num_batches * run.cfg.batch_size
    val = torch.cat(run.val[:num_batches])
    return {"val": val, "unseen": unseen_file_windows(run, rows, unseen_mb),
            "heldout": heldout_windows(run.sampler, rows, used), "trained": trained_rows}


def load_or_make_eval_sets(path: Path, key: dict[str, Any], make) -> dict[str, torch.Tensor]:
    """The evaluation sets stored at ``path`` (``torch.load(weights_only=True)``) when they were made for the same
    ``key`` (run shape, corpus, sizes), else ``make()`` saved there."""
    tag = json.dumps(key, sort_keys=True, default=str)
    if path.is_file():
        stored = torch.load(path, weights_only=True)
        if stored.get("key") == tag:
            return stored["sets"]
    sets = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"key": tag, "sets": sets}, path)
    return sets


@torch.no_grad()
def row_losses(run, rows: torch.Tensor, batch: int = 16) -> torch.Tensor:
    """Mean next-token loss of each row (eval mode, fp32)."""
    model = run.model
    model.eval()
    out = []
    try:
        for i in range(0, len(rows), batch):
            chunk = rows[i:i + batch].to(run.device)
            logits = model(chunk[:, :-1]).logits.float()
            loss = F.cross_entropy(logits.transpose(1, 2), chunk[:, 1:], reduction="none")
            out.append(loss.mean(dim=1).cpu())
    finally:
        model.train()
    return torch.cat(out)


# ---------------------------------------------------------------------------------------------------------
# One seed: trunk, fork, branches
# ---------------------------------------------------------------------------------------------------------
def run_seed(out_dir: Path, seed: int, fields: dict[str, Any], warmup: int, fork: int, decays: list[int],
             arms: list[Arm], eval_batches: int, trained_batches: int = 8, min_ratio: float = 1 / 16,
             unseen_mb: float = 2.0, log=print) -> dict[str, Any]:
    """Trunk (``warmup`` + stable to step ``fork``, AdamW), then each arm x decay length from the fork snapshot.

    Arms with ``switch == "start"`` run their own trunk (Muon from step 0) and fork it the same way.  Returns
    ``{"seed", "fork_step", "eval_sizes", "trunk_train", "branches": {"<arm>@<decay>": {"eval": {set: mean loss},
    "eval_rows": {set: [per-row loss]}, "train": [loss per decay step]}}, "wall_s"}``.
    """
    from xmodel.training.schedule import WSDSchedule

    t0 = time.perf_counter()
    total = fork + max(decays)
    fields = {**fields, "seed": seed, "steps": total, "decay": max(decays) / total, "eval_batches": eval_batches,
              "decay_optimizer": "adamw"}
    result: dict[str, Any] = {"seed": seed, "fork_step": fork, "warmup": warmup, "branches": {}, "trunks": {}}
    bs = fields["batch_size"]
    groups = {"decay": [a for a in arms if a.switch != "start"], "start": [a for a in arms if a.switch == "start"]}
    sets = None
    for kind, group in groups.items():
        if not group:
            continue
        run = make_run(out_dir, f"seed{seed}_{kind}", fields)
        if kind == "start":
            switch_to_muon(run, group[0].muon_lr_scale)
        stable = WSDSchedule(warmup, fork, 0, min_ratio)
        trunk = []
        trained: list[torch.Tensor] = []
        for step in range(fork):
            if step >= fork - trained_batches:  # remember the trunk's last batches: the "trained" eval set
                state = copy.deepcopy(run.sampler.state_dict())
                trained.append(run.sampler.next_batch(bs))
                run.sampler.load_state_dict(state)
            trunk.append(train_step(run, stable.factor(step)))
        result["trunks"][kind] = trunk
        if sets is None:
            used = (fork + max(decays)) * bs
            key = {"fields": fields, "warmup": warmup, "fork": fork, "used": used, "eval_batches": eval_batches,
                   "trained_batches": trained_batches, "unseen_mb": unseen_mb}
            sets = load_or_make_eval_sets(out_dir / "evalsets" / f"seed{seed}.pt", key,
                                          lambda: make_eval_sets(run, eval_batches, used, torch.cat(trained), unseen_mb))
            result["eval_sizes"] = {k: int(v.shape[0]) for k, v in sets.items()}
            result["eval_tokens"] = {k: int(v.shape[0] * (v.shape[1] - 1)) for k, v in sets.items()}
        snap = snapshot(run)
        for arm in group:
            for decay in decays:
                restore(run, snap)
                if arm.switch == "decay":
                    switch_to_muon(run, arm.muon_lr_scale)
                schedule = WSDSchedule(warmup, fork, decay, min_ratio)
                seen: list[torch.Tensor] = []
                losses = [train_step(run, schedule.factor(step), seen) for step in range(fork, fork + decay)]
                recent = torch.cat(seen[-trained_batches:])
                rows = {k: row_losses(run, v) for k, v in {**sets, "recent": recent}.items()}
                result["branches"][f"{arm.name}@{decay}"] = {
                    "arm": arm.name, "decay": decay, "train": losses, "phase": run.optimizer.phase,
                    "muon_lr": sorted({g["base_lr"] for g in run.optimizer.param_groups if g.get("use_muon")}),
                    "eval": {k: float(v.mean()) for k, v in rows.items()},
                    "eval_rows": {k: [round(x, 5) for x in v.tolist()] for k, v in rows.items()},
                }
                log(f"seed {seed} {arm.name:>12} decay {decay:>4}: " + ", ".join(
                    f"{k} {float(v.mean()):.4f}" for k, v in rows.items()) + f" ({time.perf_counter() - t0:.0f}s)")
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    return result


# ---------------------------------------------------------------------------------------------------------
# Many seeds at once, and the analysis shared by muon_switch and muon_ablation
# ---------------------------------------------------------------------------------------------------------
def _worker_init() -> None:
    torch.set_num_threads(1)


def _seed_task(out_dir: Path, seed: int, kwargs: dict[str, Any]) -> dict[str, Any]:
    import sys

    def log(msg: str) -> None:
        print(msg, flush=True, file=sys.stderr)

    return run_seed(out_dir, seed, log=log, **kwargs)


def run_seeds(out_dir: Path, seeds: list[int], jobs: int, **kwargs: Any):
    """:func:`run_seed` for every seed (``jobs`` worker processes with one torch thread each); yields results as
    seeds finish."""
    if jobs <= 1:
        for seed in seeds:
            yield _seed_task(out_dir, seed, kwargs)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_worker_init) as pool:
        futures = [pool.submit(_seed_task, out_dir, seed, kwargs) for seed in seeds]
        for future in as_completed(futures):
            yield future.result()


def measures(branch: dict[str, Any]) -> dict[str, float]:
    """The losses one branch is judged by: the three evaluation sets and the training loss on fresh batches
    over the last third of its decay (``train_end``)."""
    train = branch["train"]
    tail = train[len(train) - max(1, len(train) // 3):]
    return {**branch["eval"], "train_end": sum(tail) / len(tail)}


MEASURES = ("val", "unseen", "heldout", "train_end", "recent", "trained")
MEASURE_LABELS = {
    "val": "validation split (held-out files)",
    "unseen": "unseen files (outside both splits)",
    "heldout": "unseen windows of training files",
    "recent": "the decay's last batches (just trained on)",
    "trained": "trunk's last batches (trained before the fork)",
    "train_end": "training loss, fresh batches, last third of decay",
}


def compare(seeds: list[dict[str, Any]], arm: str, base: str, decay: int) -> dict[str, Any]:
    """Paired differences ``arm - base`` at decay length ``decay`` over the seeds that have both, per measure:
    per seed, :func:`paired_summary`, and each seed's evaluation-set standard error (sd of the per-row paired
    differences / sqrt(rows): the part of the noise a larger evaluation set would remove)."""
    from xmodel.experiments.common import paired_summary, seeds_needed

    out: dict[str, Any] = {}
    done = [s for s in seeds if f"{arm}@{decay}" in s["branches"] and f"{base}@{decay}" in s["branches"]]
    for m in MEASURES:
        per_seed, eval_se = {}, {}
        for s in done:
            a, b = s["branches"][f"{arm}@{decay}"], s["branches"][f"{base}@{decay}"]
            per_seed[str(s["seed"])] = measures(a)[m] - measures(b)[m]
            if m in a.get("eval_rows", {}):
                eval_se[str(s["seed"])] = _paired_se(a["eval_rows"][m], b["eval_rows"][m])
            elif m in a.get("eval_se_vs", {}).get(base, {}):
                eval_se[str(s["seed"])] = a["eval_se_vs"][base][m]
        summary = paired_summary(list(per_seed.values()))
        if summary["sd"] is not None:
            summary["seeds_for_se_third"] = seeds_needed(summary["sd"], summary["mean"])
        out[m] = {"per_seed": per_seed, **summary}
        if eval_se:
            out[m]["eval_set_se_per_seed"] = eval_se
            out[m]["eval_set_se_mean"] = sum(eval_se.values()) / len(eval_se)
    return out


def _paired_se(a: list[float], b: list[float]) -> float:
    d = torch.tensor(a, dtype=torch.float64) - torch.tensor(b, dtype=torch.float64)
    return round(float(d.std() / len(d) ** 0.5), 6)


def slim(seed_result: dict[str, Any]) -> dict[str, Any]:
    """A seed's result for the JSON: every per-seed number, curves rounded to 1e-4, per-row losses dropped (they
    live in the run directory's ``seed<N>.json``; their spread is summarised as the evaluation-set SE)."""
    r = copy.deepcopy(seed_result)
    for b in r["branches"].values():  # evaluation-set SE of the paired difference to every other arm
        b["eval_se_vs"] = {o["arm"]: {k: _paired_se(b["eval_rows"][k], o["eval_rows"][k]) for k in b["eval_rows"]}
                           for o in r["branches"].values() if o["decay"] == b["decay"] and o is not b}
    for b in r["branches"].values():
        b.pop("eval_rows", None)
        b["train"] = [round(x, 4) for x in b["train"]]
        b["measures"] = measures(b)
    r["trunks"] = {k: [round(x, 4) for x in v] for k, v in r["trunks"].items()}
    return r


def fmt_ci(s: dict[str, Any]) -> str:
    if s.get("ci") is None:
        return f"{s['mean']:+.4f}"
    return f"{s['mean']:+.4f} [{s['ci'][0]:+.4f}, {s['ci'][1]:+.4f}]"
