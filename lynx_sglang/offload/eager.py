"""Eager executor: one small device->host read of the needed set per layer, then the host plans.

Per ``prepare(layer, ...)``:
  1. device: needed mask [E] (+ selection scores, + next layer's prefetch votes) -> ONE read;
  2. host: hits/misses, victims by the eviction policy, fills on the copy stream, counters;
  3. host: prefetch the next layer's predicted experts (copies overlap this layer's compute);
  4. upload the slot table (pinned, non-blocking) and translate topk_ids -> slot ids on device.
The read also orders the host after all earlier work on the compute stream, which is why a slot
last read by an earlier layer or step can be refilled without further waiting.

Host cost: a torch call costs microseconds, a numpy call about one, so the planning is numpy,
vectorised over a step's experts. With CPU tensors (the "device" is the host) the read, the
table upload and the slot-id translation are numpy on zero-copy views (the device table is the
host table), and a wave's fills are one byte gather-scatter per named tensor; on CUDA each fill
is its own copy on the copy stream with its own event.
"""

from __future__ import annotations

import numpy as np
import torch

from .counters import COL, Counters
from .eviction import EvictionPolicy
from .plan import Plan, Wave
from .prefetch import rank_experts
from .slots import SlotStorage
from .store import HostExpertStore
from .transfer import TransferEngine

_RING = 2  # staging buffers for table uploads
_HITS, _MISSES, _DISTINCT, _STEPS, _BYTES, _WAVES = (
    COL[n] for n in ("hits", "misses", "distinct", "steps", "bytes_h2d", "waves")
)


