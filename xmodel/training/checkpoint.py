"""Training checkpoints: atomic, resumable, sharded under torch.distributed; HF export of the final model.

Layout: ``<run>/checkpoints/step_00000100/`` with ``meta.json`` (step, optimizer phase, data position, the
training config) plus either ``state.pt`` (one process: model, optimizer, RNG) or a
``torch.distributed.checkpoint`` directory (several processes: each rank writes its shards) and ``rng_<rank>.pt``.

Atomicity: everything is written into ``checkpoints/.tmp-step_00000100``, files and directory are fsynced,
``meta.json`` is written last, then the directory is renamed to its final name (an atomic rename on POSIX) and the
parent fsynced.  Only directories named ``step_*`` with a ``meta.json`` count as checkpoints, so a process killed
mid-save (even ``kill -9``) leaves the previous checkpoint as the latest; leftover ``.tmp-*`` / ``.old-*``
directories are removed by the next save.  The last ``keep_last`` checkpoints are kept.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from xmodel.training.distributed import DistInfo, unwrap

META = "meta.json"
STATE = "state.pt"


def _fsync_path(path: Path) -> None:
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if path.is_dir() else 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*")):
        if p.is_file():
            _fsync_path(p)
    for p in sorted([path, *[q for q in path.rglob("*") if q.is_dir()]]):
        _fsync_path(p)


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and (p / META).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def read_meta(path: Path) -> dict[str, Any]:
    meta_file = Path(path) / META
    if not meta_file.is_file():
        raise ValueError(f"--resume: {path} is not a checkpoint directory (no {META})")
    try:
        return json.loads(meta_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"--resume: {meta_file} is corrupt: {exc}") from None


def save_checkpoint(run_dir: Path, step: int, model: torch.nn.Module, optimizer, meta: dict[str, Any],
                    info: DistInfo, keep_last: int = 2) -> Path:
    """Write checkpoint ``step`` atomically (every rank calls this); returns its final path."""
    root = Path(run_dir) / "checkpoints"
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp-step_{step:08d}"
    if info.is_main:
        root.mkdir(parents=True, exist_ok=True)
        for stale in [*root.glob(".tmp-*"), *root.glob(".old-*")]:
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    info.barrier()

    if info.world == 1:
        # the plain module's keys, so a run can resume with or without --compile
        torch.save({"model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(), "rng": rng_state()},
                   tmp / STATE)
    else:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(model, optimizer.optimizers)
        dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(tmp))
        torch.save(rng_state(), tmp / f"rng_{info.rank}.pt")
    info.barrier()

    if info.is_main:
        meta = {**meta, "step": step, "world": info.world, "format": "torch" if info.world == 1 else "dcp"}
        (tmp / META).write_text(json.dumps(meta, indent=2, default=str) + "\n", encoding="utf-8")
        _fsync_tree(tmp)
        old = root / f".old-{final.name}"
        if final.exists():  # the same step saved again (e.g. stopped right after a resume): swap, then delete
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync_path(root)
        shutil.rmtree(old, ignore_errors=True)
        for expired in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(expired, ignore_errors=True)
    info.barrier()
    return final


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer, info: DistInfo) -> dict[str, Any]:
    """Restore model, optimizer and RNG from ``path`` in place (every rank calls this); returns its meta."""
    path = Path(path)
    meta = read_meta(path)
    if meta.get("world") != info.world:
        raise ValueError(
            f"--resume: {path} was written by {meta.get('world')} process(es), this run has {info.world}; "
            "resume with the same number of processes"
        )
    if info.world == 1:
        try:
            state = torch.load(path / STATE, map_location="cpu", weights_only=False)
        except Exception as exc:
            raise ValueError(f"--resume: cannot read {path / STATE}: {exc}") from None
        unwrap(model).load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"])
    else:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_sd, optim_sd = get_state_dict(model, optimizer.optimizers)
        state = {"model": model_sd, "optimizer": optim_sd}
        dcp.load(state, checkpoint_id=str(path))
        set_state_dict(model, optimizer.optimizers, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"])
        rng_file = path / f"rng_{info.rank}.pt"
        if rng_file.is_file():
            set_rng_state(torch.load(rng_file, map_location="cpu", weights_only=False))
    return meta


def full_model_state(model: torch.nn.Module, info: DistInfo) -> dict[str, torch.Tensor] | None:
    """The unsharded model state dict on CPU (rank 0 gets it; other ranks None)."""
    if info.world == 1:
        return {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return state if info.is_main else None


def export_hf(model: torch.nn.Module, model_config, out: Path, tokenizer_dir: Path | None, info: DistInfo) -> Path | None:
    """Save the final weights as an HF checkpoint directory (``Xmodel.save_pretrained``), from rank 0."""
    from xmodel.model import Xmodel

    state = full_model_state(model, info)
    if info.is_main:
        with torch.device("meta"):
            plain = Xmodel(model_config)
        state = {k.replace("_orig_mod.", "").replace("module.", ""): v for k, v in state.items()}
        wanted = plain.state_dict().keys()  # FP8 modules add amax/scale buffers: not part of the HF checkpoint
        missing = sorted(set(wanted) - set(state) - {"lm_head.weight"})
        if missing:
            raise RuntimeError(f"internal error: the trained model lacks {missing[:5]} for the HF export")
        plain.load_state_dict({k: v for k, v in state.items() if k in wanted}, strict=False, assign=True)
        plain.tie_weights()
        tmp = out.with_name(f".{out.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        plain.save_pretrained(tmp, tokenizer_dir=tokenizer_dir)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    return out if info.is_main else None
