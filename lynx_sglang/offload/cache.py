"""ExpertCache: the one object a MoE layer's forward talks to when experts are offloaded.

    plan = cache.prepare(layer, topk_ids)            # experts resident, ids -> slot ids
    w = cache.slot_weights(layer)                     # {"w13": [K, 2I, H], "w2": [K, H, I]}
    out = fused_moe(x, w["w13"], w["w2"], plan.slot_ids, plan.weights(topk_weights))
(the kernel is unchanged; ``plan.weights`` is a no-op unless the graph executor had to poison a
step it could not serve), or, exact in every case (also when a step needs more experts than
slots, which then runs in waves):
    out = cache.forward(layer, x, topk_ids, topk_weights, fused_moe_ref)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch

from .counters import Counters
from .eager import EagerExecutor
from .eviction import make_policy
from .graph import GraphExecutor
from .plan import Plan
from .prefetch import MODES as PREFETCH_MODES
from .prefetch import PrefetchSelect, cross_layer_votes
from .slots import SlotStorage
from .store import HostExpertStore
from .transfer import TransferEngine

if TYPE_CHECKING:
    from lynx_sglang.config import LynxConfig

# compute_fn(x [T, H], w13 [K, 2I, H], w2 [K, H, I], slot_ids [T, k], topk_weights [T, k]) -> [T, H]
ComputeFn = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor
]


class ExpertCache:
    """GPU slots in front of a host expert store: residency, eviction, transfers, prefetch, counters."""

    def __init__(
        self,
        store: HostExpertStore,
        slots: int,
        device: torch.device | str,
        top_k: int,
        eviction: str = "lru",
        lfu_decay: float = 0.9,
        slot_pool: str = "layer",
        executor: str = "eager",
        prefetch: str = "off",
        *,
        pool_slots: int | None = None,
        gather_backend: str = "auto",
    ) -> None:
        L, E = store.num_layers, store.num_experts
        if top_k < 1 or top_k > E:
            raise ValueError(f"top_k must be in [1, {E}], got {top_k}")
        if slot_pool == "layer" and slots < top_k:
            raise ValueError(
                f"--lynx-slots={slots} is below top_k={top_k}: every token's {top_k} experts "
                "must fit the slots at once"
            )
        if slot_pool not in ("layer", "shared"):
            raise ValueError(f"--lynx-slot-pool must be layer or shared; got {slot_pool!r}")
        if executor not in ("eager", "graph"):
            raise ValueError(f"--lynx-executor must be eager or graph; got {executor!r}")
        if prefetch not in PREFETCH_MODES:
            raise ValueError(
                f"--lynx-prefetch must be one of {', '.join(PREFETCH_MODES)}; got {prefetch!r}"
            )
        if gather_backend not in ("auto", "triton", "torch"):
            raise ValueError(
                f"gather_backend must be auto, triton or torch; got {gather_backend!r}"
            )
        self.store = store
        self.device = torch.device(device)
        self.top_k = top_k
        self.eviction, self.slot_pool, self.executor_name = eviction, slot_pool, executor
        self.prefetch_mode = prefetch
        if slot_pool == "layer":
            num_pools, pool_size, layer_pool = L, min(slots, E), list(range(L))
        else:  # one pool; by default the same GPU memory as `slots` per layer
            total = pool_slots if pool_slots is not None else slots * L
            if total < top_k:
                raise ValueError(
                    f"--lynx-slots: a shared pool of {total} slots is below top_k={top_k}: every "
                    f"token's {top_k} experts must fit the slots at once"
                )
            num_pools, pool_size, layer_pool = 1, min(total, L * E), [0] * L
        self.num_slots = pool_size  # K: slot ids are in [0, K)
        self.slots = SlotStorage(store, num_pools, pool_size, layer_pool, self.device)
        self._counters = Counters(L)
        like = "numpy" if executor == "eager" else self.device
        self.policy = make_policy(eviction, L, E, like, lfu_decay)
        if executor == "eager":
            transfer = TransferEngine(self.device, num_pools * pool_size)
            self.executor = EagerExecutor(
                store, self.slots, transfer, self.policy, self._counters, top_k, prefetch
            )
        else:
            self.executor = GraphExecutor(
                store, self.slots, self.policy, self._counters, top_k, prefetch, gather_backend
            )

    @classmethod
    def from_config(
        cls, store: HostExpertStore, cfg: LynxConfig, device: torch.device | str, top_k: int
    ) -> ExpertCache:
        """Build from the plugin config (``slots=0`` means one slot per expert: all resident)."""
        return cls(
            store,
            slots=cfg.slots or store.num_experts,
            device=device,
            top_k=top_k,
            eviction=cfg.eviction,
            lfu_decay=cfg.lfu_decay,
            slot_pool=cfg.slot_pool,
            executor=cfg.executor,
            prefetch=cfg.prefetch,
        )

    # ---------------------------------------------------------------- the step
    def slot_weights(self, layer: int) -> dict[str, torch.Tensor]:
        """The slot tensors the fused MoE kernel reads for this layer: {"w13": [K, 2I, H], ...}."""
        return self.slots.weights(self.slots.layer_pool[layer])

    def prepare(
        self,
        layer: int,
        topk_ids: torch.Tensor,
        scores: torch.Tensor | None = None,
        hidden: torch.Tensor | None = None,
    ) -> Plan:
        """Make the experts of ``topk_ids`` [T, k] resident; returns the waves to run.

        ``plan.slot_ids`` ([T, k], topk_ids' dtype, in [0, K)) in the one-wave case. ``scores``
        [E] feed score-aware eviction; ``hidden`` [T, H] (this layer's MoE input) feeds the
        cross-layer prefetch of the next layer when its router was given (``set_router``).
        """
        return self.executor.prepare(layer, topk_ids, scores, hidden)

    def forward(
        self,
        layer: int,
        x: torch.Tensor,
        topk_ids: torch.Tensor,
        topk_weights: torch.Tensor,
        compute_fn: ComputeFn,
        scores: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Exact MoE output through the cache: compute_fn per wave, summed. x: [T, H] -> [T, H]."""
        plan = self.prepare(layer, topk_ids, scores, hidden=x)
        w = self.slot_weights(layer)
        if plan.single:
            return compute_fn(x, w["w13"], w["w2"], plan.slot_ids, plan.weights(topk_weights))
        out = None
        for wave in plan:
            y = compute_fn(x, w["w13"], w["w2"], wave.slot_ids, wave.weights(topk_weights)).float()
            out = y if out is None else out + y
        return out.to(x.dtype)

    # ---------------------------------------------------------------- prefetch
    def set_router(self, layer: int, weight: torch.Tensor) -> None:
        """Give the cache layer ``layer``'s router weight [E, H] (for cross-layer prefetch)."""
        if weight.shape[0] != self.store.num_experts:
            raise ValueError(
                f"router weight must be [E={self.store.num_experts}, H], got {tuple(weight.shape)}"
            )
        self.executor.routers[layer] = weight

    def set_prefetch_select(self, select: PrefetchSelect | None) -> None:
        """Pass predicted routing through ``select(layer, topk_ids, logits) -> topk_ids`` before copying."""
        self.executor.select = select

    def predict_next(
        self, layer: int, hidden: torch.Tensor, router_weight_next: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Votes per expert of layer+1 from layer+1's router on ``hidden`` [T, H]: [E] float32, device."""
        router = (
            router_weight_next
            if router_weight_next is not None
            else self.executor.routers[layer + 1]
        )
        return cross_layer_votes(hidden, router, self.top_k, layer + 1, self.executor.select)

    def prefetch(self, layer: int, experts: torch.Tensor | np.ndarray | list[int]) -> None:
        """Start copying ``experts`` (ids, best first, or an [E] bool mask) of ``layer`` into free slots.

        Outside ``prepare`` this reads the ids to the host (a sync for device tensors); inside a
        step use ``prepare(..., hidden=...)``, which packs the prediction into its one read.
        """
        ids = _as_ids(experts, self.store.num_experts)
        if isinstance(self.executor, EagerExecutor):
            self.executor.prefetch(layer, ids)
            self.executor.sync_table()
            return
        score = torch.zeros(self.store.num_experts, dtype=torch.float32, device=self.device)
        score[torch.as_tensor(ids, device=self.device)] = torch.arange(
            len(ids), 0, -1, dtype=torch.float32, device=self.device
        )
        self.executor.prefetch(layer, score)

    # ---------------------------------------------------------------- state
    def note_scores(self, layer: int, scores: torch.Tensor) -> None:
        """Selection scores [E] of ``layer``'s coming step (used by score-aware eviction)."""
        self.executor.pending_scores[layer] = scores

    def resident_mask(self, layer: int) -> torch.Tensor:
        """[E] bool on the device: which experts of ``layer`` sit in a slot (cache-aware selection)."""
        if isinstance(self.executor, GraphExecutor):
            self.executor.wait_prefetch(layer)
        return self.slots.table_dev[layer, : self.store.num_experts] >= 0

    def slot_table(self, layer: int) -> torch.Tensor:
        """Slot -> expert of ``layer``'s pool on the device: [K] int64 holding layer * E + expert
        (-1 = empty), derived from the device expert -> slot table without a host read."""
        E, K = self.store.num_experts, self.num_slots
        pool = self.slots.layer_pool[layer]
        layers = [i for i, p in enumerate(self.slots.layer_pool) if p == pool]
        table = self.slots.table_dev[layers, :E].long()  # [L_pool, E]
        ids = torch.tensor(layers, device=self.device)[:, None] * E + torch.arange(
            E, device=self.device
        )
        out = torch.full((K + 1,), -1, dtype=torch.int64, device=self.device)
        out.scatter_(0, torch.where(table >= 0, table, K).flatten(), ids.flatten())
        return out[:K]

    def counters(self, reset: bool = True) -> dict:
        """Per-layer and total counters: hits, misses, prefetch hits/wasted, bytes, distinct, steps."""
        return self._counters.read(reset)

    def check_overflow(self) -> None:
        """Graph executor: raise if a step could not be served (a device read; call between steps)."""
        if isinstance(self.executor, GraphExecutor):
            self.executor.check_overflow()


def _as_ids(experts: torch.Tensor | np.ndarray | list[int], num_experts: int) -> np.ndarray:
    """Expert ids (order kept) from ids or an [E] bool mask, on the host."""
    if isinstance(experts, torch.Tensor):
        experts = experts.detach().cpu().numpy()
    arr = np.asarray(experts)
    if arr.dtype == bool:
        if arr.shape != (num_experts,):
            raise ValueError(f"expert mask must be [{num_experts}] bool, got {arr.shape}")
        return np.flatnonzero(arr)
    arr = arr.astype(np.int64).reshape(-1)
    if arr.size and (arr.min() < 0 or arr.max() >= num_experts):
        raise ValueError(f"expert ids must be in [0, {num_experts})")
    _, first = np.unique(arr, return_index=True)
    return arr[np.sort(first)]
