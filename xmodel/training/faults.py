"""Deterministic fault injection for the trainer's crash tests: ``XMODEL_FAULT`` kills the process at a named point.

``XMODEL_FAULT="step:3"`` sends SIGKILL to this process the 3rd time it reaches the point ``step``;
``"save:2@1"`` does it on rank 1 only; several entries are separated by commas.  A SIGKILL cannot be caught, so
what survives is exactly what a ``kill -9`` (or a power cut after the page cache reached the disk) leaves.

Points (where :func:`fault_point` is called):

* ``step``   -- inside an optimizer step: after the backward pass, before ``optimizer.step()``
* ``save``   -- inside a checkpoint save: the state files are written, ``meta.json`` is not, nothing renamed yet
* ``commit`` -- a checkpoint has just been renamed into place, older ones not yet pruned
* ``export`` -- inside the HF export: the files are in the temporary directory, not yet renamed to ``<run>/hf``

Counts start at zero in every process, so a resumed run counts again from its own start.  Without the variable
this costs one dictionary lookup per call.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

POINTS = ("step", "save", "commit", "export")
_counts: Counter = Counter()
_parsed: tuple[str, list[tuple[str, int, int | None]]] | None = None


def _plan(spec: str) -> list[tuple[str, int, int | None]]:
    global _parsed
    if _parsed is None or _parsed[0] != spec:
        plan = []
        for entry in filter(None, (e.strip() for e in spec.split(","))):
            point, _, rest = entry.partition(":")
            hits, _, rank = rest.partition("@")
            if point not in POINTS or not hits.isdigit() or int(hits) < 1 or (rank and not rank.isdigit()):
                raise ValueError(f"XMODEL_FAULT: bad entry {entry!r}; expected POINT:N[@RANK] with POINT one of "
                                 f"{', '.join(POINTS)} and N >= 1")
            plan.append((point, int(hits), int(rank) if rank else None))
        _parsed = (spec, plan)
    return _parsed[1]


def fault_point(name: str, rank: int = 0) -> None:
    """Count a visit to ``name``; SIGKILL this process if ``XMODEL_FAULT`` asks for this visit."""
    spec = os.environ.get("XMODEL_FAULT")
    if not spec:
        return
    plan = _plan(spec)
    _counts[name] += 1
    for point, hits, only_rank in plan:
        if point == name and hits == _counts[name] and only_rank in (None, rank):
            os.kill(os.getpid(), signal.SIGKILL)
