"""Two processes with gloo on CPU (torchrun): FSDP2 and DDP runs match the one-process run with the same global batch.

The only source of difference is the order of the fp32 gradient reductions (reduce-scatter / all-reduce sum in
another order than one backward); everything else (data, init, schedule, the Muon step on whole gathered matrices)
is identical by construction.  The runs use ``--muon-dtype fp32``: with the default bf16 Newton-Schulz (on CPUs with
native bf16) a 1e-6 difference in the momentum flips bf16 roundings inside the iteration, and steps after the Muon
switch differed by up to 1.1e-4 in loss and 3.8e-4 in relative weight norm -- which is bf16 rounding, not a
distributed-training bug, and would force a bound too loose to catch one.  In fp32 (measured on the 2-core Xeon,
torch 2.13): per-step losses (7-16) agree to 9.5e-7, final weights to 6.7e-6 in relative Frobenius norm; the bounds
below leave ~10x headroom.
"""

import json
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from train_support import _fast_cpu, cli_env, tiny, tiny_args, train_losses  # noqa: F401  (fixtures)

pytestmark = pytest.mark.distributed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(args: list[str], nproc: int) -> subprocess.CompletedProcess:
    env = cli_env()
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                 "--master_addr", "127.0.0.1", "--master_port", str(free_port())] if nproc > 1 else [sys.executable])
    return subprocess.run([*launcher, "-m", "xmodel.train", *args], capture_output=True, text=True, env=env,
                          timeout=300)


# the decay placed by absolute steps, so the resume below may extend the run (the steps taken stay unchanged)
COMMON = ["--steps", "6", "--decay-start", "4", "--decay", "2", "--eval-every", "0", "--threads", "1", "--muon-dtype",
          "fp32", "--export-hf"]  # fp32 Newton-Schulz: see the module docstring


@pytest.fixture(scope="module")
def one_process(tiny, tmp_path_factory):  # noqa: F811
    """The one-process run with the global batch, shared by both parallel modes (it does not depend on the mode).
    In-process (``main`` is what the CLI runs; reference ops, one thread, as in the subprocesses): no start-up."""
    from xkernels.dispatch import force_backend
    from xmodel.train import main

    out = tmp_path_factory.mktemp("one")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with force_backend("torch"):
            assert main(tiny_args(tiny, out, *COMMON, "--name", "one", "--batch-size", "4")) == 0
    finally:
        torch.set_num_threads(threads)
    return out / "one"


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch built without gloo")
@pytest.mark.parametrize("parallel", ["fsdp", "ddp"])
def test_two_process_gloo_matches_one_process(one_process, tiny, tmp_path, parallel):  # noqa: F811
    two = run(tiny_args(tiny, tmp_path, *COMMON, "--name", "two", "--batch-size", "2", "--parallel", parallel), 2)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = train_losses(one_process), train_losses(tmp_path / "two")
    assert sorted(a) == sorted(b) == list(range(1, 7))
    for step in a:
        assert abs(a[step] - b[step]) <= 1e-5, (step, a[step], b[step])
    records = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert any(r["kind"] == "event" and r["event"] == "switch_to_muon" for r in records)
    assert two.stdout.count("done in") == 1  # rank-0 logging only
    meta = json.loads(next((tmp_path / "two" / "checkpoints").glob("step_*/meta.json")).read_text())
    assert meta["world"] == 2 and meta["format"] == "dcp" and meta["phase"] == "muon"
    assert (tmp_path / "two" / "hf" / "model.safetensors").is_file()  # consolidated export
    from xmodel.model import Xmodel

    m1, m2 = Xmodel.from_pretrained(one_process / "hf"), Xmodel.from_pretrained(tmp_path / "two" / "hf")
    for (name, p1), p2 in zip(m1.state_dict().items(), m2.state_dict().values()):
        rel = ((p1 - p2).norm() / p1.norm()).item()
        assert rel < 5e-5, (name, rel)
    # the standalone exporter reads the sharded checkpoint in one process (safe reader) and writes the same model
    from xmodel.export import export_checkpoint

    out = export_checkpoint(tmp_path / "two", tmp_path / "two-export")
    again = Xmodel.from_pretrained(out)
    assert all(torch.equal(a, b) for a, b in zip(m2.state_dict().values(), again.state_dict().values()))
    if parallel == "fsdp":
        return  # FSDP2's sharded checkpoints resume at world 2 in tests/test_train_reshard.py (4 -> 2)
    # resume the 2-process DDP run from its checkpoint for 2 more steps
    more = run(tiny_args(tiny, tmp_path, *COMMON[:-1], "--name", "two", "--batch-size", "2", "--parallel", parallel,
                         "--steps", "8"), 2)
    assert more.returncode == 0, more.stderr[-3000:]
    assert "resuming from" in more.stdout and "schedule changed on resume" in more.stdout
    assert sorted(train_losses(tmp_path / "two")) == list(range(1, 9))


