"""Training checkpoints: atomic, validated on resume, loaded without running code; HF export of the final model.

Layout: ``<run>/checkpoints/step_00000100/`` with ``meta.json`` (step, optimizer phase, data position, the
training config, the size of every file, whether the weights were finite) plus either ``state.pt`` (one process:
model, optimizer, RNG) or a ``torch.distributed.checkpoint`` directory (several processes: each rank writes its
shards) and ``rng_<rank>.pt``.

**Any world size.**  Both formats load at every world size (:func:`load_checkpoint`): a DCP checkpoint is resharded
on load (each rank reads the parts of the saved shards it now holds; one process reads them all), a ``state.pt`` is
read by every rank of a larger run, which keeps its own shard of each tensor.  ``meta.json`` records the world size
and the training config, so a resume can say what changed (and refuse a changed global batch, see ``xmodel.train``).

**Atomicity.**  Everything is written into ``checkpoints/.tmp-step_00000100`` through ordinary file objects (so a
full disk raises ``OSError(ENOSPC)``, not torch's opaque zip-writer error), files and directory are fsynced,
``meta.json`` is written last, then the directory is renamed to its final name (atomic on POSIX) and the parent
fsynced.  Only ``step_*`` directories with a ``meta.json`` count as checkpoints, so a process killed mid-save leaves
the previous checkpoint as the newest; a failed save removes its temporary directory, and leftover ``.tmp-*`` /
``.old-*`` directories are removed by the next save.  The newest ``keep_last`` checkpoints are kept.

**Disk space.**  Before writing, the save compares the free space with the checkpoint's size (its tensors' bytes);
when short, it first removes the checkpoints that ``keep_last`` would remove after this save anyway -- never the
newest complete one, so a crash mid-save still leaves one.  If the write still fails, the error says how many bytes
were needed and free and what can be deleted.

**Validation** (:func:`check_checkpoint`): ``meta.json`` parses and names its step; every file recorded in it is
present at its recorded size (a truncated or missing ``state.pt`` or shard is caught without reading it); the weights
were finite when saved; a ``state.pt`` loads and holds finite weights.  :func:`select_checkpoint` takes the newest
checkpoint that passes and reports each newer one it skipped, with the reason.

**Loading never runs code from a file.**  ``state.pt`` / ``rng_<rank>.pt`` are read with
``torch.load(weights_only=True)`` (tensors and plain containers; the RNG states are stored as tensors and ints for
this); a ``torch.distributed.checkpoint``'s ``.metadata`` (plain pickle in PyTorch) is read through an unpickler that
admits only the checkpoint-metadata classes, and its non-tensor entries with ``weights_only=True``.  A file that
asks for anything else is refused with :class:`UnsafeCheckpointError` before any of it is executed.
"""

from __future__ import annotations

import dataclasses
import enum
import errno
import io
import json
import os
import pickle
import random
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist

from xmodel.training.distributed import DistInfo, unwrap
from xmodel.training.faults import fault_point

META = "meta.json"
STATE = "state.pt"


class CheckpointError(ValueError):
    """A checkpoint cannot be used (missing, damaged, incompatible); the message names it and why."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint file holds pickled objects beyond plain data; it was refused before anything in it ran."""


class StorageError(RuntimeError):
    """Writing a checkpoint or export failed (disk full, permission, ...); the message says what and where."""


