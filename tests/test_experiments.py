"""The experiments' quick modes: they run, write well-formed JSON + PNG, and the coordinate check separates μP from SP.

The models run on the PyTorch reference path (the kernels have their own tests; the interpreter would make these
minutes long).
"""

from __future__ import annotations

import json
import math

import pytest

import xkernels

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _check_outputs(out_dir, name: str, pngs: list[str]) -> dict:
    path = out_dir / f"{name}.json"
    assert path.is_file(), f"{path} missing"
    data = json.loads(path.read_text())
    assert data["experiment"] == name
    assert data["environment"]["command"].startswith(f"python -m xmodel.experiments.{name}")
    assert data["quick"] is True
    for png in pngs:
        blob = (out_dir / png).read_bytes()
        assert blob[:8] == PNG_MAGIC and len(blob) > 5000, f"{png} is not a real PNG plot"
    return data


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


@pytest.fixture(scope="module")
def coord_check(tmp_path_factory):
    from xmodel.experiments import coord_check

    out = tmp_path_factory.mktemp("coord_check")
    with xkernels.force_backend("torch"):
        coord_check.main(["--quick", "--out", str(out)])
    return out


def test_coord_check_outputs(coord_check):
    data = _check_outputs(coord_check, "coord_check", ["coord_check.png"])
    widths = data["setup"]["widths"]
    steps = data["setup"]["steps"]
    assert len(widths) == 2 and widths[0] < widths[1]
    for param in ("mup", "sp"):
        for width in widths:
            series = data["rms"][param][str(width)]
            assert set(series) == {"embedding", "attention", "mlp", "logits"}
            for values in series.values():
                assert len(values) == steps + 1
                assert all(_finite(v) and v > 0 for v in values)


@pytest.mark.parametrize("layer_type", ["attention", "mlp", "logits"])
def test_coord_check_separates_mup_from_sp(coord_check, layer_type):
    """Going from the narrow to the wide model, SP's RMS grows clearly more than μP's (which stays near flat)."""
    data = json.loads((coord_check / "coord_check.json").read_text())
    growth = data["growth_last_step"]
    widths = data["setup"]["widths"]
    width_ratio = widths[1] / widths[0]
    assert growth["sp"][layer_type] > 1.5 * growth["mup"][layer_type]
    assert growth["sp"][layer_type] > math.sqrt(width_ratio) / 1.5  # SP grows at least ~like sqrt(width)
    assert 0.5 < growth["mup"][layer_type] < 1.5  # μP stays within a factor 1.5 over a 4x width change


# ----------------------------------------------------------------------------------------------------------
# Experiments that train through xmodel.train: one small default corpus + tokenizer shared by the module
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("xmodel_cache"))


def _run_quick(module, out, cache_dir):
    with xkernels.force_backend("torch"):
        return module.main(["--quick", "--out", str(out), "--cache-dir", cache_dir])


def test_lr_transfer_quick(tmp_path, cache_dir):
    from xmodel.experiments import lr_transfer

    _run_quick(lr_transfer, tmp_path, cache_dir)
    data = _check_outputs(tmp_path, "lr_transfer", ["lr_transfer.png"])
    assert data["complete"] is True
    widths, lrs = data["setup"]["widths"], data["setup"]["lrs_log2"]
    assert len(widths) >= 2 and len(lrs) >= 2
    for param in ("mup", "sp"):
        by_width = data["final_val_loss"][param]
        assert sorted(map(int, by_width)) == widths
        for width in widths:
            losses = by_width[str(width)]
            assert sorted(map(int, losses)) == lrs
            assert all(v is None or (_finite(v) and 0 < v < 20) for v in losses.values())
            best = data["summary"][param]["argmin_log2_lr"][str(width)]
            finite = {int(k): v for k, v in losses.items() if v is not None}
            assert best == min(finite, key=finite.get)
        assert data["summary"][param]["argmin_spread_grid_steps"] in range(len(lrs))


def test_lr_transfer_argmin_ignores_diverged_runs():
    from xmodel.experiments.lr_transfer import argmins, summarise

    losses = {"64": {"-8": 5.0, "-6": 4.0, "-4": None}, "128": {"-8": 4.5, "-6": 4.7, "-4": None}}
    assert argmins(losses) == {"64": -6, "128": -8}
    summary = summarise({"mup": losses})["mup"]
    assert summary["argmin_spread_grid_steps"] == 1  # -6 and -8 are neighbours on the grid -8, -6, -4
    assert summary["argmin_lr"]["128"] == 2.0**-8
    assert argmins({"64": {"-4": None}}) == {"64": None}