@pytest.mark.slow
@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch built without gloo")
def test_world4_run_ends_cleanly_under_load(tiny, tmp_path):  # noqa: F811
    """Issue 22: world-4 runs (FSDP2, Muon from the decay) trained every step, then one rank aborted at the end
    ("terminate called without an active exception": gloo threads outliving the interpreter, see
    ``xmodel.training.distributed.exit_process``) and no export or summary was written.  A run while a busy process
    competes for the cores (the abort came more often on a busy machine) exits 0 with the HF export and the summary.
    The suite ends more world-4 runs the same way: the two HSDP tests below (exit 0, HF export) and the 4 -> 2 and
    2 -> 4 resumes of ``tests/test_train_reshard.py`` (exit 0)."""
    load = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        proc = run(tiny_args(tiny, tmp_path, "--steps", "6", "--decay-start", "3", "--decay", "3", "--eval-every", "0",
                             "--threads", "1", "--batch-size", "1", "--eval-batches", "1", "--export-hf", "--name",
                             "r"), 4)
    finally:
        load.kill()
        load.wait()
    assert proc.returncode == 0 and "terminate called" not in proc.stderr, proc.stderr[-3000:]
    assert (tmp_path / "r" / "hf" / "model.safetensors").is_file()
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["steps"] == 6
    assert sorted(train_losses(tmp_path / "r")) == list(range(1, 7))


@pytest.fixture(scope="module")
def one_process_fp8(tiny, tmp_path_factory):  # noqa: F811
    """``one_process`` with ``--fp8 delayed --fp8-emulate`` (the reference of the FP8 HSDP run)."""
    from xkernels.dispatch import force_backend
    from xmodel.train import main

    out = tmp_path_factory.mktemp("one-fp8")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with force_backend("torch"):
            assert main(tiny_args(tiny, out, *COMMON, *FP8, "--name", "one", "--batch-size", "4")) == 0
    finally:
        torch.set_num_threads(threads)
    return out / "one"


FP8 = ["--fp8", "delayed", "--fp8-emulate"]


@pytest.mark.slow
@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch built without gloo")
@pytest.mark.parametrize("fp8", [False, True], ids=["fp32", "fp8"])
def test_hsdp_2x2_matches_one_process(request, tiny, tmp_path, fp8):  # noqa: F811
    """HSDP (``--dp-replicate 2`` on 4 processes: 2 replicas x 2 shards) through the AdamW -> Muon switch equals the
    one-process run: Muon orthogonalises each matrix once per replica group (the Newton-Schulz work split over its
    2 shard ranks).

    With ``--fp8 delayed --fp8-emulate`` (this once hung: see ``xmodel.training.distributed.wrap_model``): the amaxes
    are reduced over all 4 ranks (step 0's before its first quantisation), so every rank quantises with the scales
    of the one-process run.  FP8 rounding is discontinuous: the ~1e-7 differences of the gradient reduction order
    flip a few E4M3/E5M2 roundings, and a flip moves the loss by far more than the reduction order does.  Measured
    (2-core Xeon, torch 2.13 and 2.11): the losses of steps 1-5 agree to 2.4e-7, step 6 (after the first Muon
    update) to 5.7e-4, final weights to 3.3e-4 relative; scaling step 0 from each rank's own amax (as before the
    fix) moved the step-1 loss by 1.1e-2 (world 2)."""
    one = request.getfixturevalue("one_process_fp8" if fp8 else "one_process")
    four = run(tiny_args(tiny, tmp_path, *COMMON, *(FP8 if fp8 else []), "--name", "hsdp", "--batch-size", "1",
                         "--dp-replicate", "2"), 4)
    assert four.returncode == 0, four.stderr[-3000:]
    assert "HSDP: 2 replicas x 2 shards" in four.stdout
    a, b = train_losses(one), train_losses(tmp_path / "hsdp")
    assert sorted(a) == sorted(b) == list(range(1, 7))
    adamw = max(abs(a[s] - b[s]) for s in range(1, 5))
    worst = max(abs(a[s] - b[s]) for s in a)
    assert adamw <= 1e-5 and worst <= (5e-3 if fp8 else 1e-5), {s: (a[s], b[s]) for s in a}
    from xmodel.model import Xmodel

    m1, m4 = Xmodel.from_pretrained(one / "hf"), Xmodel.from_pretrained(tmp_path / "hsdp" / "hf")
    for (name, p1), p4 in zip(m1.state_dict().items(), m4.state_dict().values()):
        assert ((p1 - p4).norm() / p1.norm()).item() < (5e-3 if fp8 else 5e-5), name


