"""Hybrid executor: decode steps captured in a CUDA graph run the device-side executor, every
other step (prefill, extend, mixed, decode batches beyond the capture cap) the eager one.

One state, owned by the device: the graph executor's device tensors (slot occupants, last use,
prefetch flags, the expert -> slot table, the clock, the eviction policy's arrays) are what a
replayed graph reads and writes, without any Python running. The eager executor plans on a host
copy of that state: before a host-planned step it pulls the device state when the device may
have moved (once any graph was captured, a replay may have run at any time), and after the step
(its waves done) it pushes its changes back and orders the compute stream after its copies, so a
later replay finds the state and the slots as the host left them. SGLang's paged experts keeps
its residency the same way (``DeviceResidency.load_into`` / ``store_from``).
"""

from __future__ import annotations

import numpy as np
import torch

from .eager import EagerExecutor
from .graph import GraphExecutor
from .plan import Plan


class HybridExecutor:
    """Routes each step by ``captured``; the two executors share the slots and one state."""

    def __init__(self, eager: EagerExecutor, device: GraphExecutor) -> None:
        self.eager, self.device = eager, device
        self.routers: dict[int, torch.Tensor] = {}  # layer -> router weight [E, H]
        eager.routers = device.routers = self.routers
        self.slots = eager.slots
        self.L, self.E, self.K = eager.L, eager.E, eager.K
        self.graphs = False  # a step was captured: replays may move the device state any time
        self.device_moved = False  # the device executor ran since the host last pulled
        self.host_moved = False  # the host planned since it last pushed
        self.last = eager  # the executor of the latest step

    # ---------------------------------------------------------------- step
    def prepare(
        self,
        layer: int,
        topk_ids: torch.Tensor,
        scores: torch.Tensor | None,
        votes: torch.Tensor | None,
        captured: bool,
        requests: torch.Tensor | None = None,
        decode: bool = False,
        router_logits: torch.Tensor | None = None,
        hidden_states: torch.Tensor | None = None,
    ) -> Plan:
        if captured:
            self._push()
            self.graphs = self.device_moved = True
            self.last = self.device
            return self.device.prepare(layer, topk_ids, scores, votes, True, requests, decode,
                                       router_logits, hidden_states)  # fmt: skip
        self.device.wait_prefetch(layer)  # its copies of this layer land before the host reads
        self._pull()
        self.host_moved = True
        self.last = self.eager
        return self.eager.prepare(layer, topk_ids, scores, votes, False, requests, decode,
                                  router_logits, hidden_states)  # fmt: skip

    def end_step(self, layer: int) -> None:
        """After the step's waves: the next layer's prefetch, then (host-planned steps, once
        graphs exist) the host state goes back to the device."""
        self.last.end_step(layer)
        if self.last is self.eager and self.graphs:
            self._push()

    def prefetch_ranked(self, layer: int, ranked: np.ndarray) -> None:
        self._pull()
        self.eager.prefetch_ranked(layer, ranked)
        self.host_moved = True
        self._push()

    def resident_mask(self, layer: int) -> torch.Tensor:
        if not self.graphs:  # nothing was captured: the host state is the only one, and one
            # row of its table is all a host-planned step's selection needs (no state push)
            held = torch.from_numpy(self.slots.table[layer, : self.E] >= 0)
            return held.to(self.device.device)
        self._push()
        return self.device.resident_mask(layer)

    def check_overflow(self) -> None:
        self.device.check_overflow()

    # ---------------------------------------------------------------- the one state
    def _pull(self) -> None:
        """Device state -> the eager executor's host arrays (in place: it holds views)."""
        if not (self.graphs or self.device_moved):
            return
        d, s, e, K = self.device, self.slots, self.eager, self.K
        state = torch.stack(
            [d.slot_layer[:, :K], d.slot_expert[:, :K], d.last_use[:, :K], d.prefetched[:, :K].long()]
        ).cpu().numpy()  # [4, P, K], one device->host read
        s.slot_layer[:], s.slot_expert[:], s.last_use[:] = state[0], state[1], state[2]
        s.prefetched[:] = state[3] != 0
        s.table[:] = -1
        for pool, layers in enumerate(state[0]):
            held = layers >= 0
            s.table[layers[held], state[1][pool][held]] = np.flatnonzero(held)
        e.clock = int(d.clock)
        need = d.last_need.cpu().numpy()  # [L, E] bool
        e.last_needed = [np.flatnonzero(row) for row in need]
        for name, arr in e.eviction_policy.arrays().items():
            arr[:] = d.eviction_policy.arrays()[name].cpu().numpy()
        e.note_pulled()
        self.device_moved = False

    def _push(self) -> None:
        """The eager executor's host arrays -> the device state, and the compute stream after
        the host-planned copies (a replay may overwrite those slots next)."""
        if not self.host_moved:
            return
        d, s, e, K = self.device, self.slots, self.eager, self.K
        dev = d.device
        d.slot_layer[:, :K].copy_(torch.from_numpy(s.slot_layer).to(dev))
        d.slot_expert[:, :K].copy_(torch.from_numpy(s.slot_expert).to(dev))
        d.last_use[:, :K].copy_(torch.from_numpy(s.last_use).to(dev))
        d.prefetched[:, :K].copy_(torch.from_numpy(s.prefetched).to(dev))
        d.table_flat[:-1].view(self.L, self.E + 1).copy_(torch.from_numpy(np.asarray(s.table)).to(dev))
        d.clock.fill_(e.clock)
        need = np.zeros((self.L, self.E), dtype=bool)
        for layer, ids in enumerate(e.last_needed):
            if ids is not None:
                need[layer, ids] = True
        d.last_need.copy_(torch.from_numpy(need).to(dev))
        for name, arr in e.eviction_policy.arrays().items():
            d.eviction_policy.arrays()[name].copy_(torch.from_numpy(arr).to(dev))
        e.order_compute_after_copies()
        self.host_moved = False
