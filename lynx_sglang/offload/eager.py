"""Eager executor: one small device->host read of the needed set per layer, then the host plans.

Per ``prepare(layer, ...)``:
  1. device: needed mask [E] (+ selection scores, + next layer's prefetch votes) -> ONE read;
  2. host: hits/misses, victims by the eviction policy, fills on the copy stream, counters;
  3. host: prefetch the next layer's predicted experts (copies overlap this layer's compute);
  4. upload the slot table (pinned, non-blocking) and translate topk_ids -> slot ids on device.
The read also orders the host after all earlier work on the compute stream, which is why a slot
last read by an earlier layer or step can be refilled without further waiting.

Host cost: every torch call costs microseconds, a numpy call about one, so the planning is
numpy and vectorised over a step's experts. With CPU tensors ("device" = host) the read, the
table "upload" and the slot-id translation are numpy on zero-copy views, and a step's fills are
one indexed copy per named tensor; on CUDA each fill is its own copy with its own event.
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
        self.host = self.device.type == "cpu"  # CPU tensors: numpy on zero-copy views
        self.routers: dict[int, torch.Tensor] = {}  # layer -> router weight [E, H]
        self.votes: np.ndarray | None = None  # the latest step's next-layer votes [E], on the host
        self.clock = 0
        self.busy: tuple[int, np.ndarray] | None = None  # (pool, slots) the latest wave computes on
        self.unsettled: set[int] = set()  # global slots whose fill may still be in flight
        self.last_needed: list[np.ndarray | None] = [None] * self.L
        self._src: dict[tuple[int, int], list[torch.Tensor]] = {}  # cached host views per expert
        self._bytes = store.nbytes_per_expert
        # CPU fills: per layer the store's [E, *shape] views, per pool the slots' [K, *shape]
        self._layer_src = [[store.tensor(la, n) for n in slots.names] for la in range(self.L)]
        self._pool_dst = [list(slots.weights(p).values()) for p in range(slots.num_pools)]
        pin = transfer.cuda
        # staging: [L + 2, E + 1] int32; rows 0..L-1 the slot table, L the wave map, L+1 the wave mask
        shape = (self.L + 2, self.E + 1)
        self.dev_ext = torch.full(shape, -1, dtype=torch.int32, device=self.device)
        slots.table_dev = self.dev_ext[: self.L]  # the device slot table is rows 0..L-1
        if self.host:  # the "device" table is host memory: write it in place, no staging
            self.staging, self.staging_np = [], [self.dev_ext.numpy()]
        else:
            self.staging = [
                torch.full(shape, -1, dtype=torch.int32, pin_memory=pin) for _ in range(_RING)
            ]
            self.staging_np = [t.numpy() for t in self.staging]  # zero-copy host views
        self.staging_events: list[torch.cuda.Event | None] = [None] * _RING
        self.ring = 0
        self._dev_np = self.staging_np[0] if self.host else None

    # ---------------------------------------------------------------- step
    def prepare(
        self,
        layer: int,
        topk_ids: torch.Tensor,
        scores: torch.Tensor | None = None,
        votes: torch.Tensor | None = None,
    ) -> Plan:
        """Make this step's experts resident; returns its waves (one unless K is too small)."""
        if self.host:
            idx = _host_index(topk_ids, self.E)  # [T*k] int64 numpy, padding (-1) -> column E
            need, scores_h, self.votes = self._read_host(idx, scores, votes)
        else:
            flat = topk_ids.reshape(-1).long()
            idx = torch.where(flat >= 0, flat, self.E)  # [T*k], padding (-1) -> column E
            need, scores_h, self.votes = self._read(idx, scores, votes)  # the one device read

        self.clock += 1
        self.busy = None  # the read above waited for every earlier kernel
        pool = self.slots.layer_pool[layer]
        needed = np.flatnonzero(need)
        self.eviction_policy.observe(layer, need)
        if scores_h is not None:
            self.eviction_policy.note_scores(layer, scores_h)
        self._settle_prefetch(layer, pool, need)
        self.last_needed[layer] = needed

        slot_of = self.slots.table[layer][needed]
        resident = slot_of >= 0
        n_needed, n_hit = len(needed), int(np.count_nonzero(resident))
        busy_copy = self._inflight(pool)
        if busy_copy.any():
            # In-flight fills of slots this step does not read stay untouched; those it reads
            # are waited on by its compute, after which a later wave may reuse them.
            busy_copy[slot_of[resident]] = False
        capacity = self.K - int(np.count_nonzero(busy_copy))
        if capacity < 1:  # prefetch keeps >= top_k slots free of in-flight copies
            self._count_step(layer, n_needed, n_hit, 0)
            raise RuntimeError("expert cache: every slot of the pool has a copy in flight")
        if n_needed <= capacity:  # one wave (the order of its experts changes no decision)
            self._count_step(layer, n_needed, n_hit, 1)
            self._place(layer, pool, needed, busy_copy)
            self._upload()
            return Plan(Wave(self._translate(layer, idx, topk_ids, topk_ids.dtype)))
        ordered = np.concatenate([needed[resident], needed[~resident]])
        chunks = [ordered[i : i + capacity] for i in range(0, n_needed, capacity)]
        self._count_step(layer, n_needed, n_hit, len(chunks))
        waves = [self._make_wave(layer, pool, c, busy_copy, idx, topk_ids) for c in chunks]
        return Plan(waves[0](), waves[1:])

    def _count_step(self, layer: int, needed: int, hits: int, waves: int) -> None:
        self.counters.add(
            layer,
            hits=hits,
            misses=needed - hits,
            distinct=needed,
            steps=1,
            bytes_h2d=(needed - hits) * self._bytes,
            waves=waves,
        )

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

    def _read_host(
        self, idx: np.ndarray, scores: torch.Tensor | None, votes: torch.Tensor | None
    ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """``_read`` for CPU tensors: the same arrays (values and dtypes), from numpy views."""
        E = self.E
        need_ext = np.zeros(E + 1, dtype=bool)
        need_ext[idx] = True
        need = need_ext[:E]
        if scores is None and votes is None:
            return need, None, None
        # torch.cat's promotion in ``_read``: float32, unless the votes need a wider type
        kind = torch.float32 if votes is None else torch.promote_types(torch.float32, votes.dtype)
        scores_h = votes_h = None
        if scores is not None:
            scores_h = scores.reshape(E).float().to(kind).numpy().copy()
        if votes is not None:
            votes_h = votes.reshape(E).to(kind).numpy().copy()
        return need, scores_h, votes_h

    def _translate(self, row: int, idx, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Row ``row`` of the device table (+ wave rows) at ``idx``, shaped as ``like``."""
        if self.host:
            out = torch.from_numpy(self._dev_np[row][idx].reshape(like.shape))
        else:
            out = self.dev_ext[row].index_select(0, idx).view_as(like)
        return out.to(dtype)

    # ---------------------------------------------------------------- placement
    def _place(self, layer: int, pool: int, experts: np.ndarray, keep: np.ndarray) -> np.ndarray:
        """Make ``experts`` (<= capacity) resident in ``pool`` without touching ``keep`` [K]."""
        row = self.slots.table[layer]
        slot_of = row[experts]
        miss = slot_of < 0
        if miss.any():
            protected = keep.copy()
            protected[slot_of[~miss]] = True
            misses = experts[miss]
            victims = self._victims(pool, len(misses), protected)
            self.transfer.begin()
            self._fill(layer, misses, pool, victims)
            used = row[experts].astype(np.int64)
        else:
            used = slot_of.astype(np.int64)
        self.slots.last_use[pool, used] = self.clock
        if self.transfer.cuda:
            self.transfer.wait((used + pool * self.K).tolist())
        self.busy = (pool, used)
        return used

    def _make_wave(
        self,
        layer: int,
        pool: int,
        experts: np.ndarray,
        keep: np.ndarray,
        idx,
        topk_ids: torch.Tensor,
    ):
        """A deferred wave: its fills are issued when the caller reaches it."""

        def make() -> Wave:
            used = self._place(layer, pool, experts, keep)
            stage = self._next_staging()
            wave_map, wave_mask = stage[self.L], stage[self.L + 1]
            wave_map.fill(int(used[0]))  # choices of other waves point at a filled slot
            wave_map[experts] = used
            wave_map[self.E] = -1  # padding stays -1, mask 0
            wave_mask.fill(0)
            wave_mask[experts] = 1
            self._upload(stage)
            slot_ids = self._translate(self.L, idx, topk_ids, topk_ids.dtype)
            mask = self._translate(self.L + 1, idx, topk_ids, torch.float32)
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

    def _fill(self, layer: int, experts: np.ndarray, pool: int, slots: np.ndarray) -> None:
        """Evict the occupants of ``slots`` (counting wasted prefetches) and copy ``experts``
        (distinct, none resident) of ``layer`` into them, pairwise."""
        s = self.slots
        old_layer, old_expert = s.slot_layer[pool, slots], s.slot_expert[pool, slots]
        occupied = old_layer >= 0
        wasted = occupied & s.prefetched[pool, slots]
        if wasted.any():
            self.counters.add_each("prefetch_wasted", old_layer[wasted])
        s.table[old_layer[occupied], old_expert[occupied]] = -1
        s.table[layer, experts] = slots
        s.slot_layer[pool, slots] = layer
        s.slot_expert[pool, slots] = experts
        s.prefetched[pool, slots] = False
        if self.host:  # one indexed copy per named tensor
            src_idx, dst_idx = torch.from_numpy(experts), torch.from_numpy(slots)
            for src, dst in zip(self._layer_src[layer], self._pool_dst[pool]):
                dst.index_copy_(0, dst_idx, src.index_select(0, src_idx))
            return
        for e, slot in zip(experts.tolist(), slots.tolist()):
            g = s.global_slot(pool, slot)
            src = self._src.get((layer, e))
            if src is None:
                src = self._src[(layer, e)] = list(self.store.expert(layer, e).values())
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
        pf = s.prefetched[pool]
        if not pf.any():
            return
        sel = pf & (s.slot_layer[pool] == layer)
        if sel.any():
            used = need[s.slot_expert[pool, sel]]
            n_used = int(np.count_nonzero(used))
            self.counters.add(layer, prefetch_hits=n_used, prefetch_wasted=len(used) - n_used)
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
        present = row[ranked]
        wanted = ranked[present < 0]
        if len(wanted) == 0:
            return 0
        inflight = self._inflight(pool)
        protected = inflight.copy()
        protected[present[present >= 0]] = True  # keep predicted experts already resident
        if self.busy is not None and self.busy[0] == pool:
            protected[self.busy[1]] = True
        budget = self.K - self.top_k - int(np.count_nonzero(inflight))
        count = max(0, min(len(wanted), self.K - int(np.count_nonzero(protected)), budget))
        if count == 0:
            return 0
        victims = self._victims(pool, count, protected)
        self.transfer.begin()
        self._fill(layer, wanted[:count], pool, victims)
        self.slots.prefetched[pool, victims] = True
        self.slots.last_use[pool, victims] = self.clock
        self.counters.add(layer, prefetch_fills=count, bytes_h2d=count * self._bytes)
        return count

    # ---------------------------------------------------------------- table upload
    def _next_staging(self) -> np.ndarray:
        """A staging buffer no queued upload still reads (rarely waits: the per-layer read syncs);
        with CPU tensors, the device table itself."""
        if self.host:
            return self._dev_np
        self.ring = (self.ring + 1) % _RING
        ev = self.staging_events[self.ring]
        if ev is not None and not ev.query():
            ev.synchronize()
        return self.staging_np[self.ring]

    def _upload(self, stage: np.ndarray | None = None) -> None:
        """Copy the host slot table (and a wave map, if staged) to the device, non-blocking."""
        if stage is None:
            stage = self._next_staging()
        stage[: self.L] = self.slots.table
        if self.host:
            return
        self.dev_ext.copy_(self.staging[self.ring], non_blocking=True)
        if self.transfer.cuda:
            ev = torch.cuda.Event()
            ev.record()
            self.staging_events[self.ring] = ev


def _host_index(topk_ids: torch.Tensor, num_experts: int) -> np.ndarray:
    """topk_ids (a CPU tensor) flattened to int64 numpy, padding (< 0) -> ``num_experts``."""
    flat = topk_ids.numpy().reshape(-1).astype(np.int64, copy=False)
    return np.where(flat >= 0, flat, num_experts)

