"""End-to-end trainer runs on a tiny model: loss falls through the Muon switch, resume equivalence, SIGTERM,
non-finite steps, kill -9 during a checkpoint save, and bad inputs (clear error, non-zero exit, nothing written)."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from train_support import _fast_cpu, cli_env, corpus_texts, tiny, tiny_args, train_losses  # noqa: F401  (fixtures)

from xmodel.train import main
from xmodel.training import checkpoint as ckpt
from xmodel.training.data import read_shard, write_shard
from xmodel.training.distributed import DistInfo
from xmodel.training.tokenizer import train_bpe

# ------------------------------------------------------------------------------------------------- training
def test_short_run_loss_falls_through_muon_switch(tiny, tmp_path, capsys):
    args = tiny_args(tiny, tmp_path, "--steps", "24", "--eval-every", "8", "--save-every", "12", "--name", "r",
                     "--export-hf")
    assert main(args) == 0
    out = capsys.readouterr().out
    run = tmp_path / "r"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r["val_loss"] for r in records if r["kind"] == "eval"]
    assert evals[-1] < evals[0] - 2.0, evals  # real learning, not noise
    switch = [r for r in records if r["kind"] == "event" and r["event"] == "switch_to_muon"]
    assert len(switch) == 1 and switch[0]["step"] == 17 and switch[0]["params"] == 14  # 2 layers x 7 matrices
    phases = {r["step"]: r["phase"] for r in records if r["kind"] == "train"}
    assert phases[1] == "warmup/adamw" and phases[10] == "stable/adamw" and phases[24] == "decay/muon"
    assert (run / "loss.png").stat().st_size > 1000
    assert "switch AdamW -> Muon" in out and str(run / "metrics.jsonl") in out
    summary = json.loads((run / "summary.json").read_text())
    assert summary["final_val_loss"] == pytest.approx(evals[-1])
    # the HF export loads back into an Xmodel with the trained weights
    from xmodel.model import Xmodel

    model = Xmodel.from_pretrained(run / "hf")
    state = ckpt.safe_torch_load(ckpt.latest_checkpoint(run) / "state.pt")["model"]
    torch.testing.assert_close(model.state_dict()["model.norm.weight"], state["model.norm.weight"])
    assert (run / "hf" / "tokenizer.json").is_file()
    # running the same command again finds the run complete and changes nothing
    before = (run / "metrics.jsonl").read_text()
    assert main(args) == 0
    assert "already complete" in capsys.readouterr().out
    assert (run / "metrics.jsonl").read_text() == before


@pytest.mark.parametrize("resume_at", [5, 15])  # before the switch (crosses it) and after it (Muon state)
def test_resume_reproduces_uninterrupted_run(tiny, tmp_path, resume_at):
    common = ["--steps", "20", "--eval-every", "0", "--save-every", "5", "--keep-last", "10", "--decay", "8"]
    assert main(tiny_args(tiny, tmp_path, *common, "--name", "full")) == 0
    full = train_losses(tmp_path / "full")
    checkpoint = tmp_path / "full" / "checkpoints" / f"step_{resume_at:08d}"
    assert main(tiny_args(tiny, tmp_path, *common, "--name", "resumed", "--resume", str(checkpoint))) == 0
    resumed = train_losses(tmp_path / "resumed")
    assert sorted(resumed) == list(range(resume_at + 1, 21))
    for step, loss in resumed.items():
        assert abs(loss - full[step]) <= 1e-6, (step, loss, full[step])


def test_sigterm_checkpoints_and_exits_zero_then_resumes(tiny, tmp_path, capsys):
    # warmup in steps and no decay: a shorter --steps on the rerun leaves the steps already taken unchanged
    args = tiny_args(tiny, tmp_path, "--steps", "400", "--eval-every", "0", "--save-every", "0", "--name", "sig",
                     "--warmup", "2", "--decay", "0")
    env = cli_env()
    proc = subprocess.Popen([sys.executable, "-m", "xmodel.train", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    metrics = tmp_path / "sig" / "metrics.jsonl"
    deadline = time.time() + 180
    while time.time() < deadline and not (metrics.is_file() and '"train"' in metrics.read_text()):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "stopped by SIGTERM" in out
    latest = ckpt.latest_checkpoint(tmp_path / "sig")
    step = int(latest.name.split("_")[1])
    assert 1 <= step < 400
    assert ckpt.read_meta(latest)["data"]["sample"] == 4 * step
    assert not (tmp_path / "sig" / "loss.png").exists()  # not finished
    # the same command (here with fewer steps, to be quick; in-process: no second start-up) continues from the
    # checkpoint
    args[args.index("--steps") + 1] = str(step + 2)
    assert main(args) == 0
    out = capsys.readouterr().out
    assert f"resuming from {latest}" in out
    assert "schedule changed on resume (--steps 400 -> " in out
    assert max(train_losses(tmp_path / "sig")) == step + 2


def test_nonfinite_steps_skipped_then_stop(tiny, tmp_path, capsys):
    args = tiny_args(tiny, tmp_path, "--steps", "20", "--eval-every", "0", "--save-every", "3", "--name", "nan",
                     "--max-nonfinite", "3", "--inject-nonfinite-at", "[1, 6, 7, 8]")
    assert main(args) == 1  # in-process: main's return value is the exit status
    err = capsys.readouterr().err
    assert "3 non-finite steps in a row (steps 7-9)" in err
    assert "step_00000006" in err  # the last good checkpoint, named
    run = tmp_path / "nan"
    assert ckpt.latest_checkpoint(run).name == "step_00000006"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    skipped = [r["step"] for r in records if r["kind"] == "event" and r["event"] == "nonfinite"]
    assert skipped == [2, 7, 8, 9]
    # the checkpoint is loadable
    state = ckpt.safe_torch_load(ckpt.latest_checkpoint(run) / "state.pt")
    assert all(torch.isfinite(v).all() for v in state["model"].values())


KILL_DURING_SAVE = r"""
import sys, torch
from pathlib import Path
from xmodel.training import checkpoint as ckpt
from xmodel.training.distributed import DistInfo

