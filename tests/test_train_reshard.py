"""Resume at any world size (gloo on CPU): a checkpoint written by W processes continues at W' processes and the
losses follow the uninterrupted one-process run.

Every run keeps the global batch of 4 sequences (``--batch-size 4 / world``), places the decay by absolute steps (the
AdamW -> Muon switch at step 4) and saves at step 6, so each resumed run restores AdamW moments of the embedding and
norms, Muon momentum buffers of the matrices, the data position and the schedule from a checkpoint written at another
world size: the one-process ``state.pt`` read by 2 processes (each keeps its shard), DCP checkpoints of 2 and 4
processes resharded to 1, 2 and 4.  The bound is the one of ``test_train_distributed`` (fp32 Newton-Schulz, the
only difference the order of fp32 gradient reductions): per-step losses within 1e-5.
"""

import subprocess
import sys

import pytest
import torch.distributed as dist
from test_train_distributed import free_port  # noqa: F401
from test_train_distributed import run as torchrun
from train_support import _fast_cpu, cli_env, tiny, tiny_args, train_losses  # noqa: F401  (fixtures)

pytestmark = [pytest.mark.distributed,
              pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo")]

GLOBAL = 4
COMMON = ["--steps", "8", "--decay-start", "4", "--decay", "4", "--eval-every", "0", "--threads", "1", "--muon-dtype",
          "fp32", "--save-every", "6", "--keep-last", "3"]
BOUND = 1e-5


def args(tiny, out, name: str, world: int, *extra: str) -> list[str]:  # noqa: F811
    return tiny_args(tiny, out, *COMMON, "--name", name, "--batch-size", str(GLOBAL // world), *extra)


def in_process(argv: list[str]) -> int:
    """``main`` as the CLI runs it, on the reference ops and one thread as in the subprocesses (``_fast_cpu`` does
    not cover the module-scoped fixtures: without this the reference run went through the Triton interpreter)."""
    import torch

    from xkernels.dispatch import force_backend
    from xmodel.train import main

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with force_backend("torch"):
            return main(argv)
    finally:
        torch.set_num_threads(threads)


def assert_follows(reference: dict[int, float], run: dict[int, float], steps) -> float:
    """Every step of ``steps`` is in ``run`` and within the bound of ``reference``; returns the max difference."""
    assert sorted(run) == list(steps), sorted(run)
    worst = max(abs(reference[s] - run[s]) for s in steps)
    assert worst <= BOUND, {s: (reference[s], run[s]) for s in steps}
    return worst


@pytest.fixture(scope="module")
def ref(tiny, tmp_path_factory):  # noqa: F811
    """The uninterrupted one-process run (checkpoints at steps 6 and 8)."""
    out = tmp_path_factory.mktemp("ref")
    assert in_process(args(tiny, out, "ref", 1)) == 0
    return out / "ref"


@pytest.fixture(scope="module")
def two(tiny, tmp_path_factory, ref):  # noqa: F811
    """The same run on 2 processes (FSDP2); its losses follow the one-process run."""
    out = tmp_path_factory.mktemp("two")
    proc = torchrun(args(tiny, out, "two", 2), 2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_follows(train_losses(ref), train_losses(out / "two"), range(1, 9))
    return out / "two"


def step6(run_dir):
    return str(run_dir / "checkpoints" / "step_00000006")


def test_resume_1_to_2_and_2_to_1(ref, two, tiny, tmp_path):  # noqa: F811
    expected = train_losses(ref)
    # 2 -> 1: the sharded checkpoint of the 2-process run, in one process
    assert in_process(args(tiny, tmp_path, "to1", 1, "--resume", step6(two))) == 0
    assert_follows(expected, train_losses(tmp_path / "to1"), range(7, 9))
    # 1 -> 2: the one-process checkpoint, resharded over 2 processes
    proc = torchrun(args(tiny, tmp_path, "to2", 2, "--resume", step6(ref)), 2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming with a changed layout: processes 1 -> 2, --batch-size 4 -> 2" in proc.stdout
    assert_follows(expected, train_losses(tmp_path / "to2"), range(7, 9))


def test_changed_global_batch_is_refused(two, tiny, tmp_path, capsys):  # noqa: F811
    # 2 x 2 -> 1 x 2: the global batch would halve
    assert in_process(args(tiny, tmp_path, "half", 2, "--resume", step6(two))) == 2
    err = capsys.readouterr().err
    assert "global batch of 2 x 1 x 2 = 4" in err and "this run has 2 x 1 x 1 = 2" in err
    assert "--batch-size 4" in err and "--allow-batch-change" in err
    assert not (tmp_path / "half").exists()  # refused before the run directory was written


@pytest.mark.slow
def test_kill_at_world_4_resume_at_2_and_2_to_4(ref, two, tiny, tmp_path):  # noqa: F811
    expected = train_losses(ref)
    # world 4, killed (SIGKILL on rank 1) inside step 7, after the checkpoint of step 6
    env = {**cli_env(), "XMODEL_FAULT": "step:7@1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "4", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "xmodel.train", *args(tiny, tmp_path, "four", 4)]
    killed = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert killed.returncode != 0
    assert_follows(expected, train_losses(tmp_path / "four"), range(1, 7))
    # the same command at world 2 resumes the newest checkpoint (step 6, written by 4 processes)
    proc = torchrun(args(tiny, tmp_path, "four", 2), 2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "processes 4 -> 2" in proc.stdout
    assert_follows(expected, train_losses(tmp_path / "four"), range(1, 9))
    # 2 -> 4: the 2-process run's step-6 checkpoint on 4 processes
    proc = torchrun(args(tiny, tmp_path, "to4", 4, "--resume", step6(two)), 4)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_follows(expected, train_losses(tmp_path / "to4"), range(7, 9))
