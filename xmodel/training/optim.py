"""μP parameter groups, AdamW, and the AdamW -> Muon switch at the start of the decay.

Groups (each carries ``name`` and its peak lr ``base_lr``; the scheduler sets ``lr = base_lr * factor``):

* ``embed``  -- the tied embedding / LM head: ``lr_embed`` (paper 0.01), weight decay on
* ``matrix`` -- every other parameter with 2+ dims (q/k/v/o, gate/up/down): ``lr`` (paper 0.01 / width_mult)
* ``norm``   -- 1-D parameters (RMSNorm weights, biases if any): ``lr``, no weight decay

AdamW: β = (0.9, 0.95), eps 1e-8, decoupled weight decay 0.1 (PyTorch's ``p *= 1 - lr * wd``).

At the decay start the ``matrix`` group moves to :class:`xkernels.optim.Muon` (momentum 0.95, Nesterov, 5
Newton–Schulz steps, ``match_rms_adamw`` lr scaling, same lr schedule and weight decay); ``embed`` and ``norm`` stay
on the same AdamW, keeping their moments.  Muon's momentum starts from zero.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

EMBED_NAMES = ("model.embed_tokens.weight", "lm_head.weight")


def _clean(name: str) -> str:
    """Strip wrapper prefixes (torch.compile ``_orig_mod.``, DDP ``module.``, checkpoint wrappers)."""
    for prefix in ("_orig_mod.", "module.", "_checkpoint_wrapped_module.", "_fsdp_wrapped_module."):
        name = name.replace(prefix, "")
    return name


def split_parameters(model: nn.Module) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """``{"embed": [...], "matrix": [...], "norm": [...]}`` of ``(name, param)``; a tied weight appears once."""
    groups: dict[str, list[tuple[str, nn.Parameter]]] = {"embed": [], "matrix": [], "norm": []}
    for name, p in model.named_parameters():  # named_parameters de-duplicates tied weights
        if not p.requires_grad:
            continue
        clean = _clean(name)
        if clean in EMBED_NAMES:
            groups["embed"].append((clean, p))
        elif p.dim() >= 2:
            groups["matrix"].append((clean, p))
        else:
            groups["norm"].append((clean, p))
    return groups


def build_adamw(model: nn.Module, lr: float, lr_embed: float, betas=(0.9, 0.95), eps: float = 1e-8,
                weight_decay: float = 0.1) -> torch.optim.AdamW:
    """AdamW over the three μP groups (empty groups left out)."""
    settings = {"embed": (lr_embed, weight_decay), "matrix": (lr, weight_decay), "norm": (lr, 0.0)}
    groups = []
    for name, params in split_parameters(model).items():
        if params:
            group_lr, wd = settings[name]
            groups.append({"params": [p for _, p in params], "names": [n for n, _ in params], "name": name,
                           "lr": group_lr, "base_lr": group_lr, "weight_decay": wd})
    kwargs: dict[str, Any] = {}
    if any(p.is_cuda for g in groups for p in g["params"]):
        kwargs["fused"] = True
    return torch.optim.AdamW(groups, betas=betas, eps=eps, **kwargs)


class TrainOptimizer:
    """The run's optimizers: AdamW alone (``phase == "adamw"``), or AdamW (embed, norms) + Muon (hidden matrices).

    ``step``, ``zero_grad``, ``param_groups``, ``state_dict`` cover whichever are active; :meth:`switch_to_muon`
    is the phase change.
    """

    def __init__(self, adamw: torch.optim.AdamW):
        self.adamw = adamw
        self.muon: torch.optim.Optimizer | None = None

    @property
    def phase(self) -> str:
        return "muon" if self.muon is not None else "adamw"

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.adamw] + ([self.muon] if self.muon is not None else [])

    @property
    def param_groups(self) -> list[dict]:
        return [g for opt in self.optimizers for g in opt.param_groups]

    def set_lr(self, factor: float) -> None:
        for g in self.param_groups:
            g["lr"] = g["base_lr"] * factor

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()

    def zero_grad(self) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)

    def switch_to_muon(self, momentum: float = 0.95, nesterov: bool = True, ns_steps: int = 5,
                       adjust_lr: str = "match_rms_adamw") -> list[str]:
        """Move the ``matrix`` group from AdamW to Muon (same peak lr and weight decay); returns the moved names."""
        if self.muon is not None:
            raise RuntimeError("already switched to Muon")
        from xkernels.optim import Muon  # the optimizer helper's implementation (single device, DDP, FSDP2)

        group = next((g for g in self.adamw.param_groups if g["name"] == "matrix"), None)
        if group is None:
            raise RuntimeError("no 'matrix' parameter group to move to Muon")
        for p in group["params"]:
            self.adamw.state.pop(p, None)  # AdamW moments of the moved matrices are dropped
        self.adamw.param_groups = [g for g in self.adamw.param_groups if g is not group]
        self.muon = Muon(
            [{"params": group["params"], "names": group["names"], "name": "matrix", "base_lr": group["base_lr"]}],
            lr=group["lr"], weight_decay=group["weight_decay"], momentum=momentum, nesterov=nesterov,
            ns_steps=ns_steps, adjust_lr_fn=adjust_lr,
        )
        return list(group["names"])

    def state_dict(self) -> dict[str, Any]:
        return {"phase": self.phase, "adamw": self.adamw.state_dict(),
                "muon": self.muon.state_dict() if self.muon is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["phase"] != self.phase:
            raise ValueError(f"optimizer state is for phase {state['phase']!r}, optimizer is in {self.phase!r}")
        self.adamw.load_state_dict(state["adamw"])
        if self.muon is not None:
            self.muon.load_state_dict(state["muon"])