# ---------------------------------------------------------------------------------------------------------
# I/O errors in words
# ---------------------------------------------------------------------------------------------------------
def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def free_bytes(path: Path) -> int | None:
    """Free bytes on the filesystem holding ``path`` (or its nearest existing parent); None if unknown."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def explain_os_error(exc: OSError, doing: str, path: Path | None = None, needed: int | None = None) -> str:
    """One sentence for an ``OSError``: what failed, where, and why in plain words."""
    where = exc.filename or path
    code = exc.errno
    if code in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
        free = free_bytes(Path(where)) if where else None
        amounts = ", ".join(filter(None, [f"about {human_bytes(needed)} needed" if needed else None,
                                          f"{human_bytes(free)} free" if free is not None else None]))
        kind = "disk quota exceeded" if code != errno.ENOSPC else "disk full"
        return f"{kind} while {doing}: no space left for {where}" + (f" ({amounts})" if amounts else "")
    if code == errno.EFBIG:
        return (f"file too large while {doing}: {where} hit this process's file-size limit (ulimit -f / "
                f"RLIMIT_FSIZE)" + (f"; about {human_bytes(needed)} needed" if needed else ""))
    if code in (errno.EACCES, errno.EPERM):
        return f"permission denied while {doing}: {where}"
    if code == errno.EROFS:
        return f"read-only file system while {doing}: {where}"
    if code == errno.ENOTDIR:
        return f"not a directory while {doing}: a part of {where} is a file, not a directory"
    if code == errno.EISDIR:
        return f"is a directory while {doing}: {where} (expected a file)"
    return f"{exc.strerror or exc} while {doing}: {where}"


def _os_error_in(exc: BaseException) -> OSError | None:
    """The OSError behind ``exc`` (itself, its cause/context, or a DCP ``CheckpointException``'s failures)."""
    seen = set()
    todo = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError):
            return e
        todo += [e.__cause__, e.__context__]
        failures = getattr(e, "failures", None)  # torch.distributed.checkpoint.CheckpointException: rank -> (exc, tb)
        if isinstance(failures, dict):
            todo += [f[0] if isinstance(f, tuple) else f for f in failures.values()]
    return None


def _comm_device() -> torch.device:
    """Where collectives' tensors live: the current GPU under NCCL, else the CPU (gloo)."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _agree(info: DistInfo, ok: bool) -> bool:
    """True on every rank iff ``ok`` on every rank (so a failure on one rank cannot leave the others waiting)."""
    if not info.active:
        return ok
    t = torch.tensor([1.0 if ok else 0.0], device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


# ---------------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------------
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


def _torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` through a Python file object, fsynced: a full disk raises ``OSError(ENOSPC)`` here (given a
    path, torch's zip writer reports it as ``RuntimeError: ... unexpected pos``)."""
    try:
        with open(path, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
    except Exception as exc:
        # a failed write() can surface as torch's RuntimeError from the zip writer's cleanup, the OSError as its
        # context: report the OSError, with the file's name
        os_error = _os_error_in(exc)
        if os_error is None:
            raise
        raise OSError(os_error.errno, os_error.strerror, os_error.filename or str(path)) from None


def _file_sizes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------------------
# RNG state as tensors and ints (loadable with weights_only=True)
# ---------------------------------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    npy = state["numpy"]
    if isinstance(npy, dict):
        np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                             npy["cached_gaussian"]))
    else:  # a checkpoint written before the RNG state was stored as tensors: the numpy tuple itself
        np.random.set_state(tuple(npy))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _numpy_array_globals() -> list:
    """What numpy arrays need under ``weights_only`` (only for reading checkpoints written before the RNG state was
    stored as tensors; an array of plain numbers, no code)."""
    core = getattr(np, "_core", None) or np.core
    return [core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def safe_torch_load(path: Path) -> Any:
    """``torch.load(weights_only=True)``; a file that needs anything beyond tensors and plain containers raises
    :class:`UnsafeCheckpointError` (nothing in it was executed)."""
    try:
        with torch.serialization.safe_globals(_numpy_array_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        found = re.search(r"GLOBAL ([\w.]+)", text)
        if found is None and "reduce" not in text.lower():  # garbage, not a request for code
            detail = text.split("WeightsUnpickler error:")[-1].strip().splitlines()[0] if text.strip() else ""
            raise CheckpointError(f"{path} is not a readable torch file ({detail[:200]})") from None
        # torch's text suggests allow-listing the global; only its name is useful here
        detail = f"it asks for {found.group(1)}" if found else "it asks to call a function"
        raise UnsafeCheckpointError(
            f"refused to load {path}: it holds pickled Python objects, not just tensors and plain data ({detail}). "
            "Loading it could run code, so it was not loaded and nothing in it was executed. Use checkpoints this "
            "trainer wrote; if you trust the file's source, convert it to a plain state dict yourself"
        ) from None


# ---------------------------------------------------------------------------------------------------------
# torch.distributed.checkpoint without arbitrary unpickling
# ---------------------------------------------------------------------------------------------------------
_DCP_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem",
                "torch.distributed.checkpoint._extension")


class _MetadataUnpickler(pickle.Unpickler):
    """Admits only what a DCP ``.metadata`` holds: its dataclasses and enums, ``torch.Size``, torch dtypes, the layout
    decoder and ``pathlib`` paths (the checkpoint id)."""

    def find_class(self, module: str, name: str):
        import importlib

        ok = False
        if module in _DCP_MODULES:
            obj = getattr(importlib.import_module(module), name, None)
            ok = isinstance(obj, type) and (dataclasses.is_dataclass(obj) or issubclass(obj, enum.Enum))
        elif module == "torch":
            ok = name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)
        elif module == "torch.serialization":
            ok = name == "_get_layout"
        elif module in ("pathlib", "pathlib._local"):
            ok = name in ("Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath")
        if not ok:
            raise pickle.UnpicklingError(f"Unsupported global: GLOBAL {module}.{name}")
        return super().find_class(module, name)