def _branches(data, seed):
    return next(s for s in data["seeds"] if s["seed"] == seed)["branches"]


def test_muon_switch_quick(tmp_path, cache_dir):
    from xmodel.experiments import muon_switch

    _run_quick(muon_switch, tmp_path, cache_dir)
    data = _check_outputs(tmp_path, "muon_switch", ["muon_switch.png"])
    setup = data["setup"]
    assert data["complete"] is True and [s["seed"] for s in data["seeds"]] == setup["seeds"] == [0, 1]
    assert setup["eval_sizes_rows"]["val"] == setup["eval_sizes_rows"]["heldout"] > 0
    for seed in setup["seeds"]:
        branches = _branches(data, seed)
        assert set(branches) == {f"{a}@{d}" for a in ("adamw", "muon") for d in setup["decays"]}
        for name, b in branches.items():
            assert b["phase"] == ("muon" if b["arm"] == "muon" else "adamw")  # the Muon arm really switched
            assert len(b["train"]) == b["decay"]
            assert all(_finite(b["measures"][m]) for m in ("val", "unseen", "heldout", "trained", "recent", "train_end"))
        # Every branch forks from the same snapshot: the first decay batch is seen by identical models.
        first = {b["train"][0] for b in branches.values()}
        assert len(first) == 1
    for decay in setup["decays"]:
        diff = data["summary"][str(decay)]["diff"]["val"]
        per_seed = [_branches(data, s)[f"muon@{decay}"]["measures"]["val"]
                    - _branches(data, s)[f"adamw@{decay}"]["measures"]["val"] for s in setup["seeds"]]
        assert list(diff["per_seed"].values()) == pytest.approx(per_seed)
        assert diff["mean"] == pytest.approx(sum(per_seed) / 2)
        assert diff["ci"][0] < diff["mean"] < diff["ci"][1] and diff["eval_set_se_mean"] > 0
    # --reanalyse rebuilds the same summary, table and plot from the JSON alone.
    summary = data["summary"]
    (tmp_path / "muon_switch.png").unlink()
    muon_switch.main(["--reanalyse", "--out", str(tmp_path)])
    again = json.loads((tmp_path / "muon_switch.json").read_text())
    assert again["summary"] == summary and again["training_environment"]["command"] == data["environment"]["command"]
    assert (tmp_path / "muon_switch.png").is_file() and "| 2 | val |" in (tmp_path / "muon_switch.md").read_text()
    # --merge: the same seeds split over two files (one per seed) give the same summary.
    part = tmp_path / "part"
    part.mkdir()
    one = {**again, "seeds": again["seeds"][:1]}
    other = {**again, "seeds": again["seeds"][1:]}
    (part / "muon_switch.json").write_text(json.dumps(one))
    (tmp_path / "other.json").write_text(json.dumps(other))
    merged = muon_switch.main(["--reanalyse", "--out", str(part), "--merge", str(tmp_path / "other.json")])
    assert merged["summary"] == summary and merged["setup"]["seeds"] == [0, 1]


def test_muon_ablation_quick(tmp_path, cache_dir):
    from xmodel.experiments import muon_ablation

    _run_quick(muon_ablation, tmp_path, cache_dir)
    data = _check_outputs(tmp_path, "muon_ablation", ["muon_ablation.png"])
    (decay,) = data["setup"]["decays"]
    for s in data["seeds"]:
        b = s["branches"]
        assert b[f"muon_start@{decay}"]["phase"] == "muon" and b[f"adamw@{decay}"]["phase"] == "adamw"
        lr = {k: b[f"switch_x{k}@{decay}"]["muon_lr"] for k in ("0.5", "1", "2")}
        assert all(len(v) == 1 for v in lr.values())
        assert lr["0.5"][0] == pytest.approx(lr["1"][0] / 2) and lr["2"][0] == pytest.approx(2 * lr["1"][0])
        # The switch arms share the AdamW trunk; Muon-from-start trains its own.
        forked = {b[f"{a}@{decay}"]["train"][0] for a in ("adamw", "switch_x0.5", "switch_x1", "switch_x2")}
        assert len(forked) == 1 and b[f"muon_start@{decay}"]["train"][0] not in forked
    assert set(data["summary"]["diff_vs_adamw"]) == {"switch_x0.5", "switch_x1", "switch_x2", "muon_start"}


