"""Shared pieces of the trainer tests: a tiny corpus + BPE, CLI arguments for a tiny model, and the autouse fixture
``_fast_cpu`` (reference ops, one thread).  Test modules import what they use from here."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from xmodel.training.tokenizer import train_bpe

REPO = Path(__file__).resolve().parent.parent
TINY_MODEL = ["--model.hidden_size", "64", "--model.num_hidden_layers", "2", "--model.intermediate_size", "160",
              "--model.num_attention_heads", "2", "--model.num_key_value_heads", "1", "--model.vocab_size", "512"]


def corpus_texts() -> list[str]:
    """Real prose with structure a tiny model learns quickly: the bundled Python documentation topics."""
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)][:40]


@pytest.fixture(autouse=True)
def _fast_cpu():
    """The trainer is tested on the PyTorch reference ops (the kernels have their own parity tests; through the
    Triton interpreter a 24-step run would take minutes), on one thread (tiny models run fastest on one, and two
    threads on a busy 2-core CI box are ~100x slower)."""
    from xkernels.dispatch import force_backend

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with force_backend("torch"):
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny corpus (.txt) and a 512-id BPE trained on it, shared by the runs of a module."""
    root = tmp_path_factory.mktemp("tiny")
    texts = corpus_texts()
    (root / "data.txt").write_text("\n\n".join(texts), encoding="utf-8")
    train_bpe(texts, 512, root / "tok" / "tokenizer.json")
    return root


def tiny_args(root: Path, out: Path, *extra: str) -> list[str]:
    return [*TINY_MODEL, "--seq-len", "32", "--batch-size", "4", "--tokenizer", str(root / "tok" / "tokenizer.json"),
            "--data", str(root / "data.txt"), "--cache-dir", str(root / "cache"), "--out-dir", str(out),
            "--no-progress", "--no-export-hf", "--eval-batches", "2", *extra]


def train_losses(run_dir: Path) -> dict[int, float]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["kind"] == "train":
            out[r["step"]] = r["loss"]
    return out


def cli_env() -> dict[str, str]:
    """Subprocess environment: the repo importable, reference ops, one thread (see ``_fast_cpu``)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "XKERNELS_BACKEND": "torch"}
    env.pop("TRITON_INTERPRET", None)
    return env


def run_cli(args: list[str], **kw) -> subprocess.CompletedProcess:
    env = cli_env()
    return subprocess.run([sys.executable, "-m", "xmodel.train", *args], capture_output=True, text=True, env=env,
                          timeout=240, **kw)
