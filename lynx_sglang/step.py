"""One MoE layer's forward, read in one place: selection -> expert cache -> fused kernel.

``moe_layer_step`` is the whole of what lynx-sglang does to a layer's step, in every mode: the
parts that are off are simply absent (no selection: ``selection=None``; all experts resident:
``cache=None``). The SGLang integration calls it from the layer's quant method with SGLang's
own fused kernel; the benchmarks and the quality harness call it with theirs.

Named dimensions: T tokens (rows; a captured decode graph pads them), E experts, k top-k,
K slots per layer, H hidden.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, NamedTuple, Optional

import torch

from lynx_sglang.config import SelectionParams
from lynx_sglang.selection.policy import distinct_experts, select_experts
from lynx_sglang.selection.routing import (
    SOFTMAX_TOPK,
    Routing,
    reweigh,
    selection_logits,
    split_shared,
)
from lynx_sglang.selection.types import ExpertSimilarity, NumValid

if TYPE_CHECKING:
    from lynx_sglang.offload.cache import ExpertCache

# kernel(x [T, H], ids [T, k], weights [T, k], experts) -> [T, H]. ``experts`` is None for the
# layer's own resident weights (ids are expert ids), else the cache's slot tensors
# {"w13": [K, 2I, H], "w2": [K, H, I]} (ids are slot ids, padding rows hold weight 0).
Kernel = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, Optional[Mapping[str, torch.Tensor]]],
    torch.Tensor,
]


class Step(NamedTuple):
    """The forward pass now running: a pure decode batch or not, its real row count (an int in
    eager mode, a 0-dim device tensor under CUDA-graph capture, None: every row), and, where
    path eviction asks for them, the request row of each token (SGLang's req_pool_idx, [T] on
    the device; 0 on graph padding)."""

    decode: bool = False
    num_valid: NumValid = None
    requests: Optional[torch.Tensor] = None

    @property
    def captured(self) -> bool:
        """Being captured into a CUDA graph: the row count lives on the device, and nothing may
        read the device from the host."""
        return isinstance(self.num_valid, torch.Tensor)


NOT_DECODE = Step()


def moe_layer_step(
    layer: int,
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    router_logits: torch.Tensor,
    kernel: Kernel,
    step: Step = NOT_DECODE,
    selection: Optional[SelectionParams] = None,
    cache: Optional[ExpertCache] = None,
    stats: Optional[SelectionStats] = None,
    similarity: Optional[Sequence[ExpertSimilarity]] = None,
    routing: Routing = SOFTMAX_TOPK,
) -> torch.Tensor:
    """The MoE output [T, H] of one layer's step. x: [T, H]; topk_ids, topk_weights: [T, k + s]
    from the router's top-k (s trailing fused shared-expert columns, per ``routing``);
    router_logits: [T, E]. ``layer`` is the dense MoE-layer index; ``similarity``, per MoE
    layer, is what the "similar" policy reads; ``routing`` is the model's routing rule, which
    selection follows (the scores that choose, the rule that weighs)."""
    if cache is not None and routing.shared_columns:
        raise ValueError(
            "the expert cache serves routed experts only; fused shared experts are not offloaded "
            "(SGLang: --disable-shared-experts-fusion keeps them a resident MLP)"
        )
    # 0. the routed columns; fused shared experts are never selected, moved or counted
    routed = split_shared(topk_ids, topk_weights, routing)
    ids, weights, scores = routed.ids, routed.weights, None
    # 1. which rows are real: a decode batch's graph padding needs no expert and casts no vote
    num_valid = step.num_valid if step.decode else None
    # 2. selection, on decode batches only: shrink the batch's active expert set
    if selection is not None and selects(step, ids.shape[0], selection.min_batch):
        params = selection.at_layer(layer)  # the layer's own budget, where one is set
        # cache- and miss-aware selection read what is resident now (device-side when captured)
        aware = cache is not None and (params.cache_bonus > 0 or params.miss_aware)
        resident = cache.resident_mask(layer, step.captured) if aware else None
        sim = similarity[layer] if similarity is not None else None
        logits = selection_logits(router_logits, routing)  # the scores that chose the experts
        sel = select_experts(logits, ids, weights, params, num_valid, resident, sim)
        ids, weights, scores = sel.topk_ids, sel.topk_weights, sel.scores
        if routing.reweighs(params.policy):  # moved choices weighed by the model's own rule
            weights = reweigh(router_logits, routed.ids, routed.weights, ids, weights, routing)
        if isinstance(num_valid, torch.Tensor) and params.min_batch > 1:
            # under a graph the real row count lives on the device: small batches keep theirs
            big = num_valid >= params.min_batch
            ids = torch.where(big, ids, routed.ids)
            weights = torch.where(big, weights, routed.weights)
        # 3. counters: distinct routed experts before and after, on the device
        if stats is not None:
            stats.record(layer, routed.ids, ids, num_valid)
    ids, weights = routed.join(ids, weights)
    if cache is None:  # every expert resident: the layer's own kernel on the (selected) ids
        return kernel(x, ids, weights, None)
    # 4. the cache makes the kept experts resident and turns expert ids into slot ids
    pad = padding_rows(ids.shape[0], num_valid, ids.device)  # [T, 1] bool, or None
    if pad is not None:
        ids, weights = ids.masked_fill(pad, -1), weights.masked_fill(pad, 0)
    votes = None
    if cache.predicts(layer):  # cross-layer prefetch: the next layer's router on this input
        keep = selection if selection is not None and cache.prefetch_select else None
        if keep is not None:
            keep = keep.at_layer(layer + 1)
        sim = similarity[layer + 1] if similarity is not None else None
        votes = predict_votes(
            x, cache.router(layer + 1), ids.shape[1], keep, step, sim, cache.routing(layer + 1)
        )
    plan = cache.prepare(
        layer, ids, scores, votes, step.captured, step.requests, step.decode, router_logits, x
    )
    # 5. the fused kernel once per wave (one unless the step needs more experts than slots)
    experts = cache.slot_weights(layer)
    out = None
    for wave in plan:
        slot_ids = wave.slot_ids if pad is None else wave.slot_ids.masked_fill(pad, 0)
        y = kernel(x, slot_ids, wave.weights(weights), experts)
        out = y if plan.single else (y.float() if out is None else out + y.float())
    # 6. start copying the next layer's predicted experts while this layer computes
    cache.end_step(layer)
    return out.to(x.dtype)


def selects(step: Step, rows: int, min_batch: int) -> bool:
    """Selection runs on decode batches of at least ``min_batch`` real rows (``rows``: T, padded
    to the graph's batch size under capture, where the real count is checked on the device)."""
    if not step.decode or rows == 0 or rows < min_batch:
        return False
    return not (isinstance(step.num_valid, int) and step.num_valid < min_batch)


def padding_rows(rows: int, num_valid: NumValid, device) -> Optional[torch.Tensor]:
    """[T, 1] bool, True on CUDA-graph padding rows (None when every row is real)."""
    if num_valid is None or (isinstance(num_valid, int) and num_valid >= rows):
        return None
    return (torch.arange(rows, device=device) >= num_valid)[:, None]


def predict_votes(
    x: torch.Tensor,
    router_next: torch.Tensor,
    top_k: int,
    selection: Optional[SelectionParams],
    step: Step,
    similarity: Optional[ExpertSimilarity] = None,
    routing: Routing = SOFTMAX_TOPK,
) -> torch.Tensor:
    """Tokens voting for each expert of the next layer: its router [E, H] applied to this
    layer's input x [T, H], top-k per token by the next layer's choice scores (``routing``;
    group limits aside), through the next layer's selection when given (prefetch then copies
    the kept set; miss-aware selection is not applied to the prediction). [E] float32 on x's
    device; padding rows do not vote."""
    logits = selection_logits(x.to(router_next.dtype) @ router_next.t(), routing)  # [T, E]
    ids = logits.topk(top_k, dim=-1).indices  # [T, k]
    num_valid = step.num_valid if step.decode else None
    if selection is not None and selects(step, ids.shape[0], selection.min_batch):
        ones = torch.ones_like(ids, dtype=torch.float32)  # prefetch needs only the ids
        ids = select_experts(logits, ids, ones, selection, num_valid, None, similarity).topk_ids
    E = router_next.shape[0]
    pad = padding_rows(ids.shape[0], num_valid, ids.device)
    flat = (ids if pad is None else ids.masked_fill(pad, E)).reshape(-1).long()
    votes = torch.zeros(E + 1, dtype=torch.float32, device=x.device)
    return votes.index_add_(0, flat, torch.ones_like(flat, dtype=torch.float32))[:E]


class SelectionStats:
    """Per-layer device counters of selection (no host sync in a step): [L, 3] int64 of
    (decode steps, distinct experts before selection, distinct experts after)."""

    FIELDS = ("steps", "distinct_before", "distinct_after")

    def __init__(self, num_layers: int, num_experts: int, device: torch.device) -> None:
        self.num_experts = num_experts
        self.table = torch.zeros(num_layers, len(self.FIELDS), dtype=torch.int64, device=device)
        self.one = torch.ones((), dtype=torch.int64, device=device)

    def record(
        self, layer: int, ids_before: torch.Tensor, ids_after: torch.Tensor, num_valid: NumValid
    ) -> None:
        """Add one step of ``layer`` (ids: [T, k]; padding rows excluded)."""
        before = distinct_experts(ids_before, self.num_experts, num_valid)
        after = distinct_experts(ids_after, self.num_experts, num_valid)
        self.table[layer] += torch.stack([self.one, before, after])

    def read(self, reset: bool = True) -> dict:
        """Totals over layers, with per-step averages (one device read)."""
        total = self.table.sum(0).tolist()
        if reset:
            self.table.zero_()
        steps, before, after = total
        return {
            "steps": steps,
            "distinct_before": before / steps if steps else 0.0,
            "distinct_after": after / steps if steps else 0.0,
        }


def decode_capture_cap(
    selection: Optional[SelectionParams], slots: int, top_k: int, num_experts: int
) -> Optional[int]:
    """The largest decode batch whose every step fits the K slots in one wave, so the device-side
    executor can serve it inside a CUDA graph (None: any batch fits, K >= E).

    Without selection a step of B tokens routes at most B * k distinct experts: B <= K // k (as
    SGLang's paged experts caps its capture sizes). With selection the kept set is bounded
    (``SelectionParams.max_kept``: max(max_experts, k, protected choices) once max_experts <= K),
    so graphs capture far larger batches: up to K // protect_top tokens. A graph of size B also
    replays smaller real batches, so every real count up to B must fit.
    """
    K = min(slots or num_experts, num_experts)
    if K >= num_experts:
        return None
    cap = K // top_k
    if selection is None or selection.max_kept(top_k, selection.min_batch) is None:
        return cap
    if max(selection.max_kept(top_k, n) for n in range(1, selection.min_batch + 1)) > K:
        return cap
    per_token = min(selection.protect_top, top_k)
    if per_token == 0:
        return None  # nothing is protected: the cap bounds every batch
    big = K // per_token
    while big > cap and selection.max_kept(top_k, big) > K:
        big -= 1
    return max(cap, big)


def bounded_selection(selection: SelectionParams, slots: int, num_experts: int) -> SelectionParams:
    """The selection a hybrid cache of ``slots`` per layer runs with: its absolute cap on the kept
    set at most K, so a captured decode step's distinct experts fit the slots."""
    K = min(slots or num_experts, num_experts)
    if K >= num_experts or 0 < selection.max_experts <= K:
        return selection
    return dataclasses.replace(selection, max_experts=K)