def _dcp_reader(path: Path):
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any):
            meta_path = self._get_metadata_path(kwargs.get("rank"))
            with self.fs.create_stream(meta_path, "rb") as f:
                try:
                    metadata = _MetadataUnpickler(f).load()
                except pickle.UnpicklingError as exc:
                    raise UnsafeCheckpointError(
                        f"refused to load {meta_path}: {exc}; a torch.distributed.checkpoint .metadata file holds "
                        "only checkpoint-metadata classes, so this one could run code; nothing in it was executed"
                    ) from None
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(str(path))


def _dcp_planner():
    from torch.distributed.checkpoint import DefaultLoadPlanner

    class SafePlanner(DefaultLoadPlanner):
        """Non-tensor entries (optimizer hyper-parameters) with ``weights_only=True`` instead of a plain unpickle."""

        def load_bytes(self, read_item, value: io.BytesIO) -> None:
            try:
                obj = torch.load(value, weights_only=True)
            except pickle.UnpicklingError as exc:
                raise UnsafeCheckpointError(f"refused to load the entry {read_item.dest_index.fqn}: {exc}") from None
            if self.flatten_state_dict:
                from torch.distributed.checkpoint._traverse import set_element  # what DefaultLoadPlanner uses

                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
            else:
                self.state_dict[read_item.dest_index.fqn] = obj

    return SafePlanner()


def dcp_load(state: dict[str, Any], path: Path, no_dist: bool = False) -> None:
    """``torch.distributed.checkpoint.load`` through the safe reader and planner; ``no_dist``: in one process."""
    import warnings

    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        if no_dist:  # intended: reading a sharded checkpoint in one process (the exporter)
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, storage_reader=_dcp_reader(path), planner=_dcp_planner(), no_dist=no_dist)


def read_dcp_metadata(path: Path):
    return _dcp_reader(path).read_metadata()


# ---------------------------------------------------------------------------------------------------------
# Finding and checking checkpoints
# ---------------------------------------------------------------------------------------------------------
def _step_of(p: Path) -> int | None:
    try:
        return int(p.name.split("_", 1)[1])
    except (IndexError, ValueError):
        return None


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint directories of a run (named ``step_N`` with a ``meta.json``), oldest first; not yet validated."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and _step_of(p) is not None
             and (p / META).is_file()]
    return sorted(found, key=_step_of)


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def read_meta(path: Path, flag: str | None = "--resume") -> dict[str, Any]:
    """A checkpoint's ``meta.json``; errors start with ``flag`` when given."""
    meta_file = Path(path) / META
    pre = f"{flag}: " if flag else ""
    if not meta_file.is_file():
        raise CheckpointError(f"{pre}{path} is not a checkpoint directory (no {META})")
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{pre}{meta_file} is corrupt (not valid JSON: {exc})") from None
    except OSError as exc:
        raise CheckpointError(f"{pre}{explain_os_error(exc, 'reading the checkpoint', meta_file)}") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{pre}{meta_file} is corrupt (not a JSON object)")
    return meta


def _nonfinite(tensors: dict[str, torch.Tensor]) -> str | None:
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return name
    return None


@dataclasses.dataclass
class Checked:
    """A checkpoint that passed :func:`check_checkpoint`: its meta and, for the one-process format, its state."""

    path: Path
    meta: dict[str, Any]
    state: dict[str, Any] | None = None


