"""Graph-safe executor: decide, assign slots and gather on the device, with fixed shapes.

No host sync and no host-side branching on data, so a decode step can be captured in a CUDA
graph. The price of fixed shapes: a step is served only if its misses fit the slots that do not
hold one of its own experts (always true when K >= the step's distinct experts, e.g. batch <=
K // top_k). A step that does not fit is flagged (``overflow`` counter, ``check_overflow()``)
and the choices it could not serve get a NaN weight mask, so its output is visibly poisoned,
never silently wrong.
"""

from __future__ import annotations

import numpy as np
import torch

from lynx_sglang.kernels.offload_gather import offload_gather, offload_gather_ref

from .counters import COL, FIELDS, Counters
from .eviction import EvictionPolicy, eviction_order
from .plan import Plan, Wave
from .prefetch import rank_experts_device
from .slots import SlotStorage
from .store import HostExpertStore


class GraphExecutor:
    """Device-planned steps (one wave each); the slot tables live on the device only."""

    def __init__(
        self,
        store: HostExpertStore,
        slots: SlotStorage,
        eviction_policy: EvictionPolicy,
        counters: Counters,
        top_k: int,
        prefetch: str,
        gather_backend: str = "auto",
    ) -> None:
        self.store, self.slots, self.top_k = store, slots, top_k
        self.eviction_policy = eviction_policy
        self.prefetch_mode = prefetch
        self.gather_backend = gather_backend
        self.L, self.E, self.K, self.P = (
            store.num_layers,
            store.num_experts,
            slots.pool_size,
            slots.num_pools,
        )
        dev = self.device = slots.device
        L, E, K, P = self.L, self.E, self.K, self.P
        i64 = dict(dtype=torch.int64, device=dev)
        # Slot state [P, K + 1]; column K is a scratch target for masked-out writes.
        self.slot_layer = torch.full((P, K + 1), -1, **i64)
        self.slot_expert = torch.full((P, K + 1), -1, **i64)
        self.last_use = torch.zeros((P, K + 1), **i64)
        self.prefetched = torch.zeros((P, K + 1), dtype=torch.bool, device=dev)
        self.busy = torch.zeros((P, K + 1), dtype=torch.bool, device=dev)
        # table_flat: [L * (E + 1) + 1] int32 expert -> slot; last entry is scratch.
        self.table_flat = torch.full((L * (E + 1) + 1,), -1, dtype=torch.int32, device=dev)
        slots.table_dev = self.table_flat[:-1].view(L, E + 1)
        self.scratch = L * (E + 1)
        self.clock = torch.zeros(1, **i64)
        self.overflowed = torch.zeros(1, **i64)  # sticky count of unserved steps (not reset)
        self.last_need = torch.zeros((L, E), dtype=torch.bool, device=dev)
        self.ctr = counters.device_table(dev)  # [L + 1, C]; row L is scratch
        self.src = store.buffer.view(L * E, store.block_bytes)  # [L*E, B] uint8 rows
        self.routers: dict[int, torch.Tensor] = {}  # layer -> router weight [E, H]
        self.votes: torch.Tensor | None = None  # the latest step's next-layer votes [E]
        self.cuda = dev.type == "cuda"
        self.copy_stream = torch.cuda.Stream(device=dev) if self.cuda else None
        self.prefetch_events: dict[int, torch.cuda.Event] = {}

    # ---------------------------------------------------------------- step
    def prepare(
        self,
        layer: int,
        topk_ids: torch.Tensor,
        scores: torch.Tensor | None = None,
        votes: torch.Tensor | None = None,
        captured: bool = False,
        requests: torch.Tensor | None = None,
        decode: bool = False,
        router_logits: torch.Tensor | None = None,
        hidden_states: torch.Tensor | None = None,
    ) -> Plan:
        """Serve one step on the device; returns a one-wave plan with a weight mask."""
        E, K = self.E, self.K
        pool = self.slots.layer_pool[layer]
        self.wait_prefetch(layer)
        self.votes = votes
        flat = topk_ids.reshape(-1).long()
        idx = torch.where(flat >= 0, flat, E)  # [T*k], padding -> column E
        need_ext = torch.zeros(E + 1, dtype=torch.bool, device=self.device).index_fill_(
            0, idx, True
        )
        need_ext[E] = False
        need = need_ext[:E]  # [E]
        self.clock += 1
        self.eviction_policy.observe(layer, need)
        if scores is not None:
            self.eviction_policy.note_scores(layer, scores.reshape(E).float())
        if requests is not None:
            self.eviction_policy.observe_requests(
                layer, requests, topk_ids, decode, router_logits, hidden_states
            )
        pf_hits, pf_wasted = self._settle_prefetch(layer, pool, need)
        self.last_need[layer] = need

        row = self.slots.table_dev[layer, :E]  # [E] int32
        hit = need & (row >= 0)
        miss = need & (row < 0)
        protected = self._slot_mask(torch.where(hit, row.long(), K))
        order, n_free = self._victim_order(pool, protected)
        valid, rows, victims = self._assign(layer, pool, miss, None, order, n_free)
        self._gather(pool, rows, victims)

        row = self.slots.table_dev[layer, :E]
        used = torch.where(need & (row >= 0), row.long(), K)  # [E] slots this step reads
        self.last_use[pool].index_put_((used,), self.clock.expand(E))
        self.busy[pool].zero_()
        self.busy[pool].index_fill_(0, used, True)

        n_miss = miss.sum()
        served = valid.sum()
        self.overflowed += n_miss > served
        unserved = need_ext & (self.slots.table_dev[layer] < 0)  # [E + 1]
        self._count(
            layer,
            hits=hit.sum(),
            misses=n_miss,
            distinct=need.sum(),
            steps=1,
            waves=1,
            bytes_h2d=served * self.store.nbytes_per_expert,
            overflow=(n_miss > served).long(),
            prefetch_hits=pf_hits,
            prefetch_wasted=pf_wasted,
        )

        slot_ids = self.slots.table_dev[layer].index_select(0, idx)  # [T*k]
        bad = unserved.index_select(0, idx)
        slot_ids = torch.where(bad, 0, slot_ids).view_as(topk_ids).to(topk_ids.dtype)
        weight_mask = torch.where(bad, float("nan"), 1.0).view_as(topk_ids)  # [T, k] float32
        return Plan(Wave(slot_ids, weight_mask))

    # ---------------------------------------------------------------- pieces
    def _slot_mask(self, slot_idx: torch.Tensor) -> torch.Tensor:
        """[K] bool: True at the given slots (index K = none)."""
        m = torch.zeros(self.K + 1, dtype=torch.bool, device=self.device)
        return m.index_fill_(0, slot_idx, True)[: self.K]

    def _victim_order(
        self, pool: int, protected: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Slots in eviction order (empty, then policy; protected last) and how many may go."""
        K = self.K
        sl, se = self.slot_layer[pool, :K], self.slot_expert[pool, :K]
        primary, secondary = self.eviction_policy.keys(
            sl.clamp(min=0), se.clamp(min=0), self.last_use[pool, :K]
        )
        primary = primary.double()
        primary = torch.where(sl < 0, float("-inf"), primary)
        primary = torch.where(protected, float("inf"), primary)
        return eviction_order(primary, secondary), (~protected).sum()

    def _assign(
        self,
        layer: int,
        pool: int,
        want: torch.Tensor,
        score: torch.Tensor | None,
        order: torch.Tensor,
        n_avail: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Give the wanted experts (best score first) the first ``n_avail`` victims; update tables.

        Returns per copy position i < K: valid [K] bool, source rows [K] (-1 = none), victims [K].
        """
        E, K = self.E, self.K
        experts = torch.arange(E, device=self.device)
        if score is None:
            rank = torch.cumsum(want.long(), 0) - 1  # [E] ascending expert id
        else:
            by = torch.argsort(torch.where(want, -score, float("inf")), stable=True)
            rank = torch.empty_like(by).scatter_(0, by, experts)
        take = want & (rank < n_avail)
        pos = torch.where(take, rank, K)  # [E] copy position, K = none
        copy_expert = torch.full((K + 1,), -1, dtype=torch.int64, device=self.device)
        copy_expert = copy_expert.scatter_(0, pos, torch.where(take, experts, -1))[:K]  # [K]
        valid = copy_expert >= 0
        victims = order  # [K] victim slot per copy position
        vslot = torch.where(valid, victims, K)
        # evict the victims' occupants
        old_l, old_e = self.slot_layer[pool, victims], self.slot_expert[pool, victims]
        evict = valid & (old_l >= 0)
        self.table_flat.index_fill_(
            0, torch.where(evict, old_l * (E + 1) + old_e, self.scratch), -1
        )
        wasted = evict & self.prefetched[pool, victims]
        ctr_rows = torch.where(wasted, old_l, self.L)
        self.ctr[:, COL["prefetch_wasted"]].index_add_(0, ctr_rows, wasted.long())
        self.prefetched[pool].index_fill_(0, vslot, False)
        # place the new experts
        key = torch.where(valid, layer * (E + 1) + copy_expert, self.scratch)
        self.table_flat.index_copy_(0, key, torch.where(valid, victims, -1).int())
        self.table_flat[self.scratch] = -1
        self.slot_layer[pool].index_copy_(0, vslot, torch.full_like(vslot, layer))
        self.slot_expert[pool].index_copy_(0, vslot, copy_expert)
        rows = torch.where(valid, layer * E + copy_expert, -1)
        return valid, rows, victims

    def _gather(self, pool: int, rows: torch.Tensor, victims: torch.Tensor) -> None:
        """Copy the planned experts into their slots (Triton UVA kernel; torch ref on request)."""
        for seg in self.store.segments:
            dst = self.slots.tensors[seg.name][pool]
            if self.gather_backend == "torch":
                offload_gather_ref(self.src, seg.offset, dst, rows, victims)
            else:
                interpret = True if self.gather_backend == "triton" else None
                offload_gather(self.src, seg.offset, dst, rows, victims, interpret_cpu=interpret)

    def _settle_prefetch(
        self, layer: int, pool: int, need: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prefetched slots of this layer: (needed now, not needed now); clears their flags."""
        K = self.K
        pf = self.prefetched[pool, :K] & (self.slot_layer[pool, :K] == layer)
        used = pf & need[self.slot_expert[pool, :K].clamp(min=0)]
        self.prefetched[pool, :K] &= ~pf
        return used.sum(), (pf & ~used).sum()

    def _count(self, layer: int, **values) -> None:
        """Add device scalars/ints to the layer's counters in one kernel."""
        inc = torch.zeros(len(FIELDS), dtype=torch.int64, device=self.device)
        for name, v in values.items():
            inc[COL[name]] = v
        self.ctr[layer] += inc

    # ---------------------------------------------------------------- prefetch
    def wait_prefetch(self, layer: int) -> None:
        """Order the compute stream after the prefetch copies (and table updates) of ``layer``."""
        ev = self.prefetch_events.pop(layer, None)
        if ev is not None:
            torch.cuda.current_stream(self.device).wait_event(ev)

    def end_step(self, layer: int) -> None:
        """After the step's wave: the next layer's prefetch (when on)."""
        if self.prefetch_mode != "off":
            self.prefetch_next(layer)

    def prefetch_next(self, layer: int) -> None:
        """Copy layer+1's predicted experts (the votes given to ``prepare``, plus its previous
        step's set) on the copy stream; layer+1 waits on its event."""
        nxt, votes = layer + 1, self.votes
        if nxt >= self.L or (votes is None and self.prefetch_mode == "cross-layer"):
            return
        score = rank_experts_device(self.prefetch_mode, self.E, votes, self.last_need[nxt])
        if not self.cuda:
            self.prefetch(nxt, score)
            return
        compute = torch.cuda.current_stream(self.device)
        self.copy_stream.wait_stream(compute)
        score.record_stream(self.copy_stream)
        with torch.cuda.stream(self.copy_stream):
            self.prefetch(nxt, score)
            ev = torch.cuda.Event()
            ev.record(self.copy_stream)
        self.prefetch_events[nxt] = ev

    def prefetch(self, nxt: int, score: torch.Tensor) -> None:
        """Copy layer ``nxt``'s experts with score > 0 (highest first) into evictable slots.

        Keeps predicted experts already resident and the slots the latest prepared layer
        computes on (they share the pool only with ``slot_pool="shared"``).
        """
        E, K = self.E, self.K
        pool = self.slots.layer_pool[nxt]
        row = self.slots.table_dev[nxt, :E]
        predicted = score > 0
        want = predicted & (row < 0)
        keep = torch.where(predicted & (row >= 0), row.long(), K)
        protected = self._slot_mask(keep)
        if self.P == 1:
            protected = protected | self.busy[pool, :K]
        order, n_free = self._victim_order(pool, protected)
        valid, rows, victims = self._assign(nxt, pool, want, score, order, n_free)
        self._gather(pool, rows, victims)
        vslot = torch.where(valid, victims, K)
        self.prefetched[pool].index_fill_(0, vslot, True)
        self.prefetched[pool, K] = False
        self.last_use[pool].index_put_((vslot,), self.clock.expand(K))
        n = valid.sum()
        self._count(nxt, prefetch_fills=n, bytes_h2d=n * self.store.nbytes_per_expert)

    def prefetch_ranked(self, layer: int, ranked: np.ndarray) -> None:
        """Copy ``ranked`` experts of ``layer`` (best first) now, outside a step."""
        score = torch.zeros(self.E, dtype=torch.float32, device=self.device)
        score[torch.as_tensor(ranked, device=self.device)] = torch.arange(
            len(ranked), 0, -1, dtype=torch.float32, device=self.device
        )
        self.prefetch(layer, score)

    def resident_mask(self, layer: int) -> torch.Tensor:
        """[E] bool on the device: experts of ``layer`` in a slot, after its prefetch copies."""
        self.wait_prefetch(layer)
        return self.slots.table_dev[layer, : self.E] >= 0

    def check_overflow(self) -> None:
        """Raise if any step could not be served (reads a device counter: call outside a step)."""
        n = int(self.overflowed)
        if n:
            raise RuntimeError(
                f"expert cache (graph executor): {n} layer step(s) needed more experts than "
                "free slots; their outputs are NaN-poisoned. Raise --lynx-slots or cap the "
                "decode batch at slots // top_k"
            )
