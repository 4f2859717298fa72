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
