"""bench/host_overhead.py runs and reports every config (no timing assertions: performance is
shown by the benchmark's output, not by tests)."""

from __future__ import annotations

import json

import pytest
import torch

from bench import host_overhead


@pytest.fixture(autouse=True)
def restore_threads():
    n = torch.get_num_threads()  # the benchmark sets one thread
    yield
    torch.set_num_threads(n)


def test_quick_run_reports_every_config(tmp_path, capsys):
    out = tmp_path / "h.json"
    result = host_overhead.main(["--quick", "--out", str(out), "--device", "cpu"])
    lines = capsys.readouterr().out.splitlines()

    summary = json.loads(lines[-1])  # the compact summary is the very last line
    assert len(lines[-1].encode()) <= 2048
    assert summary["bench"] == "host_overhead" and summary["quick"] is True
    assert summary["out"] == str(out)
    saved = json.loads(out.read_text())
    assert saved["configs"] == json.loads(json.dumps(result["configs"]))

    expected = {(T, E, K) for T in (1, 16) for E in (64, 128) for K in (E // 4, E // 2)}
    assert {(r["T"], r["E"], r["K"]) for r in saved["configs"]} == expected
    for row in saved["configs"]:
        for metric in host_overhead.METRICS:
            assert row[metric]["median_us"] > 0 and row[metric]["mean_us"] > 0
        assert 1.0 <= row["eager_waves_per_step"] and 0.0 <= row["eager_hit_rate"] <= 1.0
    assert [tuple(r[:3]) for r in summary["rows"]] == [
        (r["T"], r["E"], r["K"]) for r in saved["configs"]
    ]
    assert all(v > 0 for r in summary["rows"] for v in r[3:])

    table = lines[:-1]
    assert table == saved["table"]
    assert all(len(line) <= 100 for line in table), max(table, key=len)
    # two tables (the executors; eager prepare by eviction policy): header + one row each
    assert sum("|" in line for line in table) == 2 * (len(expected) + 1)
    target = [line for line in table if line.startswith("eager prepare target <= 150 µs")]
    assert len(target) == 1 and ("not met" in target[0]) != summary["target_met"]
    assert any("need a GPU" in line for line in table)  # --device cpu: no GPU rows