def check_checkpoint(path: Path, load: bool = True) -> Checked:
    """Validate one checkpoint (see the module docstring); raises :class:`CheckpointError` saying what is wrong.
    ``load``: also read ``state.pt`` (one-process format) and check its weights are finite."""
    path = Path(path)
    meta = read_meta(path, None)
    for key in ("step", "phase", "world", "format"):
        if key not in meta:
            raise CheckpointError(f"{path / META} lacks {key!r} (written by an incomplete or foreign save)")
    if meta.get("finite") is False:
        raise CheckpointError(f"{path}: its weights were not finite when it was saved")
    files = meta.get("files") or {STATE if meta["format"] == "torch" else ".metadata": None}
    for name, size in files.items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{f} is missing")
        actual = f.stat().st_size
        if size is not None and actual != size:
            raise CheckpointError(f"{f} is {actual} bytes but was {size} when saved (truncated or overwritten)")
    checked = Checked(path, meta)
    if meta["format"] == "dcp":
        try:
            read_dcp_metadata(path)
        except UnsafeCheckpointError:
            raise
        except Exception as exc:
            raise CheckpointError(f"{path / '.metadata'} is unreadable: {exc}") from None
    elif load:
        try:
            # read into memory, not mmap: the optimizer keeps some loaded tensors as its state, and a mapping would
            # pin the file (its disk space is not freed when a later save prunes the checkpoint)
            state = safe_torch_load(path / STATE)
        except CheckpointError:
            raise
        except Exception as exc:
            raise CheckpointError(f"{path / STATE} is unreadable: {str(exc).splitlines()[0] if str(exc) else exc}") \
                from None
        if not isinstance(state, dict) or not {"model", "optimizer", "rng"} <= set(state):
            raise CheckpointError(f"{path / STATE} does not hold a training state (model, optimizer, rng)")
        bad = _nonfinite(state["model"])
        if bad is not None:
            raise CheckpointError(f"{path / STATE}: the weight {bad} holds NaN or inf")
        checked.state = state
    return checked


def select_checkpoint(run_dir: Path, log: Callable[[str], None] = print) -> Checked | None:
    """The newest valid checkpoint of ``run_dir`` (None if it has none at all); each newer, invalid one is reported
    through ``log`` and skipped.  Raises :class:`CheckpointError` when checkpoints exist but none is usable."""
    found = list_checkpoints(run_dir)
    skipped = []
    for path in reversed(found):
        try:
            checked = check_checkpoint(path)
        except CheckpointError as exc:
            skipped.append(f"{path.name}: {exc}")
            log(f"skipping checkpoint {path}: {exc}")
            continue
        if skipped:
            log(f"resuming from {path.name}, the newest valid checkpoint ({len(skipped)} newer one(s) skipped)")
        return checked
    if skipped:
        raise CheckpointError(
            f"{run_dir} holds checkpoints but none is usable:\n  " + "\n  ".join(skipped)
            + f"\nto start over, use a new --name (or move {Path(run_dir) / 'checkpoints'} away); to try one "
              "anyway, --resume PATH"
        )
    return None


# ---------------------------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------------------------
def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _tensor_bytes(obj: Any, seen: set | None = None) -> int:
    """Bytes of the tensors in ``obj``, each storage once (a tied weight appears under two names)."""
    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        t = _local(obj)
        key = (t.untyped_storage().data_ptr(), t.device) if t.device.type != "meta" else id(t)
        if key in seen:
            return 0
        seen.add(key)
        return t.untyped_storage().nbytes()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v, seen) for v in obj)
    return 0


def weights_finite(model: torch.nn.Module, info: DistInfo) -> bool:
    """Whether every parameter is finite (this rank's shards, then agreed across ranks); one host sync."""
    flags = [torch.isfinite(_local(p.detach())).all() for p in model.parameters()]
    ok = bool(torch.stack(flags).all()) if flags else True
    return _agree(info, ok)


def _recover_swapped(root: Path) -> None:
    """A save of an existing step swaps ``step_N`` -> ``.old-step_N`` then ``.tmp-step_N`` -> ``step_N``; a kill
    between the two leaves only ``.old-step_N``: put it back."""
    for old in root.glob(".old-step_*"):
        final = root / old.name[len(".old-"):]
        if not final.exists() and (old / META).is_file():
            os.replace(old, final)


