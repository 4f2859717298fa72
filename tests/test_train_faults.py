"""Fault injection: ``kill -9`` at seeded, reproducible points of a short run -- inside a step, inside a checkpoint
save, right after a checkpoint is committed, inside the HF export --, resuming with the same command after each
kill, must end exactly where the uninterrupted run ends: the same loss at every step, the same final weights and
the same HF export (bitwise, on the CPU).  Then the same for two processes (gloo) with FSDP2.

The kills come from ``XMODEL_FAULT=POINT:N[@RANK]`` (:mod:`xmodel.training.faults`): the process SIGKILLs itself the
N-th time it reaches the point.  ``N`` is drawn from ``random.Random(SEED)`` within what the attempt still has to do
(read from the newest checkpoint), so every kill happens and a failure replays with the same seed.
"""

import json
import random
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from train_support import _fast_cpu, cli_env, tiny, tiny_args  # noqa: F401  (fixtures)

from xmodel.training import checkpoint as ckpt

SEED = 13


def last_records(run: Path) -> dict[tuple[str, int], float]:
    """The last train loss and val loss recorded for each step (a resumed run re-records the steps it redoes)."""
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["kind"] in ("train", "eval"):
            out[(r["kind"], r["step"])] = r["loss" if r["kind"] == "train" else "val_loss"]
    return out


def launch(args: list[str], nproc: int, fault: str | None = None) -> subprocess.CompletedProcess:
    env = cli_env()
    if fault:
        env["XMODEL_FAULT"] = fault
    if nproc == 1:
        cmd = [sys.executable, "-m", "xmodel.train", *args]
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
               "127.0.0.1", "--master_port", str(port), "-m", "xmodel.train", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def remaining(run: Path, steps: int, save_every: int) -> dict[str, int]:
    """How many times an attempt started now reaches each point before the run ends."""
    latest = ckpt.latest_checkpoint(run)
    done = int(latest.name.split("_")[1]) if latest else 0
    saves = len([s for s in range(done + 1, steps + 1) if s % save_every == 0 or s == steps])
    return {"step": steps - done, "save": saves, "commit": saves, "export": 1}  # every attempt ends in the export


def crash_and_resume(args: list[str], run: Path, points: list[str], steps: int, save_every: int, nproc: int,
                     rng: random.Random) -> list[str]:
    """One killed attempt per point (N drawn from ``rng``), then a clean rerun; returns the faults used."""
    used = []
    for point in points:
        left = remaining(run, steps, save_every)[point]
        n = rng.randint(1, left)
        rank = f"@{rng.randrange(nproc)}" if point == "step" and nproc > 1 else ""
        fault = f"{point}:{n}{rank}"
        result = launch(args, nproc, fault)
        assert result.returncode != 0, (fault, result.stdout[-2000:])
        if nproc == 1:
            assert result.returncode == -signal.SIGKILL, (fault, result.stderr[-3000:])
        used.append(fault)
    if nproc == 1:  # the clean rerun in-process (main is what the CLI runs): one start-up less
        from xmodel.train import main

        assert main(args) == 0, used
    else:
        final = launch(args, nproc)
        assert final.returncode == 0, (used, final.stderr[-3000:])
    return used


def assert_same_run(a: Path, b: Path, steps: int, label) -> None:
    ra, rb = last_records(a), last_records(b)
    assert sorted(k for k in ra if k[0] == "train") == [("train", s) for s in range(1, steps + 1)]
    assert ra == rb, (label, {k: (ra.get(k), rb.get(k)) for k in set(ra) | set(rb) if ra.get(k) != rb.get(k)})
    wa, wb = load_file(a / "hf" / "model.safetensors"), load_file(b / "hf" / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), label
    assert json.loads((b / "summary.json").read_text())["final_val_loss"] == \
        json.loads((a / "summary.json").read_text())["final_val_loss"]
    assert not list((b / "checkpoints").glob(".tmp-*")) and not (b / ".hf.tmp").exists()


def test_kill_9_anywhere_then_resume_equals_the_uninterrupted_run(tiny, tmp_path):  # noqa: F811
    steps, save_every = 12, 3
    common = ["--steps", str(steps), "--save-every", str(save_every), "--keep-last", "2", "--eval-every", "4",
              "--decay", "4", "--export-hf"]  # the Muon switch at step 8
    from xmodel.train import main

    assert main(tiny_args(tiny, tmp_path, *common, "--name", "ref")) == 0  # in-process: the same numerics, faster
    rng = random.Random(SEED)
    args = tiny_args(tiny, tmp_path, *common, "--name", "crash")
    used = crash_and_resume(args, tmp_path / "crash", ["step", "save", "commit", "export"], steps, save_every, 1, rng)
    assert_same_run(tmp_path / "ref", tmp_path / "crash", steps, used)
    a = ckpt.safe_torch_load(ckpt.latest_checkpoint(tmp_path / "ref") / "state.pt")
    b = ckpt.safe_torch_load(ckpt.latest_checkpoint(tmp_path / "crash") / "state.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])  # and the optimizer state:
    ma, mb = a["optimizer"]["optimizer"]["state"], b["optimizer"]["optimizer"]["state"]
    assert all(torch.equal(ma[i][k], mb[i][k]) for i in ma for k in ma[i]), used


@pytest.mark.distributed
@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch built without gloo")
def test_two_process_fsdp_kill_9_then_resume_equals_the_uninterrupted_run(tiny, tmp_path):  # noqa: F811
    steps, save_every = 8, 2
    common = ["--steps", str(steps), "--save-every", str(save_every), "--keep-last", "2", "--eval-every", "0",
              "--decay", "4", "--threads", "1", "--batch-size", "2", "--parallel", "fsdp", "--export-hf"]
    ref = launch(tiny_args(tiny, tmp_path, *common, "--name", "ref"), 2)
    assert ref.returncode == 0, ref.stderr[-3000:]
    rng = random.Random(SEED)
    args = tiny_args(tiny, tmp_path, *common, "--name", "crash")
    # killed inside a checkpoint save (the sharded DCP write), then resumed: a kill inside a step at world 4 is
    # tests/test_train_reshard.py's, inside a step or a save in one process test_kill_9_anywhere's
    used = crash_and_resume(args, tmp_path / "crash", ["save"], steps, save_every, 2, rng)
    assert_same_run(tmp_path / "ref", tmp_path / "crash", steps, used)
    meta = ckpt.read_meta(ckpt.latest_checkpoint(tmp_path / "crash"))
    assert meta["world"] == 2 and meta["format"] == "dcp" and meta["phase"] == "muon"


def test_fault_spec_is_checked_and_counts_per_point(monkeypatch):
    from xmodel.training import faults

    monkeypatch.setattr(faults, "_counts", faults.Counter())
    monkeypatch.setenv("XMODEL_FAULT", "stp:1")
    with pytest.raises(ValueError, match="bad entry 'stp:1'; expected POINT:N"):
        faults.fault_point("step")
    monkeypatch.setenv("XMODEL_FAULT", "save:3@1,step:99")
    for _ in range(3):
        faults.fault_point("save", rank=0)  # the 3rd visit, but on rank 0: no kill
    faults.fault_point("step")
    assert faults._counts == {"save": 3, "step": 1}
