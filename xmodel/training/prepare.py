"""Building a run from its config: model config, tokenizer and data, FP8 conversion, resume checks.

Everything here validates input and raises ``ValueError`` naming the flag; :func:`xmodel.train.setup` calls it
before anything is written to the run directory.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
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


@functools.lru_cache(maxsize=4)
def _load_tokenizer(path: str, mtime_ns: int):
    from xmodel.training.tokenizer import TextTokenizer

    return TextTokenizer.load(path)


def load_tokenizer(path: str | Path):
    """``TextTokenizer.load`` (cached: setup sizes the model from the tokenizer before it loads the data)."""
    p = Path(path).expanduser()
    f = p / "tokenizer.json" if p.is_dir() else p
    return _load_tokenizer(str(p), f.stat().st_mtime_ns if f.is_file() else 0)


def _pretokenised(cfg: TrainConfig) -> bool:
    """Every --data/--val-data source is token data (shards, prepared directories, Megatron datasets)."""
    from xmodel.training.data import file_kind

    specs = [SourceSpec.parse(e, "data") for e in cfg.data] + [SourceSpec.parse(e, "val-data") for e in cfg.val_data]
    return bool(cfg.data) and all(file_kind(f) != "text" for s in specs for f in s.files())


def run_tokenizer(cfg: TrainConfig):
    """The run's tokenizer file: ``--tokenizer``, else (for prepared data only) the tokenizer its manifest names if it
    is still there; None for the default BPE and for token data without one."""
    if cfg.tokenizer:
        return load_tokenizer(cfg.tokenizer)
    if _pretokenised(cfg):
        for entry in cfg.data + cfg.val_data:
            f = SourceSpec.parse(entry).files()[0]
            if f.name == "manifest.json":
                try:
                    path = json.loads(f.read_text(encoding="utf-8"))["tokenizer"]["path"]
                except (OSError, ValueError, KeyError, TypeError):
                    continue
                if Path(path).is_file():
                    return load_tokenizer(path)
    return None


def build_model_config(cfg: TrainConfig):
    """The model config, its vocabulary sized from the tokenizer (before any data is read): the tokenizer's ids
    rounded up to a multiple of 128, or the preset's vocabulary if that is larger; an explicit
    ``--model.vocab_size`` must hold every id.  Errors name the flag."""
    from xmodel.config import XmodelConfig
    from xmodel.training.config import DEFAULT_BPE_VOCAB
    from xmodel.training.tokenizer import padded_vocab_size

    base = cfg.model_config()  # validated when the config was built; errors name the --model. field
    tokenizer = run_tokenizer(cfg)
    if tokenizer is not None:
        ids, what = tokenizer.vocab_size, f"the tokenizer {tokenizer.path}"
    elif _pretokenised(cfg):
        return base  # token data without a tokenizer: the ids are checked against the model when loaded
    else:
        ids = cfg.vocab_size or DEFAULT_BPE_VOCAB
        what = f"the default BPE (--vocab-size {ids})"
    if "vocab_size" in cfg.model:
        if base.vocab_size < ids:
            raise ValueError(f"--model.vocab_size {base.vocab_size} is smaller than the {ids} ids of {what}; drop it "
                             f"(the model then takes {max(padded_vocab_size(ids), ids)}: the tokenizer's size rounded "
                             f"up to a multiple of 128) or give at least --model.vocab_size {ids}")
        return base
    vocab = max(padded_vocab_size(ids), XmodelConfig.from_preset(cfg.preset).vocab_size)
    return base if vocab == base.vocab_size else XmodelConfig.from_preset(cfg.preset, **{**cfg.model,
                                                                                         "vocab_size": vocab})


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
    """Tokenizer, training sources, validation sources and the document framing (rank 0 fills the caches first)."""
    from xmodel.training.config import DEFAULT_BPE_VOCAB
    from xmodel.training.corpus import build_default_corpus
    from xmodel.training.preprocess import default_workers
    from xmodel.training.tokenizer import default_tokenizer, framed_tokenizer_dir

    cache = cfg.cache_path
    train_specs = [SourceSpec.parse(e, "data") for e in cfg.data]
    val_specs = [SourceSpec.parse(e, "val-data") for e in cfg.val_data]
    for spec in train_specs:
        spec.files("data")  # fail fast on missing paths, on every rank
    for spec in val_specs:
        spec.files("val-data")
    workers = cfg.prepare_workers or default_workers()
    pretokenised = _pretokenised(cfg)
    file_tokenizer = run_tokenizer(cfg)
    if file_tokenizer is None and pretokenised and cfg.bos != "auto":
        raise ValueError(f"--bos {cfg.bos}: the data is already tokenised (its framing is fixed) and no tokenizer is "
                         "known; drop --bos, or pass the --tokenizer the data was made with")
    if file_tokenizer is not None:
        file_tokenizer.framing(cfg.bos)  # a BOS asked for but missing: fail before any work

    result = None
    for turn in ("main", "others"):  # rank 0 builds caches, the others then read them
        if (turn == "main") == info.is_main:
            default_val = None
            tokenizer = file_tokenizer
            if tokenizer is None and not pretokenised:
                t0 = time.perf_counter()
                corpus_train, corpus_val = build_default_corpus(cache, cfg.corpus_max_mb)
                if not cfg.data:
                    train_specs = [SourceSpec(str(corpus_train))]
                    default_val = SourceSpec(str(corpus_val))
                tokenizer = default_tokenizer(corpus_train, cache, cfg.vocab_size or DEFAULT_BPE_VOCAB)
                log0(info, f"default corpus {corpus_train.parent} ready ({time.perf_counter() - t0:.1f} s)")
            elif tokenizer is None and not cfg.data:
                raise ValueError("--data: no data given")  # pragma: no cover - pretokenised implies data
            framing = tokenizer.framing(cfg.bos) if tokenizer is not None else None
            if framing is not None:
                log0(info, f"tokenizer {tokenizer.path}: {tokenizer.vocab_size} ids; documents framed as "
                           f"{framing.describe()} (--bos {cfg.bos}"
                           + (f", tokenizer_config.json add_bos_token {str(tokenizer.add_bos_token).lower()})"
                              if cfg.bos == "auto" else ")"))
                if info.is_main:
                    tokenizer.export_dir = framed_tokenizer_dir(tokenizer, framing, cache)
            log = (lambda msg: log0(info, msg))
            progress = cfg.progress and info.is_main

            def load(spec: SourceSpec, flag: str):
                return load_source(spec, tokenizer, cache, cfg.seq_len, flag, log, framing, workers, progress)

            train = [load(s, "data") for s in train_specs]
            if val_specs:
                val = [load(s, "val-data") for s in val_specs]
            elif default_val is not None:
                val = [load(default_val, "data")]
            else:
                train, val = hold_out(cfg, train)
            result = (tokenizer, train, val, train_specs, val_specs)
        info.barrier()
    if result[0] is not None and not info.is_main:
        result[0].export_dir = framed_tokenizer_dir(result[0], result[0].framing(cfg.bos), cache, write=False)
    return result


def hold_out(cfg: TrainConfig, train: list) -> tuple[list, list]:
    """Split validation windows off the end of each training source: ``--val-tokens`` (shared in proportion to the
    sources' sizes) or ``--val-fraction`` of each."""
    if cfg.val_tokens is None and cfg.val_fraction == 0:
        raise ValueError("--val-fraction: 0 leaves no validation data; give --val-data or a fraction > 0")
    for s in train:
        if s.num_windows < 2:
            raise ValueError(f"--data: {s.name} has one sequence; too short to hold out validation data "
                             "(give --val-data)")
    if cfg.val_tokens is None:
        pairs = [s.split(cfg.val_fraction) for s in train]
    else:
        want = math.ceil(cfg.val_tokens / cfg.seq_len)
        total = sum(s.num_windows for s in train)
        if want >= total:
            raise ValueError(f"--val-tokens {cfg.val_tokens}: that is {want} sequences of {cfg.seq_len}, but the "
                             f"training data holds only {total}; give fewer or a separate --val-data")
        shares = [max(1, min(s.num_windows - 1, round(want * s.num_windows / total))) for s in train]
        pairs = [s.split_count(n) for s, n in zip(train, shares)]
    return [p[0] for p in pairs], [p[1] for p in pairs]


SMALL_VALIDATION = 65536  # tokens; below this the validation loss is noisy (a warning says so)


def validation_set(cfg: TrainConfig, val: list, info: DistInfo) -> list[torch.Tensor]:
    """The fixed validation batches (every sequence distinct), reported at start with a warning when small."""
    from xmodel.training.data import eval_batches

    windows = math.ceil(cfg.val_tokens / cfg.seq_len) if cfg.val_tokens else None
    batches = eval_batches(val, cfg.eval_batches, cfg.batch_size, info.rank, info.world, windows)
    rows = sum(b.shape[0] for b in batches) * info.world
    available = sum(s.num_windows for s in val)
    tokens = rows * cfg.seq_len
    log0(info, f"validation {rows} sequences x {cfg.seq_len} = {tokens:,} tokens ({len(batches)} batches, each "
               f"sequence once; {available} available in {', '.join(Path(s.name).name for s in val)})")
    if tokens < SMALL_VALIDATION:
        log0(info, f"warning: the validation set is small ({tokens:,} tokens < {SMALL_VALIDATION:,}); its loss is "
                   "noisy. Give more with --val-tokens N, --val-fraction or --val-data"
                   + ("" if cfg.val_tokens or available > rows else " (every available sequence is used)"))
    return batches


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
        "framing": tokenizer.framing(cfg.bos).key() if tokenizer is not None else None,
        "data": [dataclasses.asdict(s) for s in train_specs],
        "val_data": [dataclasses.asdict(s) for s in val_specs],
        "seed": cfg.seed,
    }


def check_compatible(saved: dict, current: dict, path: Path) -> None:
    def same(k: str) -> bool:
        if k == "framing" and k not in saved and (current[k] is None or current[k][0] is None):
            return True  # checkpoints from before the framing was recorded trained on document + EOS
        return json.dumps(saved.get(k), sort_keys=True, default=str) == json.dumps(current[k], sort_keys=True,
                                                                                   default=str)

    diffs = [k for k in current if not same(k)]
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
