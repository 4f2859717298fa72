"""Export a training checkpoint as an HF model directory: ``python -m xmodel.export CHECKPOINT [--out DIR]``.

``CHECKPOINT`` is a checkpoint directory (``<run>/checkpoints/step_00000200``) of either format -- one process
(``state.pt``) or sharded (``torch.distributed.checkpoint``, read here in one process) -- or a run directory, whose
newest valid checkpoint is taken.  The checkpoint is validated and loaded without running code from it (see
:mod:`xmodel.training.checkpoint`).  The model shape comes from the checkpoint's ``meta.json``; the tokenizer the run
used is copied when it is still where the run found it.

``--out`` defaults to ``<run>/hf`` for the run's final checkpoint (what the trainer writes at the end of a run) and
to ``<run>/hf-step_N`` for any other.  The directory is written atomically (a temporary directory renamed).
Exit status: 0 written, 1 the write failed (disk full, ...), 2 bad input (no such or unusable checkpoint).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

from xmodel.training import checkpoint as ckpt

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def default_out(path: Path, meta: dict) -> Path:
    run_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    final = meta.get("step") == (meta.get("config") or {}).get("steps")
    return run_dir / ("hf" if final else f"hf-{path.name}")


def tokenizer_dir_of(meta: dict) -> Path | None:
    """Where the run's tokenizer was (None if unknown or gone, e.g. pre-tokenised data without one)."""
    candidates = [meta.get("tokenizer_dir")]
    configured = (meta.get("config") or {}).get("tokenizer")
    if configured:
        p = Path(configured)
        candidates.append(str(p if p.is_dir() else p.parent))
    for c in candidates:
        if c and (Path(c) / "tokenizer.json").is_file():
            return Path(c)
    return None


def framed_tokenizer(meta: dict, tokenizer_dir: Path | None, tmp: Path) -> Path | None:
    """The tokenizer files to ship: ``tokenizer_dir``'s, rewritten (in ``tmp``) to frame prompts as the run framed
    its documents (the ``framing`` of the run identity: BOS or not), so that ``tokenizer_config.json`` states what
    training did and ``tokenizer.json`` encodes prompts that way."""
    framing = (meta.get("identity") or {}).get("framing")
    if tokenizer_dir is None or not framing:
        return tokenizer_dir
    from xmodel.training.tokenizer import Framing, TextTokenizer, write_export_tokenizer

    try:
        tokenizer = TextTokenizer.load(tokenizer_dir)
    except ValueError:
        return tokenizer_dir
    return write_export_tokenizer(tokenizer, Framing(framing[0], framing[1]), tmp / "tokenizer")


def export_checkpoint(source: Path, out: Path | None = None, dtype: torch.dtype | None = None,
                      log=print) -> Path:
    """Write the HF export of ``source`` (a checkpoint or run directory); returns the output directory.
    Raises :class:`~xmodel.training.checkpoint.CheckpointError` for an unusable checkpoint and
    :class:`~xmodel.training.checkpoint.StorageError` when the write fails."""
    from xmodel.config import XmodelConfig

    source = Path(source)
    if (source / "checkpoints").is_dir():
        checked = ckpt.select_checkpoint(source, log)
        if checked is None:
            raise ckpt.CheckpointError(f"{source} holds no complete checkpoint")
        path = checked.path
    elif source.is_dir():
        path = source
    else:
        raise ckpt.CheckpointError(f"{source}: no such checkpoint or run directory")
    meta = ckpt.check_checkpoint(path, load=False).meta
    try:
        config = XmodelConfig.from_dict(meta["identity"]["model"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ckpt.CheckpointError(f"{path / ckpt.META} does not describe the model ({exc})") from None
    state = ckpt.load_model_weights(path)
    bad = ckpt._nonfinite(state)
    if bad is not None:
        raise ckpt.CheckpointError(f"{path}: the weight {bad} holds NaN or inf; export an older checkpoint")
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    out = Path(out) if out is not None else default_out(path, meta)
    tokenizer_dir = tokenizer_dir_of(meta)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt.write_hf(state, config, out, framed_tokenizer(meta, tokenizer_dir, Path(tmp)))
    log(f"exported {path} (step {meta['step']}) -> {out}" + ("" if tokenizer_dir else " (no tokenizer found to copy)"))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m xmodel.export", description=__doc__.split("\n\n")[0],
        epilog="exit status: 0 written, 1 the write failed (disk full, ...), 2 bad input (no such or unusable "
               "checkpoint)")
    parser.add_argument("checkpoint", help="a checkpoint directory (<run>/checkpoints/step_N) or a run directory")
    parser.add_argument("--out", default=None, help="output directory (default <run>/hf for the final checkpoint, "
                                                    "else <run>/hf-step_N)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="store the weights in this dtype (default: as trained, float32)")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    try:
        export_checkpoint(Path(args.checkpoint), args.out and Path(args.out), DTYPES.get(args.dtype))
    except ckpt.CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ckpt.StorageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