def test_paired_summary():
    from xmodel.experiments.common import paired_summary, seeds_needed, t_quantile

    s = paired_summary([-0.016, 0.001, -0.022])
    assert s["mean"] == pytest.approx(-0.012333, abs=1e-6)
    assert s["se"] == pytest.approx(0.0119304 / math.sqrt(3), rel=1e-4)
    assert s["ci"] == pytest.approx([s["mean"] - 4.302653 * s["se"], s["mean"] + 4.302653 * s["se"]], rel=1e-5)
    assert s["negative"] == 2 and s["se_ok"] is False
    assert s["mde"] == pytest.approx((4.302653 + 1.060660) * s["se"], rel=1e-4)
    assert paired_summary([0.5])["ci"] is None
    assert seeds_needed(0.012, 0.012) == 9
    assert t_quantile(0.975, 10) == pytest.approx(2.228139, rel=1e-5)
    # no scipy needed: tabulated values (df = 1, 2, 5, 30) and the symmetry
    for df, q in ((1, 12.706205), (2, 4.302653), (5, 2.570582), (30, 2.042272)):
        assert t_quantile(0.975, df) == pytest.approx(q, rel=1e-6)
        assert t_quantile(0.025, df) == pytest.approx(-q, rel=1e-6)
    assert t_quantile(0.8, 2) == pytest.approx(1.060660, rel=1e-5)


def test_heldout_windows_are_never_trained_on(tmp_path, cache_dir):
    """The in-distribution evaluation set: windows of the training source that the sampler's stream does not
    reach within the samples the longest branch uses."""
    import numpy as np

    from xmodel.training.data import MixtureSampler, TokenSource

    tokens = np.arange(5000, dtype=np.int64) % 997
    src = TokenSource("a", [tokens], seq_len=16)
    sampler = MixtureSampler([src], seed=3)
    from xmodel.experiments.forking import heldout_windows

    used = 200
    held = heldout_windows(sampler, 40, used)
    trained = sampler.next_batch(used)
    seen = {tuple(r) for r in trained.tolist()}
    assert held.shape == (40, 17) and not seen & {tuple(r) for r in held.tolist()}
    with pytest.raises(ValueError, match="held out"):
        heldout_windows(sampler, 200, src.num_windows - 100)


def test_fp8_parity_quick(tmp_path, cache_dir):
    from xmodel.experiments import fp8_parity

    _run_quick(fp8_parity, tmp_path, cache_dir)
    data = _check_outputs(tmp_path, "fp8_parity", ["fp8_parity.png"])
    assert data["setup"]["fp8_emulated"] == (not fp8_parity.fp8_hardware())
    if data["setup"]["fp8_emulated"]:
        assert "emulated FP8 (CPU)" in data["setup"]["arms"]["fp8_delayed"]
    for arms in data["final_val_loss"].values():
        assert _finite(arms["base"]) and _finite(arms["fp8_delayed"])
        assert arms["base"] != arms["fp8_delayed"]  # the FP8 arm really quantised
    rel = data["summary"]["fp8_delayed"]["mean_relative_diff"]
    arms = data["final_val_loss"]["0"]
    assert rel == pytest.approx((arms["fp8_delayed"] - arms["base"]) / arms["base"])


def test_muon_decay_window_diffs():
    from xmodel.experiments.muon_switch import decay_window_diffs

    adamw = [[s, 5.0] for s in range(1, 11)]
    muon = [[s, 5.0 if s <= 4 else 5.0 - 0.1 * (s - 4)] for s in range(1, 11)]
    # decay steps 4..9 are records 5..10, in thirds: (5, 6), (7, 8), (9, 10)
    assert decay_window_diffs(adamw, muon, 4, 10) == pytest.approx([-0.15, -0.35, -0.55])


def test_eval_sets_stored_and_rebuilt_on_other_key(tmp_path):
    import torch

    from xmodel.experiments.forking import load_or_make_eval_sets

    calls = []

    def make():
        calls.append(1)
        return {"val": torch.arange(6).reshape(2, 3)}

    path = tmp_path / "seed0.pt"
    first = load_or_make_eval_sets(path, {"seq": 2}, make)
    again = load_or_make_eval_sets(path, {"seq": 2}, make)  # read back with weights_only=True
    assert len(calls) == 1 and torch.equal(first["val"], again["val"])
    load_or_make_eval_sets(path, {"seq": 3}, make)
    assert len(calls) == 2