# through the AdamW -> Muon switch at step 3 (Muon's DTensor path), exported and checkpointed
AG = ["--steps", "4", "--decay-start", "2", "--decay", "2", "--eval-every", "0", "--threads", "1", "--muon-dtype",
      "fp32", "--export-hf", "--batch-size", "2", "--fp8", "current", "--fp8-emulate"]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch built without gloo")
def test_fp8_all_gather_equals_the_high_precision_all_gather(tiny, tmp_path):  # noqa: F811
    """``--fp8-all-gather`` (FSDP2 gathers E4M3 codes quantised with each weight's global-amax scale) against the
    same world-2 run gathering fp32 weights and quantising them after: the codes are the same bits, so every loss,
    gradient norm and final weight is *equal*.  The optimizer steps the fp32 shards and checkpoints hold plain
    tensors: the sharded checkpoint exports (one-process reader) to the same weights."""
    procs = {name: run(tiny_args(tiny, tmp_path, *AG, "--name", name, *extra), 2)
             for name, extra in (("plain", []), ("ag", ["--fp8-all-gather"]))}
    for name, proc in procs.items():
        assert proc.returncode == 0, (name, proc.stderr[-3000:])
    assert "weights all-gathered in FP8" in procs["ag"].stdout
    assert "weights all-gathered in FP8" not in procs["plain"].stdout
    records = {name: [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
               for name in procs}
    train = {name: [(r["step"], r["loss"], r["grad_norm"]) for r in rs if r["kind"] == "train"]
             for name, rs in records.items()}
    assert [s for s, _, _ in train["ag"]] == [1, 2, 3, 4] and train["ag"] == train["plain"]
    assert any(r["kind"] == "event" and r["event"] == "switch_to_muon" for r in records["ag"])
    from xmodel.export import export_checkpoint
    from xmodel.model import Xmodel

    plain = Xmodel.from_pretrained(tmp_path / "plain" / "hf").state_dict()
    for model in (Xmodel.from_pretrained(tmp_path / "ag" / "hf"),
                  Xmodel.from_pretrained(export_checkpoint(tmp_path / "ag", tmp_path / "ag-export"))):
        sd = model.state_dict()
        assert sd.keys() == plain.keys() and all(torch.equal(sd[k], plain[k]) for k in plain)


@pytest.mark.parametrize("extra, message", [
    ([], "no --fp8 was given"),
    (["--fp8", "delayed", "--fp8-emulate"], "weight scales from an amax history"),
    (["--fp8", "row", "--fp8-emulate"], "a scale per row or block"),
    (["--fp8", "current", "--fp8-emulate", "--parallel", "ddp"], "needs --parallel fsdp"),
    (["--fp8", "current", "--fp8-emulate", "--compile"], "does not work with --compile"),
    (["--fp8", "current", "--fp8-emulate"], "one process has no weight all-gather"),
], ids=["no-fp8", "delayed", "row", "ddp", "compile", "one-process"])
def test_fp8_all_gather_refusals(tiny, tmp_path, capsys, extra, message):  # noqa: F811
    """Unsupported combinations exit 2 at startup, saying what to use instead, before the run directory exists."""
    from xmodel.train import main

    assert main(tiny_args(tiny, tmp_path, "--name", "x", "--fp8-all-gather", *extra)) == 2
    err = capsys.readouterr().err
    assert "--fp8-all-gather" in err and message in err, err
    assert not (tmp_path / "x").exists()
