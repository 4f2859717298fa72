"""Golden loss curve: a 12-step tiny run (through the Muon switch) on synthetic pre-tokenised data must reproduce the
stored losses, so a change in the model's or optimizer's numerics is noticed.

The data is a seeded Markov chain over 512 ids written as a ``.bin`` shard (no tokenizer, no Python-version-dependent
text); init, sampling and the schedule are seeded.  Tolerance: 2e-3 relative -- far above float-summation-order
differences between torch versions/CPUs (~1e-6), far below what a numerics bug does (a wrong scale moves the losses
by whole percent).  Regenerate with ``python tests/test_train_golden.py`` after an intended numerics change.
"""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from train_support import TINY_MODEL, _fast_cpu  # noqa: F401  (autouse fixture: reference ops, one thread)

from xmodel.train import main
from xmodel.training.data import write_shard

GOLDEN = [16.00334, 9.65555, 8.73106, 7.3763, 7.12435, 7.53761, 7.46224, 6.15318, 6.39407, 6.13619, 6.20417, 5.93423]


def markov_tokens(n: int = 40000, vocab: int = 512, seed: int = 0) -> np.ndarray:
    """Each id has 4 successors with probabilities .55/.25/.15/.05: learnable, not trivial."""
    rng = np.random.default_rng(seed)
    succ = rng.integers(3, vocab, size=(vocab, 4))
    choice = rng.choice(4, size=n, p=[0.55, 0.25, 0.15, 0.05])
    out = np.empty(n, dtype=np.int64)
    out[0] = 3
    for i in range(1, n):
        out[i] = succ[out[i - 1], choice[i]]
    return out


def golden_run(tmp: Path) -> list[float]:
    shard = write_shard(tmp / "markov.bin", markov_tokens())
    args = [*TINY_MODEL, "--seq-len", "32", "--batch-size", "4", "--data", str(shard), "--steps", "12",
            "--decay", "4", "--eval-every", "0", "--no-progress", "--no-export-hf", "--out-dir", str(tmp),
            "--name", "golden", "--cache-dir", str(tmp / "cache")]
    assert main(args) == 0
    records = [json.loads(line) for line in (tmp / "golden" / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["kind"] == "train"]


def test_golden_loss_curve(tmp_path):
    losses = golden_run(tmp_path)
    assert len(losses) == len(GOLDEN) == 12
    assert losses == pytest.approx(GOLDEN, rel=2e-3)


if __name__ == "__main__":  # regenerate GOLDEN
    import tempfile

    import torch

    from xkernels.dispatch import force_backend

    torch.set_num_threads(1)
    with force_backend("torch"):
        print([round(x, 5) for x in golden_run(Path(tempfile.mkdtemp()))], file=sys.stderr)
