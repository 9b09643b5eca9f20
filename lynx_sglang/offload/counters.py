"""Per-layer cache counters, kept on the host (eager) and on the device (graph-safe), summed on read."""

from __future__ import annotations

import numpy as np
import torch

# Column order of the [L, C] counter arrays.
FIELDS = (
    "hits",  # needed experts found resident (a prefetched one counts here too)
    "misses",  # needed experts copied in on demand
    "prefetch_hits",  # prefetched experts that the next step of their layer needed
    "prefetch_wasted",  # prefetched experts evicted or not needed by the next step
    "prefetch_fills",  # experts copied by prefetch
    "bytes_h2d",  # host->device bytes, demand and prefetch
    "distinct",  # sum over steps of the distinct experts a step needed
    "steps",  # prepared steps of this layer
    "waves",  # waves run (== steps unless a step needed more experts than slots)
    "overflow",  # graph-safe steps whose misses did not fit the free slots (outputs poisoned)
)
COL = {name: i for i, name in enumerate(FIELDS)}


class Counters:
    """Host counters [L, C] int64 plus an optional device twin written by the graph executor."""

    def __init__(self, num_layers: int) -> None:
        self.num_layers = num_layers
        self.host = np.zeros((num_layers, len(FIELDS)), dtype=np.int64)
        self.device: torch.Tensor | None = None  # [L + 1, C] int64 (row L: scratch), graph executor

    def add(self, layer: int, **values: int) -> None:
        """Host-side increment, e.g. ``add(3, hits=2, misses=1)``."""
        row = self.host[layer]
        for name, v in values.items():
            row[COL[name]] += v

    def add_each(self, name: str, layers: np.ndarray) -> None:
        """Host-side +1 to ``name`` of each entry of ``layers`` (repeats add up)."""
        np.add.at(self.host[:, COL[name]], layers, 1)

    def device_table(self, device: torch.device) -> torch.Tensor:
        """The device twin [L + 1, C], created on first use; row L absorbs masked-out increments."""
        if self.device is None:
            self.device = torch.zeros(
                self.num_layers + 1, len(FIELDS), dtype=torch.int64, device=device
            )
        return self.device

    def read(self, reset: bool = True) -> dict:
        """{"layers": {layer: {...}}, "total": {...}} with hit_rate and distinct_per_step."""
        table = self.host.copy()
        if self.device is not None:
            table += self.device[: self.num_layers].cpu().numpy()  # one read, outside any step
        if reset:
            self.host[:] = 0
            if self.device is not None:
                self.device.zero_()
        layers = {layer: _row_dict(table[layer]) for layer in range(self.num_layers)}
        return {"layers": layers, "total": _row_dict(table.sum(axis=0))}


def _row_dict(row: np.ndarray) -> dict:
    d = {name: int(row[i]) for i, name in enumerate(FIELDS)}
    demand = d["hits"] + d["misses"]
    d["hit_rate"] = d["hits"] / demand if demand else 0.0
    d["distinct_per_step"] = d["distinct"] / d["steps"] if d["steps"] else 0.0
    return d
