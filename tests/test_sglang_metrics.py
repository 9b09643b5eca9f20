"""Counters out of the server: the periodic log line, and Prometheus series served the way
SGLang serves its own (prometheus_client multiprocess mode)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap

from lynx_sglang.sglang.metrics import Reporter, format_line

COUNTERS = {
    "selection": {"steps": 40, "distinct_before": 30.5, "distinct_after": 14.25},
    "cache": {
        "hits": 90, "misses": 10, "hit_rate": 0.9, "bytes_h2d": 3 << 30, "distinct_per_step": 12.0,
        "prefetch_hits": 5, "prefetch_wasted": 1, "overflow": 0,
    },
}  # fmt: skip


class CountingRuntime:
    """Stands in for LynxRuntime.read_counters (our own class, not SGLang's)."""

    def __init__(self) -> None:
        self.reads = 0

    def read_counters(self, reset: bool = True) -> dict:
        self.reads += 1
        return COUNTERS


def test_log_line():
    line = format_line(COUNTERS, elapsed=2.0)
    assert line.startswith("lynx-sglang: decode layer-steps 40, distinct experts/step 30.5 -> 14.2")
    assert "cache hit rate 90.0% (90 hits, 10 misses)" in line
    assert "H2D 3.00 GiB (1.50 GiB/s)" in line
    assert "\n" not in line


def test_reporter_logs_when_due(caplog):
    runtime = CountingRuntime()
    reporter = Reporter(log_interval=3600.0, prometheus=False)
    reporter.attach(runtime)
    reporter.tick()  # not due yet: no device read
    assert runtime.reads == 0
    reporter.next_due = 0.0
    with caplog.at_level(logging.INFO, logger="lynx_sglang"):
        reporter.tick()
    assert runtime.reads == 1
    assert any("cache hit rate 90.0%" in r.getMessage() for r in caplog.records)


def test_reporter_off_by_default():
    reporter = Reporter(log_interval=0.0, prometheus=False)
    reporter.attach(CountingRuntime())
    assert not reporter.enabled
    reporter.tick()
    assert reporter.runtime.reads == 0


def test_prometheus_series_in_multiprocess_mode(tmp_path):
    script = textwrap.dedent(
        f"""
        from prometheus_client import CollectorRegistry, generate_latest, multiprocess
        from tests.test_sglang_metrics import CountingRuntime
        from lynx_sglang.sglang.metrics import Reporter

        reporter = Reporter(log_interval=0.0, prometheus=True, labels={{"tp_rank": "0"}})
        reporter.attach(CountingRuntime())
        reporter.report()
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path={str(tmp_path)!r})
        print(generate_latest(registry).decode())
        """
    )
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    assert 'lynx:cache_hits_total{tp_rank="0"} 90.0' in out
    assert 'lynx:cache_h2d_bytes_total{tp_rank="0"} 3.221225472e+09' in out
    assert 'lynx:distinct_experts_after{tp_rank="0"} 14.25' in out
    assert 'lynx:cache_hit_rate{tp_rank="0"} 0.9' in out
