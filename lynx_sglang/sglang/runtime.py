"""The plugin's state in one SGLang worker process: config, the forward step, stats, the cache.

One ``LynxRuntime`` per process, created by the model-load hook (``activate``) and read by the
other hooks (``active``); this module's ``_ACTIVE`` slot is the plugin's only mutable global.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Optional

import torch

from lynx_sglang.config import LynxConfig
from lynx_sglang.offload.admission import OverlapAdmission, PromptProfiler
from lynx_sglang.selection.routing import SOFTMAX_TOPK, Routing
from lynx_sglang.selection.similarity import expert_similarity
from lynx_sglang.selection.types import ExpertSimilarity
from lynx_sglang.sglang.checks import (
    UnsupportedConfig,
    checkpoint_quantization,
    moe_layer_ids,
    num_experts_of,
    text_config,
)
from lynx_sglang.step import (
    NOT_DECODE,
    SelectionStats,
    Step,
    decode_capture_cap,
)


class CaptureTooLarge(RuntimeError):
    """A CUDA-graph capture larger than the expert cache can serve in every step (one line)."""


@dataclass(frozen=True)
class ModelFacts:
    """The shapes of the model's routed experts, read once from its Hugging Face config."""

    num_experts: int  # E
    top_k: int  # k
    hidden_size: int  # H
    intermediate_size: int  # I (per expert)
    moe_layer_ids: tuple[int, ...]  # decoder layers that have routed experts
    dtype: torch.dtype
    quantization: Optional[str] = None  # the checkpoint's quantisation (None: bf16/fp16 experts)

    def dense_layout(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """One unquantised expert's tensors: {"w13": ([2I, H], dtype), "w2": ([H, I], dtype)}."""
        H, inter = self.hidden_size, self.intermediate_size
        return {"w13": ((2 * inter, H), self.dtype), "w2": ((H, inter), self.dtype)}

    @classmethod
    def from_hf_config(cls, hf_config: Any, dtype: torch.dtype) -> ModelFacts:
        """Mixtral / Qwen2-MoE / Qwen3-MoE / Qwen3-Next / Qwen3.5 / OLMoE / DeepSeek / GLM-4.5
        config fields (a multimodal config's text part)."""
        text = text_config(hf_config)
        inter = getattr(text, "moe_intermediate_size", None) or text.intermediate_size
        return cls(
            quantization=checkpoint_quantization(hf_config),
            num_experts=num_experts_of(text),
            top_k=text.num_experts_per_tok,
            hidden_size=text.hidden_size,
            intermediate_size=inter,
            moe_layer_ids=moe_layer_ids(hf_config),
            dtype=dtype,
        )


class LynxRuntime:
    """Config, step state, selection and (with offload) the host store plus GPU expert cache."""

    def __init__(
        self, cfg: LynxConfig, model: ModelFacts, device: torch.device, stats: bool = False
    ) -> None:
        self.cfg = cfg
        self.model = model
        self.device = torch.device(device)
        self.step = NOT_DECODE
        # Each MoE layer's routing rule (read off its TopK when the model has loaded).
        self.routing: list[Routing] = [SOFTMAX_TOPK] * len(model.moe_layer_ids)
        # MoE decoder layer id -> dense index into the store / cache / stats ([L] tables).
        self.layer_index = {lid: i for i, lid in enumerate(model.moe_layer_ids)}
        num_layers = len(model.moe_layer_ids)
        self.selection = cfg.selection if cfg.selection_on else None
        # K, slots per layer (0: every expert resident), and what follows from it: the bounded
        # selection of captured steps and the capture cap. Known here unless K comes from
        # --lynx-slot-memory-gib and a quantised format whose bytes the first layer states.
        self.slots: Optional[int] = None
        self.capture_cap: Optional[int] = None
        if cfg.offload_on and not cfg.slot_memory_gib:
            self._set_slots(cfg.slots)
        elif cfg.offload_on and self.dense_experts:
            self._set_slots(self._slots_from_memory(model.dense_layout()))
        self.stats = (
            SelectionStats(num_layers, model.num_experts, self.device)
            if stats and cfg.selection_on
            else None
        )
        # The real row count of a captured decode graph, written before every replay.
        self.graph_rows = torch.zeros((), dtype=torch.int32, device=self.device)
        # Path eviction reads each row's request (req_pool_idx): a captured graph reads them
        # from this buffer, written before every replay (allocated at the first capture).
        self.reads_requests = cfg.offload_on and cfg.eviction == "path"
        self.graph_requests: Optional[torch.Tensor] = None
        self.reporter: Any = None  # metrics.Reporter, ticked after every forward
        # With offload: the host store and GPU slots. Their layout is the experts' format: known
        # here for bf16/fp16 experts; for a quantised checkpoint the first MoE layer states it
        # (its quant method's per-expert tensors, scales included), through ``cache_for``.
        self.cache = None
        if cfg.offload_on and self.dense_experts:
            self.cache = _build_cache(cfg, model, self.device, model.dense_layout(), self.slots)
        # The "similar" policy's expert similarity per MoE layer, filled as each layer loads.
        self.similarity: Optional[list[Optional[ExpertSimilarity]]] = None
        if self.selection is not None and self.selection.policy == "similar":
            self.similarity = [None] * num_layers
        # --lynx-admission overlap: the queue order and the prompt profiler (set once loaded),
        # and the profile of each waiting request, by rid.
        self.admission = (
            OverlapAdmission(cfg.admission_max_passed)
            if cfg.offload_on and cfg.admission == "overlap"
            else None
        )
        self.profiler: Optional[PromptProfiler] = None
        self._profiles: dict[Any, tuple[int, torch.Tensor]] = {}  # rid -> (first seen, profile)
        self._seen = 0

    def note_expert_weights(self, index: int, w13: torch.Tensor, w2: torch.Tensor) -> None:
        """A MoE layer's expert weights are loaded: compute what the policy needs of them."""
        if self.similarity is not None:
            threshold = self.selection.similar_threshold
            self.similarity[index] = expert_similarity(w13, w2, threshold, self.device)

    @property
    def dense_experts(self) -> bool:
        """The experts are paged as bf16/fp16 rows, their layout known from the config alone."""
        return self.model.quantization is None and self.cfg.expert_format == "checkpoint"

    def cache_for(self, layout: dict, layer_id: int):
        """The expert cache for experts of ``layout`` ({name: (row shape, dtype)}, one expert's
        tensors): built at the first MoE layer, and every other layer must have the same."""
        if self.cache is None:
            if self.slots is None:
                self._set_slots(self._slots_from_memory(layout))
            self.cache = _build_cache(self.cfg, self.model, self.device, layout, self.slots)
        have = {s.name: (s.shape, s.dtype) for s in self.cache.store.segments}
        if have != layout:
            raise UnsupportedConfig(
                f"lynx-sglang offload: layer {layer_id}'s experts are {_show(layout)}, the "
                f"expert cache's are {_show(have)} (every MoE layer must share one format)"
            )
        return self.cache

    def _set_slots(self, slots: int) -> None:
        """Fix K and the capture cap: the largest decode batch a CUDA graph may capture (None:
        any), every captured step fitting the slots in one wave (device-side). Captured steps
        run the selection as configured: graphs capture up to K // top_k tokens (SGLang's paged
        experts' rule), and larger decode batches run host-planned. A kept set bounded by
        --lynx-max-experts <= K lets graphs capture up to K / protect_top tokens, at the quality
        cost the capture-bound measurement shows (README), so it is the user's choice."""
        self.slots = slots
        E, top_k = self.model.num_experts, self.model.top_k
        self.capture_cap = decode_capture_cap(self.selection, slots, top_k, E)

    def _slots_from_memory(self, layout: dict) -> int:
        """K per layer from --lynx-slot-memory-gib and one expert's bytes in ``layout``."""
        per_expert = sum(math.prod(shape) * dtype.itemsize for shape, dtype in layout.values())
        layers = len(self.model.moe_layer_ids)
        budget = self.cfg.slot_memory_gib * 2**30
        slots = min(int(budget // (layers * per_expert)), self.model.num_experts)
        if slots < self.model.top_k:
            raise UnsupportedConfig(
                f"lynx-sglang: --lynx-slot-memory-gib {self.cfg.slot_memory_gib:g} buys {slots} "
                f"slots per MoE layer ({layers} layers x {per_expert / 2**20:.2f} MiB per expert), "
                f"below the router's top-k ({self.model.top_k}); need at least "
                f"{layers * per_expert * self.model.top_k / 2**30:.2f} GiB"
            )
        if self.cfg.executor == "graph" and slots < self.model.num_experts:
            raise UnsupportedConfig(
                f"lynx-sglang: --lynx-slot-memory-gib {self.cfg.slot_memory_gib:g} buys {slots} "
                "of the experts per layer, and --lynx-executor graph serves only steps that fit "
                "the slots: use --lynx-executor hybrid or eager"
            )
        return slots

    # ------------------------------------------------------------------ steps
    @contextlib.contextmanager
    def scope(self, step: Step) -> Iterator[Step]:
        """Run a forward (or a graph capture) as ``step``; restores the previous step after."""
        prev, self.step = self.step, step
        try:
            yield step
        finally:
            self.step = prev

    def decode_step(self, rows: int, requests: Optional[torch.Tensor] = None) -> Step:
        """An eager (or replayed) decode forward of ``rows`` real tokens, row i of request row
        ``requests[i]`` (path eviction); also arms the graph buffers, so a replayed graph masks
        its padding rows and reads its rows' requests."""
        self.graph_rows.fill_(rows)
        if not self.reads_requests:
            requests = None
        buf = self.graph_requests
        if requests is not None and buf is not None and rows <= buf.shape[0]:
            buf.zero_()  # padding: SGLang's scratch request row 0
            buf[:rows].copy_(requests[:rows])
        return Step(decode=True, num_valid=rows, requests=requests)

    def prefill_step(self, requests: torch.Tensor) -> Step:
        """A prefill (extend) forward whose token i belongs to request row ``requests[i]``:
        path eviction seeds each request's history from its prompt's routing. Selection never
        runs on it (not a decode step)."""
        return Step(requests=requests) if self.reads_requests else NOT_DECODE

    def reserve_requests(self, pool_rows: int) -> None:
        """Path eviction: request rows 0..``pool_rows`` - 1 (SGLang's ReqToTokenPool holds its
        size + 1, row 0 the padding row), before any CUDA-graph capture."""
        if self.reads_requests and self.cache is not None:
            self.cache.reserve_requests(pool_rows)

    def capture_step(self, rows: int) -> Step:
        """A decode forward being captured: the real count is read from the device buffer.
        A capture beyond ``capture_cap`` could meet a step the slots cannot serve: refused."""
        if self.capture_cap is not None and rows > self.capture_cap:
            raise CaptureTooLarge(
                f"lynx-sglang: a decode CUDA graph of {rows} rows was to be captured, but with "
                f"{self.slots} slots per layer only batches up to {self.capture_cap} fit the "
                f"slots in every step; set --cuda-graph-max-bs-decode {self.capture_cap} or lower"
            )
        self.graph_rows.fill_(rows)
        requests = None
        if self.reads_requests:
            if self.graph_requests is None:  # the first capture is SGLang's largest batch
                size = max(rows, self.capture_cap or 0)
                self.graph_requests = torch.zeros(size, dtype=torch.int64, device=self.device)
            if rows > self.graph_requests.shape[0]:
                raise CaptureTooLarge(
                    f"lynx-sglang: a decode CUDA graph of {rows} rows was to be captured after "
                    f"one of {self.graph_requests.shape[0]}; path eviction's request buffer is "
                    "sized at the first capture: set --cuda-graph-max-bs-decode "
                    f"{self.graph_requests.shape[0]}"
                )
            requests = self.graph_requests[:rows]
        return Step(decode=True, num_valid=self.graph_rows, requests=requests)

    # ------------------------------------------------------------------ admission
    def order_queue(self, waiting_queue: list) -> None:
        """--lynx-admission overlap: reorder SGLang's waiting queue (``Req``s, as its policy
        left it) in place, most estimated overlap with the resident experts first, within the
        pass-over bound. Runs in the scheduler between forwards: one device read."""
        if self.admission is None or self.profiler is None or self.cache is None:
            return
        for req in waiting_queue:
            if req.rid not in self._profiles:
                self._profiles[req.rid] = (self._seen, self.profiler(list(req.origin_input_ids)))
                self._seen += 1
        # SGLang's FCFS keeps the queue as we left it: arrival (first seen) order comes first
        waiting_queue.sort(key=lambda req: self._profiles[req.rid][0])
        keys = [req.rid for req in waiting_queue]
        self._profiles = {k: self._profiles[k] for k in keys}
        layers = range(self.cache.store.num_layers)
        resident = torch.stack([self.cache.resident_mask(layer) for layer in layers])
        order = self.admission.order(keys, [self._profiles[k][1] for k in keys], resident)
        waiting_queue[:] = [waiting_queue[i] for i in order]

    # ------------------------------------------------------------------ layers
    def index(self, layer_id: int) -> int:
        """Dense MoE-layer index of a decoder layer id."""
        try:
            return self.layer_index[layer_id]
        except KeyError:
            raise RuntimeError(
                f"lynx-sglang: layer {layer_id} has routed experts but the model config lists "
                f"MoE layers {list(self.layer_index)}"
            ) from None

    # ------------------------------------------------------------------ counters
    def read_counters(self, reset: bool = True) -> dict:
        """{"selection": {...}, "cache": {...}} (a device read: call between steps)."""
        out: dict = {}
        if self.stats is not None:
            out["selection"] = self.stats.read(reset)
        if self.cache is not None:
            out["cache"] = self.cache.counters(reset)["total"]
        return out


def _build_cache(
    cfg: LynxConfig, model: ModelFacts, device: torch.device, layout: dict, slots: int
):
    """Pinned host store for every expert of every MoE layer, in ``layout`` ({name: (row shape,
    dtype)}: the checkpoint's own format), and the GPU slot cache over it."""
    from lynx_sglang.offload.cache import ExpertCache
    from lynx_sglang.offload.store import HostExpertStore

    store = HostExpertStore(
        len(model.moe_layer_ids),
        model.num_experts,
        tensor_shapes={name: shape for name, (shape, _) in layout.items()},
        dtype=model.dtype,
        tensor_dtypes={name: dtype for name, (_, dtype) in layout.items()},
        pin=device.type == "cuda",
        headroom_gib=cfg.host_headroom_gib,
    )
    resolved = dataclasses.replace(cfg.cache, slots=slots, slot_memory_gib=0.0)  # K, now known
    return ExpertCache.from_config(store, resolved, device, model.top_k,
                                   model.hidden_size)  # fmt: skip


def _show(layout: dict) -> str:
    return ", ".join(
        f"{n} {list(shape)} {str(dt).removeprefix('torch.')}" for n, (shape, dt) in layout.items()
    )


# ---------------------------------------------------------------------------------------------
# The process's active runtime.
# ---------------------------------------------------------------------------------------------

_ACTIVE: Optional[LynxRuntime] = None


def active() -> Optional[LynxRuntime]:
    """The runtime of this process, or None when the plugin is off here."""
    return _ACTIVE


def activate(runtime: Optional[LynxRuntime]) -> Optional[LynxRuntime]:
    """Make ``runtime`` the active one (None: off); returns the previous one."""
    global _ACTIVE
    prev, _ACTIVE = _ACTIVE, runtime
    return prev


@contextlib.contextmanager
def activated(runtime: Optional[LynxRuntime]) -> Iterator[Optional[LynxRuntime]]:
    """Scope ``runtime`` as the active one (tests, and model load)."""
    prev = activate(runtime)
    try:
        yield runtime
    finally:
        activate(prev)
