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


def test_muon_switch_quick(tmp_path, cache_dir):
    from xmodel.experiments import muon_switch

    _run_quick(muon_switch, tmp_path, cache_dir)
    data = _check_outputs(tmp_path, "muon_switch", ["muon_switch.png"])
    for seed, arms in data["final_val_loss"].items():
        assert _finite(arms["adamw"]) and _finite(arms["muon"])
        assert arms["diff"] == pytest.approx(arms["muon"] - arms["adamw"])
        # The Muon arm really switched at the decay start, the AdamW arm did not.
        muon_events = [e["event"] for e in data["curves"][seed]["muon"]["events"]]
        adamw_events = [e["event"] for e in data["curves"][seed]["adamw"]["events"]]
        assert "switch_to_muon" in muon_events and "switch_to_muon" not in adamw_events
        switch_step = next(e["step"] for e in data["curves"][seed]["muon"]["events"] if e["event"] == "switch_to_muon")
        assert switch_step == data["setup"]["decay_start_step"]
        # Identical runs up to the switch: same seed, init and data.
        steps = data["setup"]["decay_start_step"]
        assert data["curves"][seed]["muon"]["train"][:steps] == data["curves"][seed]["adamw"]["train"][:steps]
    assert data["summary"]["num_seeds"] == len(data["final_val_loss"])


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
