"""Counters out of the server: a periodic log line and, when SGLang's ``--enable-metrics`` is on,
Prometheus series next to SGLang's own.

SGLang runs prometheus_client in multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``): a metric made
in the scheduler process is written to that directory and served by the HTTP server's
``/metrics``, so extending it needs no hook. Counters are read from the device only when a report
is due (between forwards), never inside a step.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Optional

from lynx_sglang.config import LynxConfig

logger = logging.getLogger("lynx_sglang")

# Seconds between Prometheus updates when metrics are on but the log line is off.
METRICS_INTERVAL = 10.0
_GIB = float(1 << 30)


class Reporter:
    """Reads the runtime's counters every ``interval`` seconds: logs them and exports them."""

    def __init__(self, log_interval: float, prometheus: bool, labels: Optional[dict] = None):
        self.log = log_interval > 0
        self.interval = log_interval if self.log else (METRICS_INTERVAL if prometheus else 0.0)
        self.series = _Series(labels or {}) if prometheus else None
        self.runtime: Any = None
        self.next_due = time.monotonic() + self.interval
        self.last = time.monotonic()

    @classmethod
    def from_server(cls, cfg: LynxConfig) -> Reporter:
        """From the plugin config and SGLang's server config (metrics on or off)."""
        from sglang.srt.runtime_context import get_parallel, get_server_args

        prometheus = bool(
            getattr(get_server_args(), "enable_metrics", False)
            and os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        )
        return cls(cfg.log_interval, prometheus, {"tp_rank": str(get_parallel().tp_rank)})

    @property
    def enabled(self) -> bool:
        return self.interval > 0

    def attach(self, runtime: Any) -> None:
        self.runtime = runtime

    def tick(self) -> None:
        """Called after every forward; reports when due (a clock read otherwise)."""
        if not self.enabled:
            return
        now = time.monotonic()
        if now >= self.next_due:
            self.next_due = now + self.interval
            self.report(now)

    def report(self, now: Optional[float] = None) -> dict:
        """Read (and reset) the counters, log and export them; returns what was read."""
        now = time.monotonic() if now is None else now
        counters = self.runtime.read_counters(reset=True)
        elapsed, self.last = max(now - self.last, 1e-9), now
        if self.log:
            logger.info(format_line(counters, elapsed))
        if self.series is not None:
            self.series.update(counters)
        cache = counters.get("cache")
        if cache and cache.get("overflow"):
            logger.error(
                "lynx-sglang: %d layer step(s) needed more experts than free slots (outputs "
                "NaN-poisoned); raise --lynx-slots or cap the decode batch",
                cache["overflow"],
            )
        return counters


def format_line(counters: dict, elapsed: float) -> str:
    """One log line: selection's distinct experts and the cache's hits and traffic."""
    parts = []
    sel = counters.get("selection")
    if sel is not None:
        parts.append(
            f"decode layer-steps {sel['steps']}, distinct experts/step "
            f"{sel['distinct_before']:.1f} -> {sel['distinct_after']:.1f}"
        )
    cache = counters.get("cache")
    if cache is not None:
        gib = cache["bytes_h2d"] / _GIB
        parts.append(
            f"cache hit rate {cache['hit_rate']:.1%} ({cache['hits']} hits, "
            f"{cache['misses']} misses), distinct/step {cache['distinct_per_step']:.1f}, "
            f"H2D {gib:.2f} GiB ({gib / elapsed:.2f} GiB/s), prefetch "
            f"{cache['prefetch_hits']} used / {cache['prefetch_wasted']} wasted"
        )
    return "lynx-sglang: " + (" | ".join(parts) or "no counters")


class _Series:
    """The Prometheus metrics (``lynx:*``), labelled like SGLang's by TP rank."""

    def __init__(self, labels: dict) -> None:
        from prometheus_client import Counter, Gauge

        self.labels = labels
        names = list(labels)

        def gauge(name: str, doc: str) -> Any:
            return Gauge(name, doc, labelnames=names, multiprocess_mode="mostrecent", registry=None)

        def counter(name: str, doc: str) -> Any:
            return Counter(name, doc, labelnames=names, registry=None)

        self.distinct_before = gauge(
            "lynx:distinct_experts_before",
            "Distinct experts per MoE layer and decode step, before selection.",
        )
        self.distinct_after = gauge(
            "lynx:distinct_experts_after",
            "Distinct experts per MoE layer and decode step, after selection.",
        )
        self.hit_rate = gauge(
            "lynx:cache_hit_rate", "Expert cache hit rate over the last interval."
        )
        self.hits = counter("lynx:cache_hits", "Needed experts found in a GPU slot.")
        self.misses = counter("lynx:cache_misses", "Needed experts copied in on demand.")
        self.bytes = counter(
            "lynx:cache_h2d_bytes", "Host-to-device expert bytes (demand + prefetch)."
        )

    def update(self, counters: dict) -> None:
        sel, cache = counters.get("selection"), counters.get("cache")
        if sel is not None and sel["steps"]:
            self.distinct_before.labels(**self.labels).set(sel["distinct_before"])
            self.distinct_after.labels(**self.labels).set(sel["distinct_after"])
        if cache is not None:
            if cache["hits"] + cache["misses"]:
                self.hit_rate.labels(**self.labels).set(cache["hit_rate"])
            self.hits.labels(**self.labels).inc(cache["hits"])
            self.misses.labels(**self.labels).inc(cache["misses"])
            self.bytes.labels(**self.labels).inc(cache["bytes_h2d"])
