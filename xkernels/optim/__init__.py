"""Optimizers: :class:`Muon` (batched Newton–Schulz, single device / DDP / FSDP2) and its AdamW hybrid.

Contract used by the trainer::

    from xkernels.optim import Muon, MuonWithAuxAdamW, muon_param_groups, switch_adamw_to_muon
"""

from xkernels.optim.muon import (
    Muon,
    MuonWithAuxAdamW,
    adjust_lr,
    is_hidden_matrix,
    muon_param_groups,
    switch_adamw_to_muon,
)

__all__ = ["Muon", "MuonWithAuxAdamW", "adjust_lr", "is_hidden_matrix", "muon_param_groups", "switch_adamw_to_muon"]
