"""ExpertCache: GPU slots in front of the host expert store, the one object a layer's step asks.

    plan = cache.prepare(layer, topk_ids)        # experts resident, ids -> slot ids, in waves
    experts = cache.slot_weights(layer)          # {"w13": [K, 2I, H], "w2": [K, H, I]}
    for wave in plan: kernel(x, wave.slot_ids, wave.weights(topk_weights), experts)
    cache.end_step(layer)                        # the next layer's predicted experts start moving

``lynx_sglang.step.moe_layer_step`` is the one place that runs this sequence. The executor (eager:
host-planned, any step, in waves; graph: device-planned, fixed shapes, CUDA-graph safe; hybrid:
captured steps on the graph one, the rest eager, one state) is chosen once at construction; all
three implement the same contract (``Executor``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch

from lynx_sglang.config import EVICTIONS, EXECUTORS, PREFETCHES, SLOT_POOLS, CacheParams
from lynx_sglang.selection.routing import SOFTMAX_TOPK, Routing

from .counters import Counters
from .eager import EagerExecutor
from .eviction import make_policy
from .graph import GraphExecutor
from .hybrid import HybridExecutor
from .path import PathPredictor, RequestHistory, RequestPathPolicy
from .plan import Plan
from .slots import SlotStorage
from .store import HostExpertStore
from .transfer import TransferEngine

if TYPE_CHECKING:
    from lynx_sglang.config import LynxConfig


class Executor(Protocol):
    """What both executors do for a layer's step (state lives in ``SlotStorage``)."""

    routers: dict[int, torch.Tensor]

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
    ) -> Plan: ...

    def end_step(self, layer: int) -> None: ...

    def prefetch_ranked(self, layer: int, experts: np.ndarray) -> None: ...

    def resident_mask(self, layer: int) -> torch.Tensor: ...

    def check_overflow(self) -> None: ...


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
        prefetch_select: bool = True,
        pool_slots: int | None = None,
        gather_backend: str = "auto",
        path_decay: float = 0.95,
        max_requests: int = 0,
        path_predictor: PathPredictor | None = None,
        extra_waves: int = 1,
    ) -> None:
        L, E = store.num_layers, store.num_experts
        if top_k < 1 or top_k > E:
            raise ValueError(f"top_k must be in [1, {E}], got {top_k}")
        if slot_pool == "layer" and slots < top_k:
            raise ValueError(
                f"--lynx-slots={slots} is below top_k={top_k}: every token's {top_k} experts "
                "must fit the slots at once"
            )
        _choice("--lynx-slot-pool", slot_pool, SLOT_POOLS)
        _choice("--lynx-executor", executor, EXECUTORS)
        _choice("--lynx-prefetch", prefetch, PREFETCHES)
        _choice("--lynx-eviction", eviction, EVICTIONS)
        _choice("gather_backend", gather_backend, ("auto", "triton", "torch"))
        self.store = store
        self.device = torch.device(device)
        self.top_k = top_k
        self.eviction, self.slot_pool, self.executor_name = eviction, slot_pool, executor
        self.prefetch_mode = prefetch
        self.prefetch_select = prefetch_select  # pass the prediction through the selection
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
        # path eviction: the running requests' routing, one history for both executors
        self.requests = None
        if path_predictor is not None and eviction != "path":
            raise ValueError("--lynx-path-predictor is read by --lynx-eviction path only")
        if eviction == "path":
            rows = max_requests + 1 if max_requests else 0
            self.requests = RequestHistory(L, E, self.device, path_decay, rows, path_predictor)

        def policy(like):
            if self.requests is not None:
                return RequestPathPolicy(self.requests, like)
            return make_policy(eviction, L, E, like, lfu_decay)

        self.executor: Executor
        if executor in ("eager", "hybrid"):  # host planning on numpy; built first (see hybrid)
            transfer = TransferEngine(self.device, num_pools * pool_size)
            self.executor = eager = EagerExecutor(
                store, self.slots, transfer, policy("numpy"), self._counters, top_k, prefetch,
                extra_waves,
            )  # fmt: skip
        if executor in ("graph", "hybrid"):  # device planning: its tensors are the state
            self.executor = device = GraphExecutor(
                store, self.slots, policy(self.device), self._counters, top_k, prefetch,
                gather_backend,
            )  # fmt: skip
        if executor == "hybrid":
            self.executor = HybridExecutor(eager, device)
        self.routings: dict[int, Routing] = {}  # layer -> routing rule, with its router

    @classmethod
    def from_config(
        cls, store: HostExpertStore, cfg: LynxConfig | CacheParams, device: torch.device | str,
        top_k: int,
        hidden_size: int | None = None,
    ) -> ExpertCache:  # fmt: skip
        """Build from the cache section of the plugin config (``slots=0``: all resident);
        ``hidden_size``: the model's H, which a learned path predictor is checked against."""
        c = cfg if isinstance(cfg, CacheParams) else cfg.cache
        predictor = None
        if c.path_predictor:
            predictor = PathPredictor.load(
                c.path_predictor, store.num_layers, store.num_experts, c.path_decay, hidden_size
            )
        return cls(
            store,
            slots=c.slots or store.num_experts,
            device=device,
            top_k=top_k,
            eviction=c.eviction,
            lfu_decay=c.lfu_decay,
            path_decay=c.path_decay,
            path_predictor=predictor,
            extra_waves=c.extra_waves,
            slot_pool=c.slot_pool,
            executor=c.executor,
            prefetch=c.prefetch,
            prefetch_select=c.prefetch_select,
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
        votes: torch.Tensor | None = None,
        captured: bool = False,
        requests: torch.Tensor | None = None,
        decode: bool = False,
        router_logits: torch.Tensor | None = None,
        hidden_states: torch.Tensor | None = None,
    ) -> Plan:
        """Make the experts of ``topk_ids`` [T, k] (-1: padding) resident; returns the waves.

        ``plan.slot_ids`` ([T, k], topk_ids' dtype, in [0, K)) in the one-wave case. ``scores``
        [E] (the selection's batch scores) feed score-aware eviction; ``votes`` [E] (the next
        layer's predicted experts, ``step.predict_votes``) feed its cross-layer prefetch, which
        ``end_step`` starts. ``captured``: the step is being captured in a CUDA graph: only the
        device-side planning can serve it (graph or hybrid executor; eager raises).
        ``requests`` [T]: the request row of each row of ``topk_ids`` (SGLang's req_pool_idx;
        0: padding), on a ``decode`` step or a prefill; path eviction learns from them, and a
        learned path predictor also reads the step's ``router_logits`` [T, E] and its MoE input
        ``hidden_states`` [T, H].
        """
        if requests is not None and self.requests is not None:
            if requests.shape[0] != topk_ids.shape[0]:
                raise ValueError(
                    f"expert cache: {requests.shape[0]} request rows for {topk_ids.shape[0]} "
                    "routed rows"
                )
        else:
            requests = router_logits = hidden_states = None
        return self.executor.prepare(layer, topk_ids, scores, votes, captured, requests, decode,
                                     router_logits, hidden_states)  # fmt: skip

    def reserve_requests(self, rows: int) -> None:
        """Path eviction: hold ``rows`` request rows (SGLang's request pool size + 1), before
        any CUDA-graph capture. No-op for other policies."""
        if self.requests is not None:
            self.requests.reserve(rows)

    def end_step(self, layer: int) -> None:
        """The step's last call, after its waves: the next layer's predicted experts start
        copying (prefetch on), and a hybrid cache publishes what the host planned."""
        self.executor.end_step(layer)

    # ---------------------------------------------------------------- prefetch
    def set_router(self, layer: int, weight: torch.Tensor, routing: Routing = SOFTMAX_TOPK) -> None:
        """Give the cache layer ``layer``'s router weight [E, H] and its routing rule (for
        cross-layer prefetch: the prediction chooses the way the model does)."""
        if weight.shape[0] != self.store.num_experts:
            raise ValueError(
                f"router weight must be [E={self.store.num_experts}, H], got {tuple(weight.shape)}"
            )
        self.executor.routers[layer] = weight
        self.routings[layer] = routing

    def predicts(self, layer: int) -> bool:
        """Whether the step of ``layer`` should predict the next layer's experts (cross-layer)."""
        return (
            self.prefetch_mode in ("cross-layer", "both")
            and layer + 1 < self.store.num_layers
            and layer + 1 in self.executor.routers
        )

    def router(self, layer: int) -> torch.Tensor:
        """Layer ``layer``'s router weight [E, H] (given by ``set_router``)."""
        return self.executor.routers[layer]

    def routing(self, layer: int) -> Routing:
        """Layer ``layer``'s routing rule (given by ``set_router``)."""
        return self.routings[layer]

    def prefetch(self, layer: int, experts: torch.Tensor | np.ndarray | list[int]) -> None:
        """Start copying ``experts`` (ids, best first, or an [E] bool mask) of ``layer`` into
        free slots, outside any step (it reads device ids to the host)."""
        self.executor.prefetch_ranked(layer, _as_ids(experts, self.store.num_experts))

    # ---------------------------------------------------------------- state
    def resident_mask(self, layer: int, captured: bool = False) -> torch.Tensor:
        """[E] bool on the device: which experts of ``layer`` sit in a slot (cache-aware selection)."""
        return self.executor.resident_mask(layer)

    def counters(self, reset: bool = True) -> dict:
        """Per-layer and total counters: hits, misses, prefetch hits/wasted, bytes, distinct, steps."""
        return self._counters.read(reset)

    def check_overflow(self) -> None:
        """Graph executor: raise if a step could not be served (a device read; call between steps)."""
        self.executor.check_overflow()


def _choice(flag: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{flag} must be one of {', '.join(allowed)}; got {value!r}")


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
