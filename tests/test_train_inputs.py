"""Every option is checked at startup, before the run directory is touched: each case below (the rows of issue 13's
table) fails with exit status 2, one ``error:`` paragraph naming the flag and the value, no traceback, and nothing
written.  Numbers are accepted in every spelling (YAML 1.1 reads ``3e-4`` as a string)."""

import json
import sys

import pytest
import torch
from train_support import _fast_cpu, run_cli, tiny, tiny_args  # noqa: F401  (fixtures)

from xmodel.train import main
from xmodel.training.config import ConfigError, TrainConfig, parse_args


# ------------------------------------------------------------------------------------------ numbers, any spelling
@pytest.mark.parametrize("argv, key, value", [
    (["--lr", "3e-4"], "lr", 3e-4),
    (["--eps", "1E-8"], "eps", 1e-8),
    (["--lr-embed", ".5"], "lr_embed", 0.5),
    (["--lr-embed=2.5e-3"], "lr_embed", 2.5e-3),
    (["--weight-decay", "0"], "weight_decay", 0.0),
    (["--steps", "1e3"], "steps", 1000),  # an integral float spelling is an int
    (["--warmup", "100"], "warmup", 100),  # steps
    (["--warmup", "0.05"], "warmup", 0.05),  # a fraction
    (["--muon-momentum", "0.9"], "muon_momentum", 0.9),
    (["--compile", "yes"], "compile", True),
    (["--name", "007"], "name", "007"),  # text stays as typed (YAML would read 7)
    (["--fp8", "null"], "fp8", None),
    (["--inject-nonfinite-at", "[1, 6]"], "inject_nonfinite_at", [1, 6]),
])
def test_numbers_and_values_in_every_spelling(argv, key, value):
    cfg = parse_args(argv)
    assert getattr(cfg, key) == value and type(getattr(cfg, key)) is type(value)


def test_yaml_exponent_floats_are_numbers(tmp_path):
    (tmp_path / "c.yaml").write_text("lr: 3e-4\neps: 1E-8\nlr_embed: .5\nmodel:\n  rms_norm_eps: 1e-6\n")
    cfg = parse_args(["--config", str(tmp_path / "c.yaml")])
    assert (cfg.lr, cfg.eps, cfg.lr_embed, cfg.model["rms_norm_eps"]) == (3e-4, 1e-8, 0.5, 1e-6)
    assert isinstance(cfg.lr, float) and isinstance(cfg.model["rms_norm_eps"], float)
    assert cfg.model_config().rms_norm_eps == 1e-6
    # the shipped long-context config spells its lrs this way
    cfg = parse_args(["--config", "paper-long-context"])
    assert (cfg.lr, cfg.lr_embed) == (1.04e-4, 6.25e-4)


def test_code_gets_the_same_checks():
    assert TrainConfig(lr="3e-4").lr == 3e-4
    with pytest.raises(ConfigError, match=r"--muon-momentum: must be in \[0, 1\), got 1.0"):
        TrainConfig(muon_momentum=1.0)


def test_a_bad_value_from_a_config_file_names_the_file(tmp_path):
    (tmp_path / "c.yaml").write_text("log_every: 0\n")
    with pytest.raises(ConfigError, match=r"--log-every: must be an integer >= 1, got 0.*\(set in .*c\.yaml\)"):
        parse_args(["--config", str(tmp_path / "c.yaml")])


# ------------------------------------------------------------------------------------------ bad input: exit 2
BAD = {  # argv -> what the one-paragraph error must say (flag, value, the range or what to do)
    "lr nan": (["--lr-embed", "nan"], ["--lr-embed", "finite", "'nan'"]),
    "lr inf": (["--lr", "inf"], ["--lr:", "finite", "'inf'"]),
    "eps 0": (["--eps", "0"], ["--eps", "> 0", "got 0"]),
    "warmup abc": (["--warmup", "abc"], ["--warmup", "'abc'", "number of steps", "fraction"]),
    "warmup 100.0": (["--warmup", "100.0"], ["--warmup", "[0, 1]", "write an integer"]),
    "lr-embed abc": (["--lr-embed", "abc"], ["--lr-embed", "'abc'", "3e-4"]),
    "log-every 0": (["--log-every", "0"], ["--log-every", ">= 1", "got 0"]),
    "steps 2.5": (["--steps", "2.5"], ["--steps", "integer", "2.5"]),
    "muon-momentum 1.0": (["--muon-momentum", "1.0"], ["--muon-momentum", "[0, 1)", "1.0", "0.95"]),
    "muon-ns-steps 0": (["--muon-ns-steps", "0"], ["--muon-ns-steps", "[1, 100]", "got 0"]),
    "muon-adjust-lr": (["--muon-adjust-lr", "fast"], ["--muon-adjust-lr", "match_rms_adamw", "'fast'"]),
    "beta2 1": (["--beta2", "1"], ["--beta2", "[0, 1)", "got 1"]),
    "min-lr-ratio 0": (["--min-lr-ratio", "0"], ["--min-lr-ratio", "(0, 1]", "got 0"]),
    "grad-clip -1": (["--grad-clip", "-1"], ["--grad-clip", ">= 0", "-1"]),
    "fp8 recipe": (["--fp8", "e4m3"], ["--fp8", "delayed", "'e4m3'"]),
    "precision": (["--precision", "half"], ["--precision", "bf16", "'half'"]),
    "bool": (["--compile", "maybe"], ["--compile", "true or false", "'maybe'"]),
    "model field value": (["--model.rms_norm_eps", "abc"], ["--model.rms_norm_eps", "'abc'", "number"]),
    "model field range": (["--model.hidden_size", "0"], ["--model.hidden_size", "positive", "0"]),
    "model field name": (["--model.hiden_size", "64"], ["--model.hiden_size", "did you mean hidden_size"]),
    "device gpu": (["--device", "gpu"], ["--device", "'gpu'", "cpu", "cuda:N"]),
    "seq-len vs positions": (["--seq-len", "4096"], ["--seq-len", "4096", "max_position_embeddings"]),
    "unknown key": (["--learning-rate", "1"], ["unknown config key 'learning_rate'", "--help"]),
}