class EagerExecutor:
    """Host-planned steps; serves any step (in waves when it needs more experts than slots).

    Slot masks are [K + 1] bool: entry K is a scratch target, so that indexing with a slot id
    of -1 (an expert that is not resident) needs no filtering.
    """

    def __init__(
        self,
        store: HostExpertStore,
        slots: SlotStorage,
        transfer: TransferEngine,
        eviction_policy: EvictionPolicy,
        counters: Counters,
        top_k: int,
        prefetch: str,
        extra_waves: int = 1,
    ) -> None:
        if extra_waves < 0:
            raise ValueError(f"--lynx-extra-waves must be >= 0, got {extra_waves}")
        self.store, self.slots, self.transfer = store, slots, transfer
        self.extra_waves = extra_waves  # a planned step: at most this many waves over the fewest
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
        self._no_slots = np.zeros(self.K + 1, dtype=bool)  # no slot in flight (read-only)
        self._no_slots.flags.writeable = False
        # Slots are never emptied, so once a pool has no empty slot it never has one again.
        self._full = [False] * slots.num_pools
        self._prefetched = False  # whether any slot was ever filled by prefetch
        # staging: [L + 2, E + 1] int32; rows 0..L-1 the slot table, L the wave map, L+1 its mask
        shape = (self.L + 2, self.E + 1)
        self.dev_ext = torch.full(shape, -1, dtype=torch.int32, device=self.device)
        slots.table_dev = self.dev_ext[: self.L]  # the device slot table is rows 0..L-1
        self.staging_events: list[torch.cuda.Event | None] = [None] * _RING
        self.ring = 0
        if self.host:
            # The "device" table is host memory: the host table becomes its rows 0..L-1 (no
            # uploads), and fills copy bytes: store [L][name] -> [E, B], slots [P][name] -> [K, B].
            self.staging, self.staging_np = [], []
            self._dev_np = self.dev_ext.numpy()  # [L + 2, E + 1] int32, shares memory
            self._dev_np[: self.L] = slots.table
            slots.table = self._dev_np[: self.L]
            buf = store.buffer.numpy()  # [L, E, B] uint8; B and the offsets are 256-aligned
            words = [_word(g.nbytes) for g in store.segments]
            self._src_np = [
                [
                    buf[la, :, g.offset : g.offset + g.nbytes].view(w)
                    for g, w in zip(store.segments, words)
                ]
                for la in range(self.L)
            ]
            self._dst_np = [
                [_words_view(t[p], w) for t, w in zip(slots.tensors.values(), words)]
                for p in range(slots.num_pools)
            ]
        else:
            self.staging = [
                torch.full(shape, -1, dtype=torch.int32, pin_memory=transfer.cuda)
                for _ in range(_RING)
            ]
            self.staging_np = [t.numpy() for t in self.staging]  # zero-copy host views
        # row views of the host state (its arrays are allocated once): per layer its table row,
        # per pool its slots' layer, expert, prefetched flag and last use
        self._rows = list(slots.table)
        P = range(slots.num_pools)
        self._sl, self._se = [slots.slot_layer[p] for p in P], [slots.slot_expert[p] for p in P]
        self._pf, self._lu = [slots.prefetched[p] for p in P], [slots.last_use[p] for p in P]

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
        """Make this step's experts resident; returns its waves (one unless K is too small)."""
        if captured:
            raise RuntimeError(
                "expert cache: a CUDA-graph capture reached the eager executor, which plans on the "
                "host; use --lynx-executor hybrid or --disable-cuda-graph"
            )
        E = self.E
        if self.host:
            idx = topk_ids.numpy().astype(np.int64)  # topk_ids' shape [T, k], a copy
            idx[idx < 0] = E  # padding (-1) -> column E
            need, scores_h, self.votes = self._read_host(idx, scores, votes)
        else:
            flat = topk_ids.reshape(-1).long()
            idx = torch.where(flat >= 0, flat, E)  # [T*k], padding (-1) -> column E
            need, scores_h, self.votes = self._read(idx, scores, votes)  # the one device read

        self.clock += 1
        self.busy = None  # the read above waited for every earlier kernel
        pool = self.slots.layer_pool[layer]
        needed = need.nonzero()[0]
        self.eviction_policy.observe(layer, need)
        if scores_h is not None:
            self.eviction_policy.note_scores(layer, scores_h)
        if requests is not None:
            self.eviction_policy.observe_requests(
                layer, requests, topk_ids, decode, router_logits, hidden_states
            )
        self._settle_prefetch(layer, pool, need)
        self.last_needed[layer] = needed

        slot_of = self._rows[layer][needed]  # -1: not resident
        resident = slot_of >= 0
        n_needed, n_hit = len(needed), int(np.count_nonzero(resident))
        busy_copy, capacity = self._no_slots, self.K
        if self.unsettled:
            # In-flight fills of slots this step does not read stay untouched; those it reads
            # are waited on by its compute, after which a later wave may reuse them.
            busy_copy = self._inflight(pool)
            busy_copy[slot_of] = False
            capacity = self.K - int(np.count_nonzero(busy_copy))
        if capacity < 1:  # prefetch keeps >= top_k slots free of in-flight copies
            self._count_step(layer, n_needed, n_hit, 0)
            raise RuntimeError("expert cache: every slot of the pool has a copy in flight")
        if n_needed <= capacity:  # one wave (the order of its experts changes no decision)
            self._count_step(layer, n_needed, n_hit, 1)
            self._place(layer, pool, needed, busy_copy, slot_of)
            self._upload()
            return Plan(Wave(self._translate(layer, idx, topk_ids, topk_ids.dtype)))
        chunks, stay = self._wave_chunks(layer, pool, needed, resident, capacity, busy_copy)
        self._count_step(layer, n_needed, n_hit, len(chunks))
        waves = [self._make_wave(layer, pool, c, busy_copy, stay, idx, topk_ids) for c in chunks]
        return Plan(waves[0](), waves[1:])

    def _wave_chunks(
        self, layer: int, pool: int, needed: np.ndarray, resident: np.ndarray, capacity: int,
        busy_copy: np.ndarray,
    ) -> tuple[list[np.ndarray], tuple[np.ndarray, np.ndarray] | None]:  # fmt: skip
        """A step's experts cut into waves, in the order they run, and what the plan keeps.

        Every miss is loaded once whatever the plan; the plan decides what stays. Resident
        experts run first (a hit placed after a wave of misses could be evicted before its use).
        A policy without values (LRU) cuts hits, then misses, in id order into waves of
        ``capacity``; the last wave stays. A policy with values plans the end of the step the
        way Belady's MIN does, with its values standing in for the future: the ``capacity``
        highest-valued of the pool's occupied slots and the step's misses (the running
        requests' predicted routing, with ``path``) are kept, ``stay``, and never evicted by
        the step's own fills. The others run first, through the slots ``stay`` leaves free.
        The fewer the misses among ``stay``, the fewer those slots and the more waves, so at
        least ``m`` misses stay, the smallest ``m`` that keeps the step within ``extra_waves``
        waves more than the fewest it can run in (``--lynx-extra-waves``). Returns (waves,
        stay), ``stay`` = (the misses that stay, the held slots that stay [K + 1] bool), or None.
        """
        hits, misses = needed[resident], needed[~resident]
        value = self.eviction_policy.value(np.full(len(misses), layer), misses)
        if value is None:
            ordered = np.concatenate([hits, misses])
            return [ordered[i : i + capacity] for i in range(0, len(ordered), capacity)], None
        K, C, n_hit, n_miss = self.K, capacity, len(hits), len(misses)
        sl, se = self._sl[pool], self._se[pool]
        primary, secondary = self.eviction_policy.keys(sl, se, self._lu[pool])
        held = np.flatnonzero((sl >= 0) & ~busy_copy[:K])  # occupied, settled slots
        used_now = np.zeros(K, dtype=bool)
        used_now[self._rows[layer][hits]] = True
        # the candidates, held slots then misses, ranked best first by (value, last use);
        # what the step uses now counts as used last
        p = np.concatenate([np.asarray(primary, dtype=np.float64)[held], value])
        q = np.concatenate([np.where(used_now[held], self.clock, secondary[held]),
                            np.full(n_miss, self.clock)])  # fmt: skip
        rank = np.lexsort((-q, -p))
        is_miss = rank >= len(held)
        is_hit = np.zeros(len(rank), dtype=bool)
        is_hit[~is_miss] = used_now[held[rank[~is_miss]]]
        # stay: the C best; s more misses stay by dropping the s lowest-ranked non-misses
        misses0 = int(np.count_nonzero(is_miss[:C]))
        dropped = np.flatnonzero(~is_miss[:C])[::-1]  # lowest-ranked first
        hits_dropped = np.concatenate([[0], np.cumsum(is_hit[dropped])])
        hits0 = int(np.count_nonzero(is_hit[:C]))
        others0 = min(C, len(rank)) - misses0 - hits0

        def loads(m: int) -> list[int]:  # misses each wave loads when m misses stay
            d = int(hits_dropped[m - misses0])
            return _wave_loads(C, n_hit, n_miss, m, hits0 - d, others0 - (m - misses0 - d))

        fewest = -(-(n_hit + n_miss) // C)
        lo, hi = max(1, misses0), min(n_miss, C)
        while lo < hi:  # the fewest staying misses within the extra waves (monotone in m)
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if len(loads(mid)) <= fewest + self.extra_waves else (mid + 1, hi)
        stay = np.zeros(len(rank), dtype=bool)
        stay[:C] = True
        stay[dropped[: lo - misses0]] = False
        stay[np.flatnonzero(~stay & is_miss)[: lo - misses0]] = True
        stays = np.zeros(len(rank), dtype=bool)
        stays[rank] = stay  # candidate order
        miss_stays = stays[len(held) :]
        by_value = np.argsort(value, kind="stable")
        ordered = misses[
            np.concatenate([by_value[~miss_stays[by_value]], by_value[miss_stays[by_value]]])
        ]
        chunks, at = [], 0
        for take in loads(lo):
            chunks.append(ordered[at : at + take])
            at += take
        chunks[0] = np.concatenate([hits, chunks[0]])
        held_slots = np.zeros(K + 1, dtype=bool)  # [K + 1]: held slots that stay
        held_slots[held[stays[: len(held)]]] = True
        return chunks, (misses[miss_stays], held_slots)

    def _count_step(self, layer: int, needed: int, hits: int, waves: int) -> None:
        row = self.counters.host[layer]
        row[_HITS] += hits
        row[_MISSES] += needed - hits
        row[_DISTINCT] += needed
        row[_STEPS] += 1
        row[_BYTES] += (needed - hits) * self._bytes
        row[_WAVES] += waves

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
        # the dtype torch.cat gives ``_read``'s parts: float32 unless the votes are wider
        kind = torch.float32
        if votes is not None and votes.dtype != torch.float32:
            kind = torch.promote_types(torch.float32, votes.dtype)
        scores_h = votes_h = None
        if scores is not None:
            # read at once by the eviction policy, never kept: a view of a float32 tensor will do
            f32 = scores if scores.dtype == torch.float32 else scores.float()
            scores_h = f32.numpy().reshape(E) if kind == torch.float32 else _host_copy(f32, kind, E)
        if votes is not None:
            votes_h = _host_copy(votes, kind, E)
        return need, scores_h, votes_h

    def _translate(self, row: int, idx, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Row ``row`` of the device table (+ wave rows) at ``idx``, shaped as ``like``."""
        if self.host:  # idx has the shape of ``like``
            out = self._dev_np[row].take(idx)
            want = _NP.get(dtype)
            if want is None:
                want = _np_dtype(dtype)
            return torch.from_numpy(out if out.dtype == want else out.astype(want))
        return self.dev_ext[row].index_select(0, idx).view_as(like).to(dtype)

    # ---------------------------------------------------------------- placement
    def _place(
        self,
        layer: int,
        pool: int,
        experts: np.ndarray,
        keep: np.ndarray,
        slot_of: np.ndarray | None = None,
    ) -> np.ndarray:
        """Make ``experts`` (<= capacity) resident in ``pool`` without touching ``keep`` [K + 1].
        ``slot_of``: their slots now (-1: not resident; a new array this call may change)."""
        used = self._rows[layer][experts] if slot_of is None else slot_of
        miss = used < 0
        n_miss = int(np.count_nonzero(miss))
        if n_miss:
            protected = keep.copy()
            protected[used] = True  # this wave's resident experts stay (misses: scratch K)
            misses = experts[miss]
            victims = self._victims(pool, n_miss, protected)
            self.transfer.begin()
            self._fill(layer, misses, pool, victims)
            used[miss] = victims
        self._lu[pool][used] = self.clock
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
        stay: tuple[np.ndarray, np.ndarray] | None,
        idx,
        topk_ids: torch.Tensor,
    ):
        """A deferred wave: its fills are issued when the caller reaches it, never over the
        slots of ``stay`` (``_wave_chunks``) that are resident by then."""

        def make() -> Wave:
            protect = keep
            if stay is not None:
                stay_misses, held_slots = stay
                protect = held_slots | keep
                slots = self._rows[layer][stay_misses]
                protect[slots[slots >= 0]] = True
            used = self._place(layer, pool, experts, protect)
            stage = self._next_staging()
            wave_map, wave_mask = stage[self.L], stage[self.L + 1]
            wave_map.fill(used[0])  # choices of other waves point at a filled slot
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
        """``count`` slots to overwrite: empty first, then by the eviction policy. ``protected``
        [K + 1] (or [K]): slots that must stay."""
        if count == 0:
            return np.zeros(0, dtype=np.int64)
        K = self.K
        protected = protected[:K]
        free = K - int(np.count_nonzero(protected))
        if free < count:
            raise RuntimeError(f"expert cache: {count} fills but only {free} evictable slots")
        sl = self._sl[pool]
        # Keys of every slot of the pool (an empty slot's (-1, -1) picks some value that -inf
        # replaces); protected slots sort after all others: they are the most significant key.
        primary, secondary = self.eviction_policy.keys(sl, self._se[pool], self._lu[pool])
        if not self._full[pool]:
            empty = sl < 0
            if np.count_nonzero(empty):
                primary = np.where(empty, -np.inf, primary)
            else:
                self._full[pool] = True
        if primary is secondary:  # LRU: recency only
            return np.lexsort((primary, protected))[:count]
        return np.lexsort((secondary, primary, protected))[:count]

    def _fill(self, layer: int, experts: np.ndarray, pool: int, slots: np.ndarray) -> None:
        """Evict the occupants of ``slots`` (counting wasted prefetches) and copy ``experts``
        (distinct, none resident) of ``layer`` into them, pairwise."""
        s = self.slots
        slot_layer, slot_expert, prefetched = self._sl[pool], self._se[pool], self._pf[pool]
        old_layer, old_expert = slot_layer[slots], slot_expert[slots]
        if self._prefetched and np.count_nonzero(prefetched):
            wasted = prefetched[slots] & (old_layer >= 0)
            if np.count_nonzero(wasted):
                self.counters.add_each("prefetch_wasted", old_layer[wasted])
            prefetched[slots] = False
        # an empty slot holds (-1, -1): its write lands on table[L - 1, E], padding, always -1
        s.table[old_layer, old_expert] = -1
        self._rows[layer][experts] = slots
        slot_layer[slots] = layer
        slot_expert[slots] = experts
        if self.host:  # one gather-scatter of bytes per named tensor
            for src, dst in zip(self._src_np[layer], self._dst_np[pool]):
                dst[slots] = src.take(experts, axis=0)
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
        """[K + 1] bool: slots of ``pool`` whose latest fill has not finished (non-blocking
        queries; entry K is scratch, False)."""
        mask = np.zeros(self.K + 1, dtype=bool)
        for g in list(self.unsettled):
            if not self.transfer.in_flight(g):
                self.unsettled.discard(g)
            elif g // self.K == pool:
                mask[g % self.K] = True
        return mask

    # ---------------------------------------------------------------- prefetch
    def _settle_prefetch(self, layer: int, pool: int, need: np.ndarray) -> None:
        """Score this layer's prefetched slots against the step that now arrived."""
        pf = self._pf[pool]
        if not (self._prefetched and np.count_nonzero(pf)):
            return
        sel = pf & (self._sl[pool] == layer)
        if np.count_nonzero(sel):
            used = need[self._se[pool][sel]]
            n_used = int(np.count_nonzero(used))
            self.counters.add(layer, prefetch_hits=n_used, prefetch_wasted=len(used) - n_used)
            pf[sel] = False

    def end_step(self, layer: int) -> None:
        """After the step's waves: the next layer's prefetch (when on)."""
        if self.prefetch_mode != "off":
            self.prefetch_next(layer)

    def note_pulled(self) -> None:
        """The host state was overwritten from the device (hybrid): drop what it implied."""
        self._full = [False] * self.slots.num_pools
        self._prefetched = self._prefetched or bool(self.slots.prefetched.any())

    def order_compute_after_copies(self) -> None:
        """Make later work on the compute stream wait for every fill issued so far."""
        if self.transfer.cuda:
            torch.cuda.current_stream(self.device).wait_stream(self.transfer.stream)

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
        row = self._rows[layer]
        ranked = np.asarray(ranked, dtype=np.int64)
        present = row[ranked]
        wanted = ranked[present < 0]
        if len(wanted) == 0:
            return 0
        inflight = self._inflight(pool)
        protected = inflight.copy()
        protected[present] = True  # keep predicted experts already resident (-1: scratch K)
        if self.busy is not None and self.busy[0] == pool:
            protected[self.busy[1]] = True
        n_protected = int(np.count_nonzero(protected[: self.K]))
        budget = self.K - self.top_k - int(np.count_nonzero(inflight))
        count = max(0, min(len(wanted), self.K - n_protected, budget))
        if count == 0:
            return 0
        victims = self._victims(pool, count, protected)
        self.transfer.begin()
        self._fill(layer, wanted[:count], pool, victims)
        self._pf[pool][victims] = True
        self._prefetched = True
        self._lu[pool][victims] = self.clock
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
        if self.host:  # the device table is the host table
            return
        if stage is None:
            stage = self._next_staging()
        stage[: self.L] = self.slots.table
        self.dev_ext.copy_(self.staging[self.ring], non_blocking=True)
        if self.transfer.cuda:
            ev = torch.cuda.Event()
            ev.record()
            self.staging_events[self.ring] = ev


_NP = {
    torch.float32: np.dtype(np.float32),
    torch.float64: np.dtype(np.float64),
    torch.int32: np.dtype(np.int32),
    torch.int64: np.dtype(np.int64),
}


def _wave_loads(capacity: int, hits: int, misses: int, misses_stay: int, hits_stay: int,
                others_stay: int) -> list[int]:  # fmt: skip
    """Misses each wave of a planned multi-wave step loads (``EagerExecutor._wave_chunks``):
    the first wave runs every hit and fills the slots no staying resident holds; each later
    wave fills the slots of the staying misses not loaded yet (the staying misses run last)."""
    out = [min(capacity - hits - others_stay, misses)]
    done = out[0]
    while done < misses:
        loaded = max(0, done - (misses - misses_stay))
        take = min(capacity - hits_stay - others_stay - loaded, misses - done)
        out.append(take)
        done += take
    return out


def _np_dtype(dtype: torch.dtype) -> np.dtype:
    return torch.empty((), dtype=dtype).numpy().dtype


def _host_copy(t: torch.Tensor, kind: torch.dtype, size: int) -> np.ndarray:
    """A CPU tensor of ``size`` elements as a new [size] numpy array of dtype ``kind``."""
    if t.dtype != kind:
        t = t.to(kind)
    return t.numpy().reshape(size).copy()


def _word(nbytes: int) -> np.dtype:
    """The widest unsigned word that divides ``nbytes`` (fewer, wider element copies)."""
    for w in (np.uint64, np.uint32, np.uint16):
        if nbytes % np.dtype(w).itemsize == 0:
            return np.dtype(w)
    return np.dtype(np.uint8)


def _words_view(t: torch.Tensor, word: np.dtype) -> np.ndarray:
    """[K, *shape] contiguous CPU tensor -> [K, words per slot] numpy view (any dtype)."""
    return t.view(torch.uint8).reshape(t.shape[0], -1).numpy().view(word)
