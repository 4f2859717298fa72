"""Recovery from a damaged run: resume takes the newest *valid* checkpoint and says what it skipped; I/O errors are
reported as what they are (disk full -- on a real full tmpfs --, file-size limit, permission) with nothing partial
left; a completed run missing its HF export re-exports; ``python -m xmodel.export``; schedule changes on resume;
and loading never runs code from a file (a crafted pickle is refused and its payload does not execute)."""

import json
import os
import pickle
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_support import REPO, _fast_cpu, cli_env, tiny, tiny_args, train_losses  # noqa: F401  (fixtures)

from xmodel.train import main
from xmodel.training import checkpoint as ckpt

COMMON = ["--eval-every", "0", "--decay", "2"]


@pytest.fixture(scope="module")
def finished(tiny, tmp_path_factory):  # noqa: F811
    """An 8-step run with checkpoints at steps 4, 6 and 8 (kept: 3), to copy and damage."""
    out = tmp_path_factory.mktemp("finished")
    from xkernels.dispatch import force_backend

    torch.set_num_threads(1)
    with force_backend("torch"):
        assert main(tiny_args(tiny, out, "--steps", "8", "--save-every", "2", "--keep-last", "3", "--name", "r",
                              *COMMON)) == 0
    return out / "r"


def copy_run(finished: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "r"
    shutil.copytree(finished, dest)
    return dest


def set_recorded_size(ckpt_dir: Path, name: str = "state.pt") -> None:
    """Make meta.json agree with the file as it is now (a damaged file that a size check alone would not catch)."""
    meta = json.loads((ckpt_dir / "meta.json").read_text())
    meta["files"][name] = (ckpt_dir / name).stat().st_size
    (ckpt_dir / "meta.json").write_text(json.dumps(meta))


def _truncate(d: Path) -> str:
    data = (d / "state.pt").read_bytes()
    (d / "state.pt").write_bytes(data[: len(data) // 2])
    return "bytes but was"  # "... state.pt is N bytes but was 2N when saved (truncated or overwritten)"


def _garble_meta(d: Path) -> str:
    (d / "meta.json").write_text('{"step": 8, "phase": "mu')
    return "not valid JSON"


def _remove_state(d: Path) -> str:
    (d / "state.pt").unlink()
    return "state.pt is missing"


def _nan_weights(d: Path) -> str:
    state = ckpt.safe_torch_load(d / "state.pt")
    state["model"]["model.norm.weight"][3] = float("nan")
    torch.save(state, d / "state.pt")
    set_recorded_size(d)
    return "the weight model.norm.weight holds NaN or inf"


def _scrambled_bytes(d: Path) -> str:
    data = bytearray((d / "state.pt").read_bytes())
    data[:64] = b"\0" * 64  # same size, the zip header destroyed
    (d / "state.pt").write_bytes(bytes(data))
    return "state.pt is not a readable torch file"


DAMAGE = {"truncated state.pt": _truncate, "garbled meta.json": _garble_meta, "missing state.pt": _remove_state,
          "non-finite weights": _nan_weights, "scrambled state.pt": _scrambled_bytes}
# (scrambled: "state.pt is not a readable torch file (Unsupported operand 0)" -- damaged, not refused as unsafe)


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_resume_skips_a_damaged_newest_checkpoint(finished, tiny, tmp_path, damage, capsys):  # noqa: F811
    run = copy_run(finished, tmp_path)
    reason = DAMAGE[damage](run / "checkpoints" / "step_00000008")
    # one more step than the finished run, so the rerun trains: it must start from step 6, the newest valid
    args = tiny_args(tiny, tmp_path, "--steps", "8", "--save-every", "2", "--keep-last", "3", "--name", "r", *COMMON)
    assert main(args) == 0
    out = capsys.readouterr().out
    assert f"skipping checkpoint {run / 'checkpoints' / 'step_00000008'}: " in out and reason in out, out
    assert "resuming from step_00000006, the newest valid checkpoint (1 newer one(s) skipped)" in out
    # steps 7-8 redone from step 6 reproduce the original run exactly
    redone = train_losses(run)
    original = train_losses(finished)
    assert redone[7] == original[7] and redone[8] == original[8]
    new = ckpt.safe_torch_load(run / "checkpoints" / "step_00000008" / "state.pt")["model"]
    old = ckpt.safe_torch_load(finished / "checkpoints" / "step_00000008" / "state.pt")["model"]
    assert all(torch.equal(new[k], old[k]) for k in old)


def test_resume_path_forces_one_checkpoint(finished, tiny, tmp_path, capsys):  # noqa: F811
    run = copy_run(finished, tmp_path)
    _truncate(run / "checkpoints" / "step_00000008")
    base = tiny_args(tiny, tmp_path, "--steps", "8", "--save-every", "2", "--keep-last", "3", "--name", "r", *COMMON)
    assert main([*base, "--resume", str(run / "checkpoints" / "step_00000008")]) == 2  # no fallback when forced
    err = capsys.readouterr().err
    assert err.startswith("error: --resume: ") and "step_00000008/state.pt is " in err and "bytes but was" in err and "truncated" in err
    assert main([*base, "--resume", str(run / "checkpoints" / "step_00000004")]) == 0
    assert "resuming from " + str(run / "checkpoints" / "step_00000004") in capsys.readouterr().out


def test_no_usable_checkpoint_is_bad_input(finished, tiny, tmp_path, capsys):  # noqa: F811
    run = copy_run(finished, tmp_path)
    for d in ckpt.list_checkpoints(run):
        _remove_state(d)
    args = tiny_args(tiny, tmp_path, "--steps", "8", "--name", "r", *COMMON)
    before = sorted(p.name for p in run.rglob("*"))
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "holds checkpoints but none is usable" in err and err.count("state.pt is missing") == 3
    assert sorted(p.name for p in run.rglob("*")) == before  # nothing touched


# ------------------------------------------------------------------------------------------ no code from a file
class Payload:
    """Pickles to "call exec(...)": what a malicious checkpoint would carry."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('payload ran')",))


def test_crafted_state_pt_is_refused_and_does_not_run(finished, tiny, tmp_path, capsys):  # noqa: F811
    run = copy_run(finished, tmp_path)
    d = run / "checkpoints" / "step_00000008"
    state = ckpt.safe_torch_load(d / "state.pt")
    # the payload is live: a plain torch.load executes it
    probe = tmp_path / "probe"
    torch.save({"x": Payload(probe)}, tmp_path / "probe.pt")
    torch.load(tmp_path / "probe.pt", weights_only=False)
    assert probe.read_text() == "payload ran"
    marker = tmp_path / "pwned"
    state["optimizer"]["optimizer"]["param_groups"][0]["name"] = Payload(marker)
    torch.save(state, d / "state.pt")
    set_recorded_size(d)
    base = tiny_args(tiny, tmp_path, "--steps", "8", "--save-every", "2", "--keep-last", "3", "--name", "r", *COMMON)
    assert main([*base, "--resume", str(d)]) == 2
    err = capsys.readouterr().err
    assert "refused to load" in err and "(it asks for exec)" in err and "nothing in it was executed" in err, err
    assert "add_safe_globals" not in err  # torch's advice to allow-list the payload is not repeated
    assert not marker.exists()
    # auto: skipped like any unusable checkpoint, the previous one is used
    assert main(base) == 0
    out = capsys.readouterr().out
    assert "skipping checkpoint" in out and "refused to load" in out and "resuming from step_00000006" in out
    assert not marker.exists()


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_crafted_dcp_metadata_is_refused(tmp_path):
    """The sharded format: PyTorch reads ``.metadata`` with plain pickle; ours admits only its metadata classes."""
    import torch.distributed.checkpoint as dcp

    good = tmp_path / "good"
    dcp.save({"model": {"w": torch.randn(4, 4)}, "optimizer": {"param_groups": [{"lr": 0.1, "name": "x"}]}},
             checkpoint_id=str(good), no_dist=True)
    ckpt.read_dcp_metadata(good)  # a genuine one passes
    state = {"model": {"w": torch.zeros(4, 4)}, "optimizer": {"param_groups": [{"lr": 0.0, "name": ""}]}}
    ckpt.dcp_load(state, good, no_dist=True)
    assert state["optimizer"]["param_groups"][0] == {"lr": 0.1, "name": "x"}  # non-tensor entries, weights_only
    marker = tmp_path / "pwned"
    (good / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(ckpt.UnsafeCheckpointError, match="refused to load .*builtins.exec"):
        ckpt.read_dcp_metadata(good)
    assert not marker.exists()


# ------------------------------------------------------------------------------------------ export
def test_kill_during_export_then_rerun_exports(tiny, tmp_path, capsys):  # noqa: F811
    """The kill needs its own process; the reruns (the same command) run in-process: the same code, no start-up."""
    args = tiny_args(tiny, tmp_path, "--steps", "4", "--name", "e", "--export-hf", *COMMON)
    killed = subprocess.run([sys.executable, "-m", "xmodel.train", *args], env={**cli_env(), "XMODEL_FAULT":
                            "export:1"}, capture_output=True, text=True, timeout=240)
    assert killed.returncode == -signal.SIGKILL
    run = tmp_path / "e"
    assert ckpt.latest_checkpoint(run).name == "step_00000004" and not (run / "hf").exists()
    assert (run / ".hf.tmp").is_dir() and not (run / "summary.json").exists()
    assert main(args) == 0
    assert "finished training at step 4 but its HF export and summary are missing" in capsys.readouterr().out
    assert not (run / ".hf.tmp").exists() and (run / "summary.json").is_file()
    weights = load_file(run / "hf" / "model.safetensors")
    state = ckpt.safe_torch_load(run / "checkpoints" / "step_00000004" / "state.pt")["model"]
    assert all(torch.equal(weights[k], state[k]) for k in weights)
    assert main(args) == 0
    assert "is already complete at step 4" in capsys.readouterr().out


def test_standalone_export_from_any_checkpoint(finished, tmp_path, capsys):
    from xmodel.export import main as export_main

    run = copy_run(finished, tmp_path)
    assert export_main([str(run)]) == 0  # a run directory: its newest valid checkpoint, to <run>/hf
    assert "exported " + str(run / "checkpoints" / "step_00000008") in capsys.readouterr().out
    weights = load_file(run / "hf" / "model.safetensors")
    final = ckpt.safe_torch_load(run / "checkpoints" / "step_00000008" / "state.pt")["model"]
    assert all(torch.equal(weights[k], final[k]) for k in weights)
    assert (run / "hf" / "tokenizer.json").is_file()
    assert export_main([str(run / "checkpoints" / "step_00000004"), "--dtype", "bfloat16"]) == 0
    older = load_file(run / "hf-step_00000004" / "model.safetensors")
    assert older["model.norm.weight"].dtype == torch.bfloat16
    from xmodel.model import Xmodel

    assert Xmodel.from_pretrained(run / "hf-step_00000004").num_parameters() > 0
    assert export_main([str(tmp_path / "nope")]) == 2
    assert "no such checkpoint" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ schedule on resume
def test_schedule_change_that_rewrites_the_past_is_refused(finished, tiny, tmp_path, capsys):  # noqa: F811
    run = copy_run(finished, tmp_path)
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    args = tiny_args(tiny, tmp_path, "--steps", "12", "--save-every", "2", "--keep-last", "3", "--name", "r", *COMMON)
    assert main(args) == 2  # decay 2 steps at the end: the decay would move from steps 6-7 to 10-11
    err = capsys.readouterr().err
    assert "(--steps 8 -> 12)" in err and "step 6 ran at x0.4508 of the peak lr (decay)" in err
    assert "continue at x1 instead of x0.0625" in err and "--init-from" in err and "restore --steps 8" in err
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()} == before


def test_schedule_change_that_keeps_the_past_continues_with_a_note(finished, tiny, tmp_path, capsys):  # noqa: F811
    copy_run(finished, tmp_path)
    args = tiny_args(tiny, tmp_path, "--steps", "10", "--save-every", "2", "--keep-last", "3", "--name", "r",
                     "--eval-every", "0", "--decay-start", "6", "--decay", "2")  # the same decay, by absolute steps
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "note: schedule changed on resume (--steps 8 -> 10, --decay-start None -> 6)" in out
    assert "steps before 8 are unchanged" in out
    records = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    lrs = {r["step"]: r["lr_embed"] for r in records if r["kind"] == "train"}
    assert lrs[9] == lrs[10] == pytest.approx(0.01 / 16)  # continues at the floor


# ------------------------------------------------------------------------------------------ I/O errors
def _userns(*args: str) -> list[str] | None:
    """``unshare`` prefix for a user namespace with ``args``, or None where the kernel or container forbids it."""
    cmd = ["unshare", "-U", *args]
    try:
        ok = subprocess.run([*cmd, "true"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        ok = False
    return cmd if ok else None


def test_file_size_limit_during_save_is_reported_and_leaves_nothing_partial(tiny, tmp_path):  # noqa: F811
    """RLIMIT_FSIZE: the kernel refuses the write of state.pt (EFBIG) at the real write boundary."""
    limit = 1_000_000  # a checkpoint is ~1.46 MB; the data cache and metrics stay far below

    def limited():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG from write() instead of the signal
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    args = tiny_args(tiny, tmp_path, "--steps", "4", "--save-every", "2", "--name", "f", *COMMON)
    result = subprocess.run([sys.executable, "-m", "xmodel.train", *args], env=cli_env(), capture_output=True,
                            text=True, timeout=240, preexec_fn=limited)
    assert result.returncode == 1, result.stderr
    err = result.stderr.strip()
    assert "Traceback" not in err
    assert "file too large while writing checkpoint step_00000002" in err and "file-size limit" in err
    assert "/checkpoints/.tmp-step_00000002/state.pt" in err and "about 1.5 MB needed" in err
    assert "Nothing of checkpoint step_00000002 was kept; the last complete checkpoint is none" in err
    assert sorted(p.name for p in (tmp_path / "f" / "checkpoints").iterdir()) == []
    assert main(args) == 0  # without the limit (in-process: the same command)
    assert sorted(train_losses(tmp_path / "f")) == [1, 2, 3, 4]


DISK_FULL_DRIVER = r"""
import json, subprocess, sys
from pathlib import Path
out, report, args = Path(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3])
results = []
for keep in ("3", "2"):
    r = subprocess.run([sys.executable, "-m", "xmodel.train", *args, "--keep-last", keep], capture_output=True,
                       text=True)
    results.append({"rc": r.returncode, "out": r.stdout, "err": r.stderr,
                    "files": sorted(str(p.relative_to(out)) for p in out.rglob("*"))})
report.write_text(json.dumps(results))
"""


def test_disk_full_on_a_real_tmpfs_then_the_rerun_makes_room(tiny, tmp_path):  # noqa: F811
    """A 3.6 MB tmpfs (user + mount namespace, no root needed) holds two ~1.46 MB checkpoints but not three:
    with --keep-last 3 the third save hits ENOSPC -> exit 1, a clear message, nothing partial; the rerun with
    --keep-last 2 removes the oldest checkpoint *before* saving and finishes."""
    prefix = _userns("-r", "-m")
    if prefix is None:
        pytest.skip("user and mount namespaces are not available here (unshare -U -r -m)")
    out = tmp_path / "disk"
    out.mkdir()
    args = tiny_args(tiny, out, "--steps", "8", "--save-every", "2", "--name", "d", *COMMON)
    report = tmp_path / "report.json"
    script = (f"mount -t tmpfs -o size=3600k tmpfs {out} && exec {sys.executable} -c "
              f"{_sh(DISK_FULL_DRIVER)} {out} {report} {_sh(json.dumps(args))}")
    subprocess.run([*prefix, "sh", "-c", script], env=cli_env(), timeout=400, check=True)
    first, second = json.loads(report.read_text())
    assert first["rc"] == 1, first["err"]
    err = first["err"].strip()
    assert "Traceback" not in err
    assert "disk full while writing checkpoint step_00000006: no space left for " in err
    assert "about 1.5 MB needed" in err and "free)" in err
    assert "the last complete checkpoint is " in err and "step_00000004" in err
    assert "this run's checkpoints: step_00000002 1.5 MB, step_00000004 1.5 MB" in err and "--keep-last" in err
    assert not any(".tmp-" in f for f in first["files"]), first["files"]
    assert second["rc"] == 0, second["err"]
    assert "removed step_00000002 before saving (--keep-last 2 removes it after this save anyway)" in second["out"]
    ckpts = sorted(f for f in second["files"] if f.startswith("d/checkpoints/step_") and f.count("/") == 2)
    assert ckpts == ["d/checkpoints/step_00000006", "d/checkpoints/step_00000008"]


def _sh(text: str) -> str:
    import shlex

    return shlex.quote(text)


def test_permission_denied_on_the_run_directory(tiny, tmp_path):  # noqa: F811
    """A real EACCES: as root, inside a user namespace that maps us to an unprivileged uid (so the owner's mode
    bits apply); as another user, directly."""
    parent = tmp_path / "locked"
    parent.mkdir()
    parent.chmod(0o555)
    prefix = [] if os.geteuid() != 0 else _userns("--map-user=1000", "--map-group=1000")
    if prefix is None:
        pytest.skip("running as root without user namespaces: permissions are not enforced")
    args = tiny_args(tiny, parent, "--steps", "2", "--name", "p")
    result = subprocess.run([*prefix, sys.executable, "-m", "xmodel.train", *args], env=cli_env(),
                            capture_output=True, text=True, timeout=240, cwd=REPO)
    parent.chmod(0o755)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(f"error: --out-dir: cannot write {parent / 'p'}: permission denied on its "
                                    f"parent {parent}"), result.stderr
    assert not (parent / "p").exists()


def test_explain_os_error_words():
    import errno

    def err(code):
        return OSError(code, os.strerror(code), "/x/y")

    assert ckpt.explain_os_error(err(errno.ENOSPC), "saving", needed=2_000_000).startswith(
        "disk full while saving: no space left for /x/y (about 2.0 MB needed")
    assert ckpt.explain_os_error(err(errno.EACCES), "saving") == "permission denied while saving: /x/y"
    assert "a part of /x/y is a file" in ckpt.explain_os_error(err(errno.ENOTDIR), "saving")
    assert ckpt.explain_os_error(err(errno.EROFS), "saving") == "read-only file system while saving: /x/y"


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