@pytest.mark.parametrize("label", list(BAD))
def test_bad_option_exits_2_with_one_paragraph_naming_the_flag(label, tmp_path, capsys):
    argv, needles = BAD[label]
    assert main([*argv, "--out-dir", str(tmp_path / "runs")]) == 2
    captured = capsys.readouterr()
    err = captured.err
    assert err.startswith("error: ") and err.count("error: ") == 1, err
    assert "Traceback" not in err and "\n\n" not in err.strip(), err
    for needle in needles:
        assert needle in err, (label, needle, err)
    assert not (tmp_path / "runs").exists()


def test_model_field_error_does_not_list_every_field(capsys):
    assert main(["--model.rms_norm_eps", "abc"]) == 2
    err = capsys.readouterr().err
    assert "vocab_size" not in err and "num_key_value_heads" not in err  # not "unknown field" with the whole list


def test_muon_settings_checked_at_startup_by_muon_itself(tiny, tmp_path, capsys, monkeypatch):  # noqa: F811
    """A setting the config accepts but Muon rejects must still fail at startup, not at the decay start: make the
    config-level check pass and let the startup dry-run of Muon catch it."""
    import xkernels.optim.muon as muon

    real = muon.Muon._check_muon_group

    def stricter(self, group):
        if group["momentum"] > 0.5:
            raise ValueError(f"momentum must be <= 0.5 here, got {group['momentum']}")
        real(self, group)

    monkeypatch.setattr(muon.Muon, "_check_muon_group", stricter)
    out = tmp_path / "runs"
    assert main(tiny_args(tiny, out, "--steps", "4", "--muon-momentum", "0.9")) == 2
    err = capsys.readouterr().err
    assert "--muon-momentum" in err and "0.9" in err and "decay start (step 3)" in err
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="expects a machine without CUDA")
def test_device_cuda_without_cuda(tmp_path, capsys):
    assert main(["--device", "cuda", "--out-dir", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --device cuda: CUDA is not available") and "--device cpu" in err
    assert not (tmp_path / "runs").exists()


def test_device_gpu_via_cli_has_no_traceback(tiny, tmp_path):  # noqa: F811
    result = run_cli(tiny_args(tiny, tmp_path / "runs", "--device", "gpu"))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "--device: 'gpu'" in result.stderr


# ------------------------------------------------------------------------------------------ directories
def test_run_or_cache_directory_under_a_file(tiny, tmp_path, capsys):  # noqa: F811
    (tmp_path / "file").write_text("not a directory")
    for flag in ("--out-dir", "--cache-dir"):
        args = tiny_args(tiny, tmp_path / "runs", "--steps", "2")
        i = args.index(flag)
        args[i + 1] = str(tmp_path / "file" / "sub")
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {flag}: cannot use {tmp_path / 'file' / 'sub'}") and "is a file" in err, err
        assert "Traceback" not in err
    assert not (tmp_path / "runs").exists()


def test_exit_status_documented_in_help(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "exit status:" in out and "  2  bad input" in out and "  1  the run failed" in out
    assert "newest *valid* checkpoint" in out


# ------------------------------------------------------------------------------------------ exit 1 mid-run
def test_value_error_during_training_is_a_run_failure_not_bad_input(tiny, tmp_path, capsys, monkeypatch):  # noqa: F811
    """A ValueError raised while training (here: the data sampler on step 3) is exit 1 with the step and the last
    checkpoint, and keeps its traceback -- not exit 2 "bad input"."""
    from xmodel.training.data import MixtureSampler

    real = MixtureSampler.next_batch

    def failing(self, *a, **k):
        if self.sample >= 2 * 4:  # the third step's batch
            raise ValueError("a data file changed under the run")
        return real(self, *a, **k)

    monkeypatch.setattr(MixtureSampler, "next_batch", failing)
    args = tiny_args(tiny, tmp_path, "--steps", "6", "--save-every", "1", "--eval-every", "0", "--name", "v")
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "ValueError: a data file changed under the run" in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: the run failed: ValueError after step 2: a data file changed under the run")
    assert "step_00000002" in last and "run the same command again to resume" in last
    summary = tmp_path / "v" / "summary.json"
    assert not summary.exists()
    records = [json.loads(line) for line in (tmp_path / "v" / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in records if r["kind"] == "train") == 2


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
