"""Building a run from its config: model config, tokenizer and data, FP8 conversion, resume checks.

Everything here validates input and raises ``ValueError`` naming the flag; :func:`xmodel.train.setup` calls it
before anything is written to the run directory.
"""

from __future__ import annotations

import dataclasses
import json
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
    from xmodel.config import XmodelConfig

    try:
        return XmodelConfig.from_preset(cfg.preset, **cfg.model)
    except TypeError as exc:  # unknown field name
        known = ", ".join(f.name for f in dataclasses.fields(XmodelConfig) if f.name != "extra")
        raise ValueError(f"--model.*: {exc}; XmodelConfig fields: {known}") from None
    except ValueError as exc:
        flag = "--preset" if "preset" in str(exc) else "--model.*"
        raise ValueError(f"{flag}: {exc}") from None


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


def resolve_resume(cfg: TrainConfig) -> Path | None:
    if cfg.resume == "never":
        existing = ckpt.latest_checkpoint(cfg.run_dir)
        if existing is not None:
            raise ValueError(
                f"--resume never: {cfg.run_dir} already holds checkpoints ({existing.name}); it will not be "
                "overwritten. Choose another --name, or --resume auto to continue it"
            )
        return None
    if cfg.resume == "auto":
        return ckpt.latest_checkpoint(cfg.run_dir)
    path = Path(cfg.resume)
    if (path / "checkpoints").is_dir():  # a run directory
        found = ckpt.latest_checkpoint(path)
        if found is None:
            raise ValueError(f"--resume: {path} holds no complete checkpoint")
        return found
    ckpt.read_meta(path)
    return path
