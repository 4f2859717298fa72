"""``--compile``: compile each decoder block, as torchtitan does.

One compiled region per :class:`~xmodel.model.XmodelDecoderLayer` (``nn.Module.compile``, in place, so parameter
names and state-dict keys are unchanged) rather than one graph for the whole model:

* every layer runs the same code on parameters of the same shapes, so dynamo traces the block once and the other
  layers reuse that graph (parameters are graph inputs, not constants) -- compile time does not grow with depth;
* the embedding, the final norm and the (chunked, fused) loss stay eager: they run once per step and the fused
  loss never materialises the logits anyway.

Order (see ``xmodel.train.setup``): activation checkpointing (inside each layer's forward, so the compiled block
contains the checkpointed region), then FP8 conversion (the compiled block traces the swapped-in linears), then
:func:`compile_blocks`, then FSDP2 / DDP wrapping (``fully_shard`` on a compiled layer, as torchtitan).

Expected compilations of a training run: the training graph (forward + backward) and the evaluation graph (no
grad, ``eval()``) -- the optimizer, including the AdamW -> Muon switch, is outside every compiled region, so the
switch compiles nothing.
"""

from __future__ import annotations

import logging
from typing import Any

from torch import nn


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The decoder layers of an :class:`~xmodel.model.Xmodel` (through DDP's ``module`` / a compiled wrapper)."""
    for attr in ("_orig_mod", "module"):
        model = getattr(model, attr, model)
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise TypeError(f"compile_blocks expects an Xmodel (with .model.layers), got {type(model).__name__}")
    return list(layers)


def compile_blocks(model: nn.Module, fullgraph: bool = False, **options: Any) -> nn.Module:
    """Compile every decoder layer of ``model`` in place (``layer.compile(**options)``); returns ``model``.

    ``fullgraph=False`` by default so that an op that still breaks the graph (e.g. an FP8 recipe whose forward is
    not traceable on this branch) costs a break instead of failing the run; pass ``fullgraph=True`` to insist.
    Other ``options`` go to :func:`torch.compile` (``backend``, ``mode``, ``dynamic``, ...).
    """
    for layer in decoder_blocks(model):
        layer.compile(fullgraph=fullgraph, **options)
    return model


def is_compiled(model: nn.Module) -> bool:
    """True when :func:`compile_blocks` has been applied to every layer of ``model``."""
    return all(getattr(layer, "_compiled_call_impl", None) is not None for layer in decoder_blocks(model))


def compile_counters() -> dict[str, int]:
    """Dynamo's process-wide counters, flattened: ``frames`` compiled (each compile of a frame, recompiles
    included), ``unique_graphs`` (FX graphs produced, one per graph-break-separated piece) and ``graph_breaks``
    (total over reasons)."""
    from torch._dynamo.utils import counters

    return {
        "frames": int(counters["frames"].get("ok", 0)),
        "unique_graphs": int(counters["stats"].get("unique_graphs", 0)),
        "graph_breaks": int(sum(counters["graph_break"].values())),
    }


class RecompileLog(logging.Handler):
    """``with RecompileLog() as log: ...`` collects dynamo's recompilation reasons (the ``recompiles`` artifact of
    :mod:`torch._logging`, the text ``TORCH_LOGS=recompiles`` prints) in ``log.reasons``; logging is restored on
    exit."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.reasons: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.reasons.append(record.getMessage())

    def __enter__(self) -> RecompileLog:
        import torch._logging

        torch._logging.set_logs(recompiles=True)
        self._logger = logging.getLogger("torch._dynamo.guards.__recompiles")
        self._logger.addHandler(self)
        self._propagate, self._logger.propagate = self._logger.propagate, False  # collect, don't print
        return self

    def __exit__(self, *exc) -> None:
        import torch._logging

        self._logger.removeHandler(self)
        self._logger.propagate = self._propagate
        torch._logging.set_logs()


__all__ = ["RecompileLog", "compile_blocks", "compile_counters", "decoder_blocks", "is_compiled"]
