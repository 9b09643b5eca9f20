"""bench/calibrate.py: per-layer budgets searched on a calibration split, judged on another."""

from __future__ import annotations

import json

import pytest

from bench import calibrate
from lynx_sglang import SHIPPED_MODEL
from lynx_sglang.config import parse_layer_budgets

pytestmark = pytest.mark.skipif(
    not (SHIPPED_MODEL / "model.safetensors").exists(), reason="the shipped model is not trained"
)


def test_preset_is_a_layer_budgets_flag_judged_on_a_disjoint_split(tmp_path, capsys):
    res = calibrate.main(["--models", SHIPPED_MODEL.name, "--batch", "4", "--decode", "24",
                          "--max-windows", "2", "--grid", "0.5", "--targets", "experts",
                          "--out-dir", str(tmp_path)])  # fmt: skip
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["out"] == str(tmp_path / "calibrate.json")
    m = res["models"][SHIPPED_MODEL.name]
    assert m["windows"]["calibration"] == m["windows"]["evaluation"] == 1
    t = m["targets"]["experts"]
    budgets = parse_layer_budgets(t["preset"])  # what --lynx-layer-budgets accepts
    assert set(budgets) == {0, 1, 2, 3} and set(budgets.values()) <= {0.5, 1.0}
    assert len(t["search"]["alone"]) == 4  # each layer alone at each grid budget
    assert t["search"]["verify"][-1]["verdict"] == "met" or set(budgets.values()) == {1.0}
    for label in ("calibrated", "default"):
        ev = t["rows"][label]["evaluation"]
        assert ev["verdict"] in ("met", "failed", "unresolved")
        lo, hi = ev["ci95"]["ppl_rel_increase"]
        assert lo <= ev["ppl_rel_increase"] <= hi
