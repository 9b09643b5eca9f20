"""Eager executor: one small device->host read of the needed set per layer, then the host plans.

Per ``prepare(layer, ...)``:
  1. device: needed mask [E] (+ selection scores, + next layer's prefetch votes) -> ONE read;
  2. host: hits/misses, victims by the eviction policy, fills on the copy stream, counters;
  3. host: prefetch the next layer's predicted experts (copies overlap this layer's compute);
  4. upload the slot table (pinned, non-blocking) and translate topk_ids -> slot ids on device.
The read also orders the host after all earlier work on the compute stream, which is why a slot
last read by an earlier layer or step can be refilled without further waiting.
"""

from __future__ import annotations

import numpy as np
import torch

from .counters import Counters
from .eviction import EvictionPolicy, eviction_order
from .plan import Plan, Wave
from .prefetch import rank_experts
from .slots import SlotStorage
from .store import HostExpertStore
from .transfer import TransferEngine

_RING = 2  # staging buffers for table uploads


class EagerExecutor:
    """Host-planned steps; serves any step (in waves when it needs more experts than slots)."""

    def __init__(
        self,
        store: HostExpertStore,
        slots: SlotStorage,
        transfer: TransferEngine,
        eviction_policy: EvictionPolicy,
        counters: Counters,
        top_k: int,
        prefetch: str,
    ) -> None:
        self.store, self.slots, self.transfer = store, slots, transfer
        self.eviction_policy, self.counters = eviction_policy, counters
        self.top_k, self.prefetch_mode = top_k, prefetch
        self.L, self.E, self.K = store.num_layers, store.num_experts, slots.pool_size
        self.device = slots.device
        self.routers: dict[int, torch.Tensor] = {}  # layer -> router weight [E, H]
        self.votes: np.ndarray | None = None  # the latest step's next-layer votes [E], on the host
        self.clock = 0
        self.busy: tuple[int, np.ndarray] | None = None  # (pool, slots) the latest wave computes on
        self.unsettled: set[int] = set()  # global slots whose fill may still be in flight
        self.last_needed: list[np.ndarray | None] = [None] * self.L
        self._src: dict[tuple[int, int], list[torch.Tensor]] = {}  # cached host views per expert
        pin = transfer.cuda
        # staging: [L + 2, E + 1] int32; rows 0..L-1 the slot table, L the wave map, L+1 the wave mask
        shape = (self.L + 2, self.E + 1)
        self.staging = [
            torch.full(shape, -1, dtype=torch.int32, pin_memory=pin) for _ in range(_RING)
        ]
        self.staging_events: list[torch.cuda.Event | None] = [None] * _RING
        self.ring = 0
        self.dev_ext = torch.full(shape, -1, dtype=torch.int32, device=self.device)
        slots.table_dev = self.dev_ext[: self.L]  # the device slot table is rows 0..L-1

    # ---------------------------------------------------------------- step
    def prepare(
        self,
        layer: int,
        topk_ids: torch.Tensor,
        scores: torch.Tensor | None = None,
        votes: torch.Tensor | None = None,
    ) -> Plan:
        """Make this step's experts resident; returns its waves (one unless K is too small)."""
        E = self.E
        flat = topk_ids.reshape(-1).long()
        idx = torch.where(flat >= 0, flat, E)  # [T*k], padding (-1) -> column E
        need, scores_h, self.votes = self._read(idx, scores, votes)  # the one device->host read

        self.clock += 1
        self.busy = None  # the read above waited for every earlier kernel
        pool = self.slots.layer_pool[layer]
        needed = np.flatnonzero(need)
        self.eviction_policy.observe(layer, need)
        if scores_h is not None:
            self.eviction_policy.note_scores(layer, scores_h)
        self._settle_prefetch(layer, pool, need)
        self.last_needed[layer] = needed

        row = self.slots.table[layer]
        resident = row[needed] >= 0
        inflight = self._inflight(pool)
        holds_needed = np.zeros(self.K, dtype=bool)
        holds_needed[row[needed[resident]]] = True
        # In-flight fills of slots this step does not read stay untouched; those it reads are
        # waited on by its compute, after which a later wave may reuse them.
        busy_copy = inflight & ~holds_needed
        capacity = self.K - int(busy_copy.sum())
        n_hit = int(resident.sum())
        self.counters.add(
            layer,
            hits=n_hit,
            misses=len(needed) - n_hit,
            distinct=len(needed),
            steps=1,
            bytes_h2d=(len(needed) - n_hit) * self.store.nbytes_per_expert,
        )
        if capacity < 1:  # prefetch keeps >= top_k slots free of in-flight copies
            raise RuntimeError("expert cache: every slot of the pool has a copy in flight")
        ordered = np.concatenate([needed[resident], needed[~resident]])
        chunks = [ordered[i : i + capacity] for i in range(0, len(ordered), capacity)] or [ordered]
        self.counters.add(layer, waves=len(chunks))
        if len(chunks) == 1:
            self._place(layer, pool, chunks[0], busy_copy)
            self._upload()
            slot_ids = self.dev_ext[layer].index_select(0, idx)
            return Plan(Wave(slot_ids.view_as(topk_ids).to(topk_ids.dtype)))
        waves = [self._make_wave(layer, pool, c, busy_copy, idx, topk_ids) for c in chunks]
        return Plan(waves[0](), waves[1:])

    def _read(
        self, idx: torch.Tensor, scores: torch.Tensor | None, votes: torch.Tensor | None
    ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """Needed mask (+ scores, + votes) in one device->host copy."""
        E = self.E
        mask = torch.zeros(E + 1, dtype=torch.bool, device=idx.device).index_fill_(0, idx, True)[:E]
        if scores is None and votes is None:
            return mask.cpu().numpy(), None, None
        parts = [mask.float()]
        if scores is not None:
            parts.append(scores.reshape(E).float())
        if votes is not None:
            parts.append(votes)
        host = torch.cat(parts).cpu().numpy()
        need = host[:E] > 0.5
        scores_h = host[E : 2 * E] if scores is not None else None
        votes_h = host[-E:] if votes is not None else None
        return need, scores_h, votes_h

    # ---------------------------------------------------------------- placement
    def _place(self, layer: int, pool: int, experts: np.ndarray, keep: np.ndarray) -> np.ndarray:
        """Make ``experts`` (<= capacity) resident in ``pool`` without touching ``keep`` [K]."""
        row = self.slots.table[layer]
        slot_of = row[experts]
        misses = experts[slot_of < 0]
        protected = keep.copy()
        protected[slot_of[slot_of >= 0]] = True
        victims = self._victims(pool, len(misses), protected)
        if len(misses):
            self.transfer.begin()
        for e, s in zip(misses.tolist(), victims.tolist()):
            self._fill(layer, e, pool, s)
        used = row[experts].astype(np.int64)
        self.slots.last_use[pool, used] = self.clock
        self.transfer.wait([self.slots.global_slot(pool, s) for s in used.tolist()])
        self.busy = (pool, used)
        return used

    def _make_wave(
        self,
        layer: int,
        pool: int,
        experts: np.ndarray,
        keep: np.ndarray,
        idx: torch.Tensor,
        topk_ids: torch.Tensor,
    ):
        """A deferred wave: its fills are issued when the caller reaches it."""

        def make() -> Wave:
            used = self._place(layer, pool, experts, keep)
            stage = self._next_staging()
            stage[self.L].fill_(int(used[0]))  # choices of other waves point at a filled slot
            stage[self.L + 1].zero_()
            stage[self.L, torch.from_numpy(experts)] = torch.from_numpy(used.astype(np.int32))
            stage[self.L + 1, torch.from_numpy(experts)] = 1
            stage[self.L, self.E] = -1  # padding stays -1, mask 0
            self._upload(stage)
            slot_ids = (
                self.dev_ext[self.L].index_select(0, idx).view_as(topk_ids).to(topk_ids.dtype)
            )
            mask = self.dev_ext[self.L + 1].index_select(0, idx).view_as(topk_ids).float()
            return Wave(slot_ids, mask)

        return make

    def _victims(self, pool: int, count: int, protected: np.ndarray) -> np.ndarray:
        """``count`` slots to overwrite: empty first, then by the eviction policy."""
        if count == 0:
            return np.zeros(0, dtype=np.int64)
        cand = np.flatnonzero(~protected)
        if len(cand) < count:
            raise RuntimeError(f"expert cache: {count} fills but only {len(cand)} evictable slots")
        sl, se = self.slots.slot_layer[pool, cand], self.slots.slot_expert[pool, cand]
        primary, secondary = self.eviction_policy.keys(
            np.maximum(sl, 0), np.maximum(se, 0), self.slots.last_use[pool, cand]
        )
        primary = np.where(sl < 0, -np.inf, np.asarray(primary, dtype=np.float64))
        return cand[eviction_order(primary, secondary)[:count]]

    def _fill(self, layer: int, expert: int, pool: int, slot: int) -> None:
        """Evict the slot's occupant (counting a wasted prefetch) and copy ``expert`` in."""
        s = self.slots
        old_layer, _ = s.place(layer, expert, pool, slot)
        if old_layer >= 0 and s.prefetched[pool, slot]:
            self.counters.add(old_layer, prefetch_wasted=1)
        s.prefetched[pool, slot] = False
        g = s.global_slot(pool, slot)
        src = self._src.get((layer, expert))
        if src is None:
            src = self._src[(layer, expert)] = list(self.store.expert(layer, expert).values())
        self.transfer.fill(g, s.slot_views(pool, slot), src)
        if self.transfer.cuda:
            self.unsettled.add(g)

    def _inflight(self, pool: int) -> np.ndarray:
        """[K] bool: slots of ``pool`` whose latest fill has not finished (non-blocking queries)."""
        mask = np.zeros(self.K, dtype=bool)
        for g in list(self.unsettled):
            if not self.transfer.in_flight(g):
                self.unsettled.discard(g)
            elif g // self.K == pool:
                mask[g % self.K] = True
        return mask

    # ---------------------------------------------------------------- prefetch
    def _settle_prefetch(self, layer: int, pool: int, need: np.ndarray) -> None:
        """Score this layer's prefetched slots against the step that now arrived."""
        s = self.slots
        sel = s.prefetched[pool] & (s.slot_layer[pool] == layer)
        if sel.any():
            used = need[s.slot_expert[pool, sel]]
            self.counters.add(
                layer, prefetch_hits=int(used.sum()), prefetch_wasted=int((~used).sum())
            )
            s.prefetched[pool, sel] = False

    def prefetch_next(self, layer: int) -> None:
        """Copy the next layer's predicted experts (votes read by ``prepare``, plus its previous
        step's set) into evictable slots; the last layer prefetches layer 0 of the next step."""
        nxt = (layer + 1) % self.L
        votes = self.votes if nxt == layer + 1 else None
        ranked = rank_experts(self.prefetch_mode, self.E, votes, self.last_needed[nxt])
        if self.prefetch(nxt, ranked):
            self._upload()

    def prefetch_ranked(self, layer: int, ranked: np.ndarray) -> None:
        """Copy ``ranked`` experts of ``layer`` (best first) now, outside a step."""
        self.prefetch(layer, ranked)
        self._upload()

    def resident_mask(self, layer: int) -> torch.Tensor:
        """[E] bool on the device: experts of ``layer`` in a slot (the device table's view)."""
        return self.slots.table_dev[layer, : self.E] >= 0

    def check_overflow(self) -> None:
        """The eager executor serves every step (in waves): nothing can overflow."""

    def prefetch(self, layer: int, ranked: np.ndarray) -> int:
        """Start copying the predicted experts of ``layer`` (best first) into evictable slots.

        Never touches the slots the current wave computes on or an in-flight fill, and leaves
        at least top_k slots without an in-flight fill so the next demand step always fits.
        Returns the number of experts copied.
        """
        pool = self.slots.layer_pool[layer]
        row = self.slots.table[layer]
        ranked = np.asarray(ranked, dtype=np.int64)
        wanted = ranked[row[ranked] < 0]
        if len(wanted) == 0:
            return 0
        inflight = self._inflight(pool)
        protected = inflight.copy()
        present = row[ranked]
        protected[present[present >= 0]] = True  # keep predicted experts already resident
        if self.busy is not None and self.busy[0] == pool:
            protected[self.busy[1]] = True
        budget = self.K - self.top_k - int(inflight.sum())
        count = max(0, min(len(wanted), int((~protected).sum()), budget))
        if count == 0:
            return 0
        victims = self._victims(pool, count, protected)
        self.transfer.begin()
        for e, s in zip(wanted[:count].tolist(), victims.tolist()):
            self._fill(layer, e, pool, s)
            self.slots.prefetched[pool, s] = True
            self.slots.last_use[pool, s] = self.clock
        self.counters.add(
            layer, prefetch_fills=count, bytes_h2d=count * self.store.nbytes_per_expert
        )
        return count

    # ---------------------------------------------------------------- table upload
    def _next_staging(self) -> torch.Tensor:
        """A staging buffer no queued upload still reads (rarely waits: the per-layer read syncs)."""
        self.ring = (self.ring + 1) % _RING
        ev = self.staging_events[self.ring]
        if ev is not None and not ev.query():
            ev.synchronize()
        return self.staging[self.ring]

    def _upload(self, stage: torch.Tensor | None = None) -> None:
        """Copy the host slot table (and a wave map, if staged) to the device, non-blocking."""
        if stage is None:
            stage = self._next_staging()
        stage[: self.L].copy_(torch.from_numpy(self.slots.table))
        self.dev_ext.copy_(stage, non_blocking=True)
        if self.transfer.cuda:
            ev = torch.cuda.Event()
            ev.record()
            self.staging_events[self.ring] = ev
