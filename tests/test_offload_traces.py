"""The cache on routing traces: a recorded trace when one exists, else skewed synthetic routing."""

from __future__ import annotations

import glob
import json

import pytest
import torch
from offload_helpers import one_thread  # noqa: F401 (autouse fixture)

from bench.cache_trace import load_trace, main, run_trace, synthetic_trace


@pytest.fixture(scope="module")
def trace() -> tuple[torch.Tensor, int]:
    """topk_ids [S, L, B, k] and E: the first recorded trace (cut short), else synthetic."""
    found = sorted(glob.glob("bench/results/traces/*.pt"))
    if found:
        data = load_trace(found[0])
        return data["topk_ids"][:24, :3], data["num_experts"]
    return synthetic_trace(steps=24, layers=3, batch=8, k=4, num_experts=32), 32


def test_synthetic_routing_is_skewed_and_valid():
    ids = synthetic_trace(steps=16, layers=2, batch=16, k=8, num_experts=128)
    assert ids.shape == (16, 2, 16, 8) and ids.dtype == torch.int32
    assert all(len(torch.unique(ids[s, 0, b])) == 8 for s in range(16) for b in range(16))
    distinct = sum(len(torch.unique(ids[s, layer])) for s in range(16) for layer in range(2)) / 32
    assert 35 < distinct < 65  # calibrated near the published ~49 of 128 at batch 16, top-8


def test_all_slots_only_miss_each_expert_once(trace):
    ids, E = trace
    c = run_trace(ids, E, slots=E)
    first_touch = sum(len(torch.unique(ids[:, layer])) for layer in range(ids.shape[1]))
    assert c["misses"] == first_touch
    assert c["hits"] + c["misses"] == c["distinct"]


@pytest.mark.parametrize("eviction", ["lru", "lfu", "score"])
@pytest.mark.parametrize("prefetch", ["off", "temporal", "oracle"])
def test_counters_add_up_on_the_trace(trace, eviction, prefetch):
    ids, E = trace
    c = run_trace(ids, E, slots=E // 2, eviction=eviction, prefetch=prefetch, slot_pool="shared")
    S, L = ids.shape[:2]
    assert c["steps"] == S * L
    assert c["hits"] + c["misses"] == c["distinct"]
    assert c["experts_moved"] == c["misses"] + c["prefetch_fills"]
    assert c["prefetch_hits"] + c["prefetch_wasted"] <= c["prefetch_fills"]
    assert 0.0 < c["hit_rate"] < 1.0


def test_oracle_prefetch_turns_misses_into_hits(trace):
    ids, E = trace
    base = run_trace(ids, E, slots=E // 2)
    oracle = run_trace(ids, E, slots=E // 2, prefetch="oracle")
    assert oracle["hit_rate"] > base["hit_rate"] and oracle["prefetch_hits"] > 0


def test_bench_reads_a_trace_file(tmp_path, capsys):
    ids = synthetic_trace(steps=6, layers=2, batch=4, k=2, num_experts=8)
    path = tmp_path / "trace.pt"
    torch.save({"topk_ids": ids, "num_experts": 8, "expert_bytes": 1000}, path)
    result = main(["--trace", str(path), "--fractions", "0.5"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last) == json.loads(json.dumps(result))
    assert result["synthetic"] is False and result["expert_bytes"] == 1000
    assert {r["eviction"] for r in result["rows"]} == {"lru", "lfu", "score"}
    row = result["rows"][0]
    assert row["mb_per_token"] == pytest.approx(row["experts_moved"] * 1000 / 24 / 1e6, abs=1e-3)
