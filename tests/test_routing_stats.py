"""bench/routing_stats.py: distinct experts, popularity skew and reuse of the shipped model's routing."""

from __future__ import annotations

import json

import pytest
import torch

from bench import routing_stats
from lynx_sglang import SHIPPED_MODEL

pytestmark = pytest.mark.skipif(
    not (SHIPPED_MODEL / "model.safetensors").exists(), reason="the shipped model is not trained"
)


def test_counts_on_hand_made_routing():
    # one window, one layer, 2 sequences, 3 steps, top-2 of E=4: [W, L, B, D, k]
    r = torch.tensor([[[[[0, 1], [0, 1], [2, 3]], [[0, 2], [1, 2], [1, 2]]]]])
    assert routing_stats.distinct_per_step(r, 4) == pytest.approx((3 + 3 + 3) / 3)
    # reuse per sequence: (1, 0) and (0.5, 1) -> mean 0.625
    assert routing_stats.reuse(r, 4) == [0.625]
    (s,) = routing_stats.skew(r, 4)  # loads: e0 3, e1 4, e2 4, e3 1 -> the top expert has 4 of 12
    assert s["top10pct_share"] == pytest.approx(4 / 12, abs=1e-4)
    # from the loads alone (6 tokens): p = (3, 4, 4, 1) / 6; at B=2: sum 1 - (1 - p)^2
    p = torch.tensor([3, 4, 4, 1], dtype=torch.float64) / 6
    assert routing_stats.from_loads(r, 4, 2) == pytest.approx(float((1 - (1 - p) ** 2).sum()))
    assert routing_stats.from_loads(r, 4, 1) == pytest.approx(2.0)  # one token: its k experts


def test_shipped_model_stats(tmp_path, capsys):
    res = routing_stats.main(["--models", SHIPPED_MODEL.name, "--batches", "1,4", "--windows",
                              "1", "--decode", "16", "--out-dir", str(tmp_path)])  # fmt: skip
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(json.dumps(last)) <= 2048 and last["out"] == str(tmp_path / "routing_stats.json")
    m = res["models"][SHIPPED_MODEL.name]
    k = m["top_k"]
    assert m["distinct"]["1"] == k  # one token: its k distinct experts
    assert k < m["distinct"]["4"] <= 4 * k
    assert all(0 <= x <= 1 for x in m["reuse"])
    assert all(s["top10pct_share"] >= 0.1 for s in m["skew"])
    assert m["from_loads"]["1"] == pytest.approx(k)
    assert m["from_loads"]["4"] <= m["uniform"]["4"] + 1e-6  # uneven loads: fewer than uniform