def _make_room(root: Path, needed: int, keep_last: int, log: Callable[[str], None]) -> None:
    """When the disk is short of ``needed`` bytes, remove now the checkpoints that ``keep_last`` removes after this
    save anyway -- never the newest complete one."""
    free = free_bytes(root)
    if free is None or free >= needed:
        return
    existing = list_checkpoints(root.parent)
    for p in existing[:max(0, len(existing) - max(keep_last - 1, 1))]:  # oldest first, until there is room
        shutil.rmtree(p, ignore_errors=True)
        log(f"low on disk space ({human_bytes(free)} free, the checkpoint needs about {human_bytes(needed)}): "
            f"removed {p.name} before saving (--keep-last {keep_last} removes it after this save anyway)")
        free = free_bytes(root)
        if free is None or free >= needed:
            return


def _advice(code: int | None, root: Path, needed: int | None, keep_last: int) -> str:
    """What to do after a failed save, by the kind of error."""
    if code in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
        existing = list_checkpoints(root.parent)
        sizes = ", ".join(f"{p.name} {human_bytes(sum(_file_sizes(p).values()))}" for p in existing) or "none"
        return (f"Free {human_bytes(needed) if needed else 'space'} on that disk (this run's checkpoints: {sizes}; "
                f"when space is short the trainer removes, before saving, those that --keep-last {keep_last} would "
                f"remove after it -- never the newest), or move --out-dir to a larger disk; then rerun the same "
                f"command to resume")
    if code == errno.EFBIG:
        return "Raise the file-size limit (ulimit -f) and rerun the same command to resume"
    return "Fix that and rerun the same command to resume"