class Opt:
    def state_dict(self):
        return {"phase": "adamw", "optimizer": {}}

run = Path(sys.argv[1])
model = torch.nn.Linear(64, 64)
for step in (1, 2):  # XMODEL_FAULT=save:2 SIGKILLs the second save after state.pt, before meta.json
    ckpt.save_checkpoint(run, step, model, Opt(), {"phase": "adamw"}, DistInfo())
"""


def test_kill_9_during_save_keeps_previous_checkpoint(tmp_path):
    env = {**cli_env(), "XMODEL_FAULT": "save:2"}
    result = subprocess.run([sys.executable, "-c", KILL_DURING_SAVE, str(tmp_path)], env=env, timeout=120)
    assert result.returncode == -signal.SIGKILL
    assert (tmp_path / "checkpoints" / ".tmp-step_00000002" / "state.pt").is_file()  # the interrupted save
    latest = ckpt.latest_checkpoint(tmp_path)
    assert latest.name == "step_00000001"
    checked = ckpt.select_checkpoint(tmp_path)
    assert checked.path == latest and checked.state["model"]["weight"].shape == (64, 64)
    # the next save removes the leftover
    ckpt.save_checkpoint(tmp_path, 2, torch.nn.Linear(64, 64), _NoOpt(), {"phase": "adamw"}, DistInfo())
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000001", "step_00000002"]


class _NoOpt:
    def state_dict(self):
        return {"phase": "adamw", "optimizer": {}}


# ------------------------------------------------------------------------------------------------ bad input
def _bad_inputs(root: Path, tmp: Path) -> dict[str, tuple[list[str], str]]:
    (tmp / "empty.txt").write_text("")
    (tmp / "short.txt").write_text("just a few words")
    (tmp / "emptydir").mkdir()
    good = read_shard(write_shard(tmp / "good.bin", [1, 2, 3] * 100))
    assert len(good) == 300
    truncated = tmp / "truncated.bin"
    truncated.write_bytes((tmp / "good.bin").read_bytes()[:-10])
    notashard = tmp / "notashard.bin"
    notashard.write_bytes(b"hello world, this is not a token shard at all!")
    write_shard(tmp / "foreign.bin", list(range(1000)))  # ids beyond the tiny model's 512
    big_vocab = tmp / "bigtok" / "tokenizer.json"
    train_bpe(corpus_texts()[:5], 600, big_vocab)
    data = str(root / "data.txt")
    return {
        "missing data": (["--data", str(tmp / "nope.txt")], "no such file or directory"),
        "empty data": (["--data", str(tmp / "empty.txt")], "is empty"),
        "empty directory": (["--data", str(tmp / "emptydir")], "matches no"),
        "shorter than a sequence": (["--data", str(tmp / "short.txt")], "fewer than one sequence"),
        "vocab too large": (["--data", data, "--tokenizer", str(big_vocab)], "--model.vocab_size 600"),
        "truncated shard": (["--data", str(truncated)], "truncated shard"),
        "corrupt shard": (["--data", str(notashard)], "bad magic"),
        "token ids beyond the vocabulary": (["--data", str(tmp / "foreign.bin")], "token id 999 >= the model's"),
        "unknown preset": (["--data", data, "--preset", "gigantic"], "unknown preset 'gigantic'"),
        "unknown config key": (["--data", data, "--learning-rate", "1"], "unknown config key 'learning_rate'"),
        "unknown model field": (["--data", data, "--model.hidden", "3"], "--model"),
        "fp8 without hardware": (["--data", data, "--fp8", "delayed"], "--fp8-emulate"),
    }


def test_bad_inputs_fail_clearly_and_write_nothing(tiny, tmp_path, capsys):
    for label, (extra, match) in _bad_inputs(tiny, tmp_path).items():
        if label == "fp8 without hardware" and torch.cuda.is_available():
            continue  # this case expects a machine without FP8 hardware
        out = tmp_path / f"out-{label.replace(' ', '-')}"
        args = tiny_args(tiny, out, "--steps", "4", *extra)
        if "--tokenizer" in extra:  # keep only the later --tokenizer
            i = args.index("--tokenizer")
            del args[i:i + 2]
        assert main(args) == 2, label
        err = capsys.readouterr().err
        assert err.startswith("error: ") and match in err, (label, err)
        assert not out.exists(), f"{label}: wrote {list(out.rglob('*'))}"


def test_resume_with_incompatible_config_refuses_and_keeps_run(tiny, tmp_path, capsys):
    args = tiny_args(tiny, tmp_path, "--steps", "4", "--eval-every", "0", "--name", "x")
    assert main(args) == 0
    run = tmp_path / "x"
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    changed = [a if a != "64" else "96" for a in args] + ["--steps", "8"]  # wider model
    assert main(changed) == 2
    err = capsys.readouterr().err
    assert "incompatible" in err and "hidden_size 64 -> 96" in err
    assert main(args + ["--seq-len", "48", "--steps", "8"]) == 2
    assert "seq_len: 32 -> 48" in capsys.readouterr().err
    assert main(args + ["--resume", "never"]) == 2
    assert "will not be overwritten" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()} == before


def test_init_from_starts_a_new_phase_with_trained_weights(tiny, tmp_path, capsys):
    assert main(tiny_args(tiny, tmp_path, "--steps", "12", "--eval-every", "0", "--name", "stable")) == 0
    first = train_losses(tmp_path / "stable")
    source = ckpt.latest_checkpoint(tmp_path / "stable")
    (tmp_path / "new.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus_texts()[::-1]))
    args = tiny_args(tiny, tmp_path, "--steps", "4", "--eval-every", "0", "--name", "phase2", "--init-from",
                     str(source), "--lr-embed", "0.001", "--warmup", "0", "--decay", "4")
    args[args.index("--data") + 1] = str(tmp_path / "new.jsonl")
    assert main(args) == 0
    capsys.readouterr()
    second = train_losses(tmp_path / "phase2")
    assert sorted(second) == [1, 2, 3, 4]  # a fresh schedule
    assert second[1] < first[1] - 3.0  # the trained weights were loaded
    records = [json.loads(line) for line in (tmp_path / "phase2" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert train[0]["phase"] == "decay/muon" and train[0]["lr_embed"] < 0.001  # this run's lr, Muon state loaded
    # a different model shape is refused
    wide = [a if a != "64" else "96" for a in args] + ["--name", "phase2b"]
    assert main(wide) == 2
    assert "hidden_size 64 -> 96" in capsys.readouterr().err


def test_fp8_emulation_trains_and_is_labelled(tiny, tmp_path, capsys):
    args = tiny_args(tiny, tmp_path, "--steps", "6", "--eval-every", "3", "--name", "fp8", "--fp8", "delayed",
                     "--fp8-emulate", "--export-hf")
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "EMULATED" in out and "fp8 delayed (emulated)" in out
    evals = [json.loads(line)["val_loss"] for line in (tmp_path / "fp8" / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "eval"]
    assert evals[-1] < evals[0] - 2.0
    from xmodel.model import Xmodel

    assert Xmodel.from_pretrained(tmp_path / "fp8" / "hf").num_parameters() > 0


def test_saving_the_same_step_again_replaces_it(tmp_path):
    model = torch.nn.Linear(4, 4)
    for keep in range(3):
        ckpt.save_checkpoint(tmp_path, 1 + keep // 2, model, _NoOpt(), {"phase": "adamw", "n": keep}, DistInfo(),
                             keep_last=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_00000001", "step_00000002"]
    assert ckpt.read_meta(tmp_path / "checkpoints" / "step_00000001")["n"] == 1
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000001", "step_00000002"]
