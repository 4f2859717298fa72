"""Building a run from its config: model config, tokenizer and data, FP8 conversion, resume checks.

Everything here validates input and raises ``ValueError`` naming the flag; :func:`xmodel.train.setup` calls it
before anything is written to the run directory.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import torch

from xmodel.training import checkpoint as ckpt
from xmodel.training.config import TrainConfig
from xmodel.training.data import SourceSpec, load_source
from xmodel.training.distributed import DistInfo


def log0(info: DistInfo, *args) -> None:
    if info.is_main:
        print(*args, flush=True)


def build_model_config(cfg: TrainConfig):
    return cfg.model_config()  # validated when the config was built; errors name the --model. field


def check_writable_dir(path: Path, flag: str) -> None:
    """Raise ``ValueError`` naming ``flag`` unless ``path`` is a directory this process can write, or can be created
    (its nearest existing parent is a writable directory).  Creates nothing."""
    path = Path(path).expanduser()
    probe = path
    while not probe.exists() and probe != probe.parent:
        if probe.is_symlink():  # a dangling link
            raise ValueError(f"{flag}: cannot create {path}: {probe} is a broken symbolic link")
        probe = probe.parent
    if not probe.is_dir():
        what = "the path itself" if probe == path else f"its parent {probe}"
        raise ValueError(f"{flag}: cannot use {path}: {what} is a file, not a directory; choose another {flag}")
    if not os.access(probe, os.W_OK | os.X_OK):
        what = "it" if probe == path else f"its parent {probe}"
        raise ValueError(f"{flag}: cannot write {path}: permission denied on {what}; choose a directory you can "
                         f"write, or fix its permissions")


def load_data(cfg: TrainConfig, info: DistInfo):
    """Tokenizer, training sources and validation sources (rank 0 fills the caches first)."""
    from xmodel.training.corpus import build_default_corpus
    from xmodel.training.tokenizer import TextTokenizer, default_tokenizer

    cache = cfg.cache_path
    train_specs = [SourceSpec.parse(e, "data") for e in cfg.data]
    val_specs = [SourceSpec.parse(e, "val-data") for e in cfg.val_data]
    for spec in train_specs:
        spec.files("data")  # fail fast on missing paths, on every rank
    for spec in val_specs:
        spec.files("val-data")

    result = None
    for turn in ("main", "others"):  # rank 0 builds caches, the others then read them
        if (turn == "main") == info.is_main:
            default_val = None
            all_bin = bool(cfg.data) and all(f.suffix == ".bin" for spec in train_specs + val_specs
                                             for f in spec.files())
            if all_bin and cfg.tokenizer is None:
                tokenizer = None  # pre-tokenised data needs no tokenizer (the HF export then has none)
            elif not cfg.data or cfg.tokenizer is None:
                t0 = time.perf_counter()
                corpus_train, corpus_val = build_default_corpus(cache, cfg.corpus_max_mb)
                if not cfg.data:
                    train_specs = [SourceSpec(str(corpus_train))]
                    default_val = SourceSpec(str(corpus_val))
                tokenizer = (TextTokenizer.load(cfg.tokenizer) if cfg.tokenizer
                             else default_tokenizer(corpus_train, cache, cfg.vocab_size))
                log0(info, f"default corpus {corpus_train.parent} ready ({time.perf_counter() - t0:.1f} s)")
            else:
                tokenizer = TextTokenizer.load(cfg.tokenizer)
            log = (lambda msg: log0(info, msg))
            train = [load_source(s, tokenizer, cache, cfg.seq_len, "data", log) for s in train_specs]
            if val_specs:
                val = [load_source(s, tokenizer, cache, cfg.seq_len, "val-data", log) for s in val_specs]
            elif default_val is not None:
                val = [load_source(default_val, tokenizer, cache, cfg.seq_len, "data", log)]
            else:
                if cfg.val_fraction == 0:
                    raise ValueError("--val-fraction: 0 leaves no validation data; give --val-data or a fraction > 0")
                pairs = []
                for s in train:
                    if s.num_windows < 2:
                        raise ValueError(f"--data: {s.name} has one sequence; too short to hold out validation data "
                                         "(give --val-data)")
                    pairs.append(s.split(cfg.val_fraction))
                train, val = [p[0] for p in pairs], [p[1] for p in pairs]
            result = (tokenizer, train, val, train_specs, val_specs)
        info.barrier()
    return result


def fp8_convert(model: torch.nn.Module, cfg: TrainConfig, device: torch.device, info: DistInfo) -> None:
    supported = device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)
    if not supported and not cfg.fp8_emulate:
        where = (f"{torch.cuda.get_device_name(device)} (compute capability "
                 f"{'.'.join(map(str, torch.cuda.get_device_capability(device)))})" if device.type == "cuda" else "a CPU")
        raise ValueError(
            f"--fp8 {cfg.fp8}: FP8 training needs a CUDA GPU with FP8 tensor cores (compute capability >= 8.9, "
            f"e.g. H100, L40S, RTX 4090); this run is on {where}. Drop --fp8, or add --fp8-emulate to run the "
            "reference FP8 quantisation for experiments (slow, not a speed-up)"
        )
    from xkernels.fp8 import FP8Recipe
    from xkernels.fp8.linear import convert_to_fp8

    recipe = FP8Recipe.from_name(cfg.fp8, reduce_amax_group=True if info.active else None)
    convert_to_fp8(model, recipe)
    label = "EMULATED (reference quantisation, no FP8 hardware)" if not supported else "on FP8 tensor cores"
    log0(info, f"fp8: transformer linears converted, recipe {recipe.scaling}/{recipe.format}, {label}")


def run_identity(cfg: TrainConfig, model_config, tokenizer, train_specs, val_specs, info: DistInfo) -> dict:
    """What must not change between a run and its resumption."""
    return {
        "model": model_config.to_dict(),
        "seq_len": cfg.seq_len,
        "tokenizer": tokenizer.fingerprint if tokenizer is not None else None,
        "data": [dataclasses.asdict(s) for s in train_specs],
        "val_data": [dataclasses.asdict(s) for s in val_specs],
        "seed": cfg.seed,
    }


def check_compatible(saved: dict, current: dict, path: Path) -> None:
    diffs = [k for k in current if json.dumps(saved.get(k), sort_keys=True, default=str)
             != json.dumps(current[k], sort_keys=True, default=str)]
    if diffs:
        lines = []
        for k in diffs:
            if k == "model" and isinstance(saved.get(k), dict):
                sub = [f for f in current[k] if saved[k].get(f) != current[k][f]]
                lines.append("model: " + ", ".join(f"{f} {saved[k].get(f)!r} -> {current[k][f]!r}" for f in sub))
            else:
                lines.append(f"{k}: {saved.get(k)!r} -> {current[k]!r}")
        raise ValueError(
            f"--resume: the checkpoint {path} is from an incompatible run:\n  " + "\n  ".join(lines)
            + "\nrestore those settings, or start a new run with --name NEW (or --resume never in a new --out-dir)"
        )


def choose_checkpoint(cfg: TrainConfig, log) -> ckpt.Checked | None:
    """The checkpoint to resume from (``--resume``): None for a fresh run.  ``auto``: the newest valid checkpoint of
    the run directory, each newer damaged one reported and skipped; a path: exactly that checkpoint (or the newest
    valid one of that run directory), which must be usable."""
    try:
        if cfg.resume == "never":
            existing = ckpt.latest_checkpoint(cfg.run_dir)
            if existing is not None:
                raise ValueError(
                    f"--resume never: {cfg.run_dir} already holds checkpoints ({existing.name}); it will not be "
                    "overwritten. Choose another --name, or --resume auto to continue it"
                )
            return None
        if cfg.resume == "auto":
            return ckpt.select_checkpoint(cfg.run_dir, log)
        path = Path(cfg.resume)
        if (path / "checkpoints").is_dir():  # a run directory
            found = ckpt.select_checkpoint(path, log)
            if found is None:
                raise ValueError(f"--resume: {path} holds no complete checkpoint")
            return found
        return ckpt.check_checkpoint(path)
    except ckpt.CheckpointError as exc:
        text = str(exc)
        raise ckpt.CheckpointError(text if text.startswith("--resume") else f"--resume: {text}") from None


# The settings that define the lr schedule and the optimizer phase of every step.
SCHEDULE_KEYS = ("steps", "warmup", "decay", "decay_start", "decay_shape", "min_lr_ratio", "decay_optimizer")
HYPER_KEYS = ("lr", "lr_embed", "beta1", "beta2", "eps", "weight_decay", "grad_clip", "muon_momentum",
              "muon_nesterov", "muon_ns_steps", "muon_adjust_lr", "muon_dtype")


def _phase_after(cfg: TrainConfig, step: int) -> str:
    """The optimizer phase after ``step`` completed steps (the switch happens before step index decay_start)."""
    muon = cfg.decay_optimizer == "muon" and cfg.decay_steps > 0 and step > cfg.decay_start_step
    return "muon" if muon else "adamw"


def check_schedule_change(saved: dict, cfg: TrainConfig, step: int, phase: str, path: Path, log) -> None:
    """Resuming keeps the steps already taken, so a changed schedule is accepted only when it agrees with the saved
    one on every step before ``step`` (and on the optimizer phase); then it governs the rest of the run and a note
    says so.  Otherwise refuse, saying what would change and how to continue instead (``--init-from``).

    The rule, in short: *the past is fixed, only the future may change*.  Typical accepted change: a longer run whose
    decay is placed by absolute steps after the checkpoint.  Typical refusal: ``--steps`` raised with a fractional
    ``--decay`` after the decay started -- the lr would jump from the floor back to the peak.
    """
    changed = [k for k in SCHEDULE_KEYS if k in saved and saved[k] != getattr(cfg, k)]
    hyper = [k for k in HYPER_KEYS if k in saved and saved[k] != getattr(cfg, k)]
    if hyper:
        log("note: changed since the checkpoint (applies from step {}): {}".format(
            step, ", ".join(f"--{k.replace('_', '-')} {saved[k]!r} -> {getattr(cfg, k)!r}" for k in hyper)))
    if not changed:
        return
    try:
        old = cfg.replace(**{k: saved[k] for k in SCHEDULE_KEYS if k in saved})
    except ValueError:
        log(f"warning: the checkpoint's schedule settings are not valid today; cannot compare them with this run's")
        return
    from xmodel.training.schedule import WSDSchedule

    def schedule(c: TrainConfig) -> WSDSchedule:
        return WSDSchedule(c.warmup_steps, c.decay_start_step, c.decay_steps, c.min_lr_ratio, c.decay_shape)

    s_old, s_new = schedule(old), schedule(cfg)
    first = next((s for s in range(min(step, max(old.steps, cfg.steps))) if s_old.factor(s) != s_new.factor(s)), None)
    flags = ", ".join(f"--{k.replace('_', '-')} {saved[k]!r} -> {getattr(cfg, k)!r}" for k in changed)
    if first is None and _phase_after(cfg, step) == phase:
        log(f"note: schedule changed on resume ({flags}); steps before {step} are unchanged, from step {step} on the "
            f"lr follows the new schedule (x{s_new.factor(step):.4g} of the peak at step {step}, "
            f"was x{s_old.factor(step):.4g})")
        return
    if first is not None:
        what = (f"step {first} ran at x{s_old.factor(first):.4g} of the peak lr ({s_old.phase(first)}) but the new "
                f"schedule puts it at x{s_new.factor(first):.4g} ({s_new.phase(first)})")
    else:
        what = f"the checkpoint is in the {phase} phase, the new schedule has {_phase_after(cfg, step)} at step {step}"
    raise ValueError(
        f"--steps/--warmup/--decay: resuming {path} (step {step}) with a changed schedule ({flags}) would rewrite "
        f"the steps already taken: {what}; the lr would continue at x{s_new.factor(step):.4g} instead of "
        f"x{s_old.factor(step):.4g}. Resuming keeps the past, so only the future may change: restore "
        + ", ".join(f"--{k.replace('_', '-')} {saved[k]!r}" for k in changed)
        + " (schedule lengths given in steps, e.g. --decay-start N, can extend a run without moving past steps), "
        f"or train on from this checkpoint as a new phase with its own schedule: --init-from {path} --name NEW"
    )