def save_checkpoint(run_dir: Path, step: int, model: torch.nn.Module, optimizer, meta: dict[str, Any],
                    info: DistInfo, keep_last: int = 2, log: Callable[[str], None] = print) -> Path:
    """Write checkpoint ``step`` atomically (every rank calls this); returns its final path.  Raises
    :class:`StorageError` (on every rank) when the write fails; nothing partial is left behind."""
    root = Path(run_dir) / "checkpoints"
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp-step_{step:08d}"
    if info.world == 1:
        # the plain module's keys, so a run can resume with or without --compile
        state = {"model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(), "rng": rng_state()}
    else:
        state = train_state(model, optimizer, info)
    # the tensors' bytes plus the pickle/zip framing (measured: 2 % of a 1.4 MB state, less for larger ones)
    needed = int(info.all_reduce_sum([float(_tensor_bytes(state))], _comm_device())[0] * 1.02) + (64 << 10)
    finite = weights_finite(model, info)

    error: str | None = None
    code: int | None = None
    if info.is_main:
        try:
            root.mkdir(parents=True, exist_ok=True)
            _recover_swapped(root)
            for stale in [*root.glob(".tmp-*"), *root.glob(".old-*")]:
                shutil.rmtree(stale, ignore_errors=True)
            _make_room(root, needed, keep_last, log)
            tmp.mkdir()
        except OSError as exc:
            error = explain_os_error(exc, f"preparing checkpoint {final.name}", root, needed)
    if not _agree(info, error is None):
        raise StorageError(error or f"rank 0 could not prepare checkpoint {final}")

    try:
        if info.world == 1:
            _torch_save(state, tmp / STATE)
        else:
            dcp_save(state, tmp)
            _torch_save(rng_state(), tmp / f"rng_{info.rank}.pt")
        fault_point("save", info.rank)
    except Exception as exc:  # noqa: BLE001 - reported below, on every rank
        os_error = _os_error_in(exc)
        if os_error is None:
            raise
        code = os_error.errno
        error = explain_os_error(os_error, f"writing checkpoint {final.name}", tmp, needed)
    ok = _agree(info, error is None)
    if ok and info.is_main:
        try:
            meta = {**meta, "step": step, "world": info.world, "format": "torch" if info.world == 1 else "dcp",
                    "finite": finite, "files": _file_sizes(tmp)}
            with open(tmp / META, "w", encoding="utf-8") as f:
                f.write(json.dumps(meta, indent=2, default=str) + "\n")
            _fsync_tree(tmp)
            old = root / f".old-{final.name}"
            if final.exists():  # the same step saved again (e.g. stopped right after a resume): swap, then delete
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
            os.replace(tmp, final)
            _fsync_path(root)
            shutil.rmtree(old, ignore_errors=True)
        except OSError as exc:
            code = exc.errno
            error = explain_os_error(exc, f"writing checkpoint {final.name}", tmp, needed)
    if not _agree(info, error is None):
        if info.is_main:
            shutil.rmtree(tmp, ignore_errors=True)  # nothing partial for the next run to find
            latest = latest_checkpoint(run_dir)
            error = (f"{error}. Nothing of checkpoint {final.name} was kept; the last complete checkpoint is "
                     f"{latest or 'none'}. " + _advice(code, root, needed, keep_last))
        raise StorageError(error or f"another rank failed to write checkpoint {final}")
    fault_point("commit", info.rank)
    if info.is_main:
        for expired in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(expired, ignore_errors=True)
    info.barrier()
    return final


# ---------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------
def load_checkpoint(checked: Checked, model: torch.nn.Module, optimizer, info: DistInfo, flag: str = "--resume",
                    restore_rng: bool = True) -> dict[str, Any]:
    """Restore model, optimizer (and RNG) from a checked checkpoint in place (every rank calls this), whatever the
    world size that wrote it:

    * ``torch`` (one process) at one process: ``load_state_dict`` as written;
    * ``dcp`` (several processes) at any world size: each rank reads the parts of the saved shards that overlap its
      own shards of the model and optimizer state (DCP's resharding; one process reads every shard);
    * ``torch`` at several processes: every rank reads ``state.pt``, renames the optimizer's entries from parameter
      numbers to parameter names (the optimizer of the same phase lists its parameters in the same order) and keeps
      its own shard of each tensor.

    The RNG state is the rank's own when the world size is unchanged, else rank 0's (the trainer draws no random
    numbers after the initialisation; this keeps a resume deterministic)."""
    path, meta = checked.path, checked.meta
    same_world = meta.get("world") == info.world
    try:
        if meta["format"] == "torch" and not info.active:
            state = checked.state if checked.state is not None else safe_torch_load(path / STATE)
            unwrap(model).load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            rng = state["rng"]
        else:
            from torch.distributed.checkpoint.state_dict import set_state_dict

            state = train_state(model, optimizer, info)
            if meta["format"] == "torch":
                saved = checked.state if checked.state is not None else safe_torch_load(path / STATE)
                _fill_from_full(state, _named_full_state(saved, state))
                rng = saved["rng"]
            else:
                dcp_load(state, path, no_dist=not info.active)
                rng_file = path / f"rng_{info.rank if same_world else 0}.pt"
                rng = safe_torch_load(rng_file) if rng_file.is_file() else None
            set_state_dict(model if info.active else unwrap(model), optimizer.optimizers,
                           model_state_dict=state["model"], optim_state_dict=state["optimizer"])
        if restore_rng and rng is not None:
            set_rng_state(rng)
    except CheckpointError as exc:
        raise CheckpointError(f"{flag}: {exc}") from None
    except (RuntimeError, KeyError, ValueError, OSError) as exc:
        raise CheckpointError(f"{flag}: cannot load {path}: {str(exc).splitlines()[0] if str(exc) else exc!r}") \
            from None
    if not weights_finite(model, info):
        raise CheckpointError(f"{flag}: {path} loaded, but its weights hold NaN or inf; resume from an older "
                              "checkpoint with --resume PATH")
    return meta


def _named_full_state(saved: dict[str, Any], template: dict[str, Any]) -> dict[str, Any]:
    """A one-process ``state.pt`` in the layout of :func:`train_state`: the optimizer's per-parameter state and
    groups keyed by parameter name instead of number.  ``torch.optim`` numbers the parameters in the order of its
    groups; ``template`` (this run's optimizer in the same phase) lists the names in that same order."""
    optim = saved["optimizer"]["optimizer"]
    names = [n for g in template["optimizer"]["param_groups"] for n in g["params"]]
    numbers = [i for g in optim["param_groups"] for i in g["params"]]
    if len(names) != len(numbers):
        raise CheckpointError(f"its optimizer holds {len(numbers)} parameters, this run's {len(names)}")
    by_number = dict(zip(numbers, names))
    groups = [{**g, "params": [by_number[i] for i in g["params"]]} for g in optim["param_groups"]]
    return {"model": saved["model"],
            "optimizer": {"state": {by_number[i]: s for i, s in optim["state"].items()}, "param_groups": groups}}


def _fill_from_full(template: dict[str, Any], full: dict[str, Any], where: str = "") -> None:
    """Copy the full tensors of ``full`` into the (possibly DTensor-sharded) tensors of ``template`` in place: each
    rank keeps its own shard (``distribute_tensor`` with the template's mesh and placements)."""
    for key, dest in template.items():
        name = f"{where}{key}"
        if key not in full:
            if key == "param_groups":  # hyper-parameters: this run's config governs them
                continue
            raise KeyError(f"the checkpoint lacks {name}")
        src = full[key]
        if isinstance(dest, dict):
            _fill_from_full(dest, src, f"{name}.")
        elif isinstance(dest, torch.Tensor):
            if hasattr(dest, "device_mesh"):
                from torch.distributed.tensor import distribute_tensor

                src = distribute_tensor(src.to(dest.device, dest.dtype), dest.device_mesh, dest.placements)
            if tuple(src.shape) != tuple(dest.shape):
                raise ValueError(f"{name} has shape {tuple(src.shape)} in the checkpoint, {tuple(dest.shape)} here")
            _local(dest).copy_(_local(src))


def train_state(model: torch.nn.Module, optimizer, info: DistInfo) -> dict[str, Any]:
    """``{"model": ..., "optimizer": ...}`` keyed by parameter names (``get_state_dict``): the same keys at every
    world size, plain tensors in one process and DTensor shards under FSDP2, so DCP reshards between them.  In one
    process the plain module's names, so a run resumes with or without ``--compile``."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model if info.active else unwrap(model), optimizer.optimizers)
    return {"model": model_sd, "optimizer": optim_sd}


def dcp_save(state: dict[str, Any], path: Path, no_dist: bool = False) -> None:
    """``torch.distributed.checkpoint.save`` into the directory ``path``; ``no_dist``: in one process."""
    import warnings

    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        if no_dist:  # intended: one process writes the same format as several
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(state, checkpoint_id=str(path), no_dist=no_dist)


def load_model_weights(path: Path) -> dict[str, torch.Tensor]:
    """The full model state dict of a training checkpoint of either format, in one process, on the CPU."""
    checked = check_checkpoint(path, load=False)
    if checked.meta["format"] == "torch":
        return safe_torch_load(Path(path) / STATE)["model"]
    from xmodel.config import XmodelConfig
    from xmodel.model import Xmodel

    config = XmodelConfig.from_dict(checked.meta["identity"]["model"])
    with torch.device("meta"):
        plain = Xmodel(config)
    plain.to_empty(device="cpu")
    model_sd = {k: v for k, v in plain.state_dict().items() if k != "lm_head.weight" or not config.tie_word_embeddings}
    state = {"model": model_sd}
    dcp_load(state, Path(path), no_dist=True)
    return state["model"]


# ---------------------------------------------------------------------------------------------------------
# HF export
# ---------------------------------------------------------------------------------------------------------
def full_model_state(model: torch.nn.Module, info: DistInfo) -> dict[str, torch.Tensor] | None:
    """The unsharded model state dict on CPU (rank 0 gets it; other ranks None)."""
    if info.world == 1:
        return {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return state if info.is_main else None


def write_hf(state: dict[str, torch.Tensor], model_config, out: Path, tokenizer_dir: Path | None,
             rank: int = 0) -> Path:
    """Write ``state`` as an HF checkpoint directory at ``out``, atomically (a temporary directory renamed)."""
    from xmodel.model import Xmodel

    out = Path(out)
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
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        plain.save_pretrained(tmp, tokenizer_dir=tokenizer_dir)
        fault_point("export", rank)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        needed = sum(v.numel() * v.element_size() for v in plain.state_dict().values())
        raise StorageError(explain_os_error(exc, f"exporting the HF model to {out}", tmp, needed)) from None
    return out


def export_hf(model: torch.nn.Module, model_config, out: Path, tokenizer_dir: Path | None, info: DistInfo) -> Path | None:
    """Save the final weights as an HF checkpoint directory (``Xmodel.save_pretrained``), from rank 0."""
    state = full_model_state(model, info)
    error = None
    if info.is_main:
        try:
            write_hf(state, model_config, out, tokenizer_dir, info.rank)
        except StorageError as exc:
            error = str(exc)
    if not _agree(info, error is None):
        raise StorageError(error or "rank 0 failed to write the HF export")
    return out if info.is_main else None
