"""Warmup–Stable–Decay learning-rate schedule (the Xmodel-2.5 / MiniCPM shape).

``lr_factor(s)`` is the multiplier of the peak lr for optimizer step ``s`` (0-based: the update that takes the
model from ``s`` to ``s + 1`` completed steps).  With warmup ``W``, decay start ``S``, decay length ``T`` and floor
``m = min_lr / peak``::

    s <  W              (s + 1) / W                          linear warmup, reaches the peak at s = W - 1
    W <= s < S          1                                    stable
    S <= s < S + T      m + (1 - m) * shape(t / T),  t = s - S + 1     decay; the last decay step is at the floor
    s >= S + T          m                                    (with T = 0: no decay, the peak throughout)

``shape`` maps progress ``x`` in [0, 1] from 1 to 0:

* ``"exp"``    -- Megatron's WSD exponential: ``2 * 0.5**x - 1`` (the paper's decay)
* ``"linear"`` -- ``1 - x``
* ``"cosine"`` -- ``(1 + cos(pi x)) / 2``
* ``"sqrt"``   -- ``1 - sqrt(x)``
"""

from __future__ import annotations

import math
from dataclasses import dataclass

SHAPES = {
    "exp": lambda x: 2.0 * 0.5**x - 1.0,
    "linear": lambda x: 1.0 - x,
    "cosine": lambda x: 0.5 * (1.0 + math.cos(math.pi * x)),
    "sqrt": lambda x: 1.0 - math.sqrt(x),
}


@dataclass(frozen=True)
class WSDSchedule:
    warmup: int  # W: warmup steps
    decay_start: int  # S: first decay step
    decay: int  # T: decay steps
    min_ratio: float = 1 / 16  # m: floor as a fraction of the peak
    shape: str = "exp"

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"shape must be one of {sorted(SHAPES)}, got {self.shape!r}")
        if min(self.warmup, self.decay_start, self.decay) < 0:
            raise ValueError("warmup, decay_start and decay must be >= 0")
        if self.warmup > self.decay_start:
            raise ValueError(f"warmup ({self.warmup}) must end before the decay starts ({self.decay_start})")
        if not 0 < self.min_ratio <= 1:
            raise ValueError(f"min_ratio must be in (0, 1], got {self.min_ratio}")

    def factor(self, step: int) -> float:
        """Multiplier of the peak lr at optimizer step ``step``."""
        if step < self.warmup:
            return (step + 1) / self.warmup
        if step < self.decay_start:
            return 1.0
        if self.decay == 0:  # no decay: the peak until the end
            return 1.0
        if step >= self.decay_start + self.decay:
            return self.min_ratio
        x = (step - self.decay_start + 1) / self.decay
        return self.min_ratio + (1.0 - self.min_ratio) * SHAPES[self.shape](x)

    def phase(self, step: int) -> str:
        """``"warmup"``, ``"stable"`` or ``"decay"`` (the decay phase includes steps at the floor after it)."""
        if step < self.warmup:
            return "warmup"
        return "stable" if step < self.decay_start else "decay"
