"""GPU expert slots and the slot tables (device copy for kernels and graphs, host mirror for planning).

Pools: with ``slot_pool="layer"`` every layer owns a pool of K slots (P = L pools); with
``"shared"`` all layers draw from one pool (P = 1). Slot ids are indices inside a pool.
"""

from __future__ import annotations

import numpy as np
import torch

from .store import HostExpertStore


class SlotStorage:
    """Slot tensors [P, K, *shape] per named tensor, and who sits in which slot."""

    def __init__(
        self,
        store: HostExpertStore,
        num_pools: int,
        pool_size: int,
        layer_pool: list[int],
        device: torch.device,
    ) -> None:
        L, E = store.num_layers, store.num_experts
        self.num_pools, self.pool_size = num_pools, pool_size
        self.num_layers, self.num_experts = L, E
        self.layer_pool = layer_pool  # [L] pool of each layer
        self.device = device
        self.names = list(store.names)
        # Slots start zeroed so that a masked choice pointing at a never-filled slot stays finite.
        self.tensors = {
            s.name: torch.zeros((num_pools, pool_size, *s.shape), dtype=s.dtype, device=device)
            for s in store.segments
        }  # name -> [P, K, *shape]
        # Host mirror (eager planning). slot_layer/slot_expert: [P, K], -1 = empty.
        self.slot_layer = np.full((num_pools, pool_size), -1, dtype=np.int64)
        self.slot_expert = np.full((num_pools, pool_size), -1, dtype=np.int64)
        self.last_use = np.zeros((num_pools, pool_size), dtype=np.int64)
        self.prefetched = np.zeros(
            (num_pools, pool_size), dtype=bool
        )  # filled by prefetch, unused yet
        # table: [L, E + 1] int32 expert -> slot in its layer's pool; column E is padding (-1).
        self.table = np.full((L, E + 1), -1, dtype=np.int32)
        self.table_dev = torch.full((L, E + 1), -1, dtype=torch.int32, device=device)
        self._views: dict[tuple[int, int], list[torch.Tensor]] = {}

    def weights(self, pool: int) -> dict[str, torch.Tensor]:
        """The pool's slot tensors: {"w13": [K, 2I, H], "w2": [K, H, I], ...} (contiguous)."""
        return {name: t[pool] for name, t in self.tensors.items()}

    def slot_views(self, pool: int, slot: int) -> list[torch.Tensor]:
        """One slot's tensors, in store order (the destination of a fill); views are cached."""
        views = self._views.get((pool, slot))
        if views is None:
            views = self._views[(pool, slot)] = [t[pool, slot] for t in self.tensors.values()]
        return views

    def global_slot(self, pool: int, slot: int) -> int:
        """Index over all pools (for per-slot events)."""
        return pool * self.pool_size + slot

    def place(self, layer: int, expert: int, pool: int, slot: int) -> tuple[int, int]:
        """Record ``expert`` of ``layer`` in ``slot``; returns the evicted (layer, expert) or (-1, -1)."""
        old_l, old_e = int(self.slot_layer[pool, slot]), int(self.slot_expert[pool, slot])
        if old_l >= 0:
            self.table[old_l, old_e] = -1
        self.table[layer, expert] = slot
        self.slot_layer[pool, slot] = layer
        self.slot_expert[pool, slot] = expert
        return old_l, old_e
