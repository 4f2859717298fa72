"""μP parameter groups, AdamW, and the AdamW -> Muon switch at the start of the decay.

Groups (each carries ``name`` and its peak lr ``base_lr``; the scheduler sets ``lr = base_lr * factor``):

* ``embed``  -- the tied embedding / LM head: ``lr_embed`` (paper 0.01), weight decay on
* ``matrix`` -- every other parameter with 2+ dims (q/k/v/o, gate/up/down): ``lr`` (paper 0.01 / width_mult)
* ``norm``   -- 1-D parameters (RMSNorm weights, biases if any): ``lr``, no weight decay

AdamW: β = (0.9, 0.95), eps 1e-8, decoupled weight decay 0.1 (PyTorch's ``p *= 1 - lr * wd``).

At the decay start the hidden matrices (the ``matrix`` group) move to Muon with
:func:`xkernels.optim.switch_adamw_to_muon` (momentum 0.95, Nesterov, 5 Newton–Schulz steps, ``match_rms_adamw`` lr
scaling, same lr schedule and weight decay; momentum starts from zero); ``embed`` and ``norm`` stay on AdamW and
keep their moments, so they continue exactly.
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
            groups.append({"params": [p for _, p in params], "name": name, "role": name,
                           "lr": group_lr, "base_lr": group_lr, "weight_decay": wd})
    kwargs: dict[str, Any] = {}
    if any(p.is_cuda for g in groups for p in g["params"]):
        kwargs["fused"] = True
    return torch.optim.AdamW(groups, betas=betas, eps=eps, **kwargs)


class TrainOptimizer:
    """The run's optimizer and its phase: ``torch.optim.AdamW`` (``phase == "adamw"``) until
    :meth:`switch_to_muon` replaces it by an :class:`xkernels.optim.MuonWithAuxAdamW` (``phase == "muon"``) whose
    Muon group holds the hidden matrices and whose AdamW groups continue the embedding and norms exactly.

    Every param group keeps ``role`` (``embed`` / ``matrix`` / ``norm``) and its peak lr ``base_lr``.
    """

    def __init__(self, adamw: torch.optim.Optimizer, model: nn.Module):
        self.opt = adamw
        self.model = model
        for g in self.opt.param_groups:
            g.setdefault("role", g["name"])

    @property
    def phase(self) -> str:
        return "muon" if any(g.get("use_muon", False) for g in self.opt.param_groups) else "adamw"

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.opt]

    @property
    def param_groups(self) -> list[dict]:
        return self.opt.param_groups

    def lr_of(self, role: str) -> float:
        """Current lr of the first group with this role (0 when there is none)."""
        return next((g["lr"] for g in self.opt.param_groups if g["role"] == role), 0.0)

    def set_lr(self, factor: float) -> None:
        for g in self.opt.param_groups:
            g["lr"] = g["base_lr"] * factor

    def step(self) -> None:
        self.opt.step()

    def zero_grad(self) -> None:
        self.opt.zero_grad(set_to_none=True)

    def switch_to_muon(self, momentum: float = 0.95, nesterov: bool = True, ns_steps: int = 5,
                       adjust_lr: str = "match_rms_adamw", compute_dtype: torch.dtype | None = None) -> int:
        """Hidden matrices AdamW -> Muon (same lr schedule and weight decay, momentum from zero); returns how many
        parameters moved."""
        if self.phase == "muon":
            raise RuntimeError("already switched to Muon")
        from xkernels.optim import switch_adamw_to_muon  # the optimizer helper's implementation (1 process/DDP/FSDP2)

        base_lr = {g["role"]: g["base_lr"] for g in self.opt.param_groups}
        new = switch_adamw_to_muon(self.opt, self.model, momentum_init="zero", momentum=momentum, nesterov=nesterov,
                                   ns_steps=ns_steps, adjust_lr_fn=adjust_lr, compute_dtype=compute_dtype)
        for g in new.param_groups:
            g["role"] = g["name"].split(".")[0]
            g["base_lr"] = base_lr[g["role"]]
        self.opt = new
        return sum(len(g["params"]) for g in new.param_groups if g["use_muon"])

    def state_dict(self) -> dict[str, Any]:
        return {"phase": self.phase, "optimizer": self.opt.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["phase"] != self.phase:
            raise ValueError(f"optimizer state is for phase {state['phase']!r}, optimizer is in {self.phase!r}")
        self.opt.load_state_dict(state["optimizer"])
