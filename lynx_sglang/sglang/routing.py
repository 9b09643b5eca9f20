"""Lynx selection applied to a TopK output: decode batches only, padding rows masked."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from sglang.srt.layers.moe.topk import StandardTopKOutput

from lynx_sglang.selection import select_experts
from lynx_sglang.sglang.runtime import LynxRuntime


def select_topk_output(runtime: LynxRuntime, layer_id: int, output: Any) -> Any:
    """The TopK output with its decode batch's active expert set shrunk (else ``output`` as is).

    ``output`` is SGLang's ``StandardTopKOutput(topk_weights, topk_ids, router_logits)``; other
    formats (bypassed, triton-kernels, packed) belong to runners the checks reject.
    """
    if type(output) is not StandardTopKOutput or not applies(runtime, output.topk_ids.shape[0]):
        return output
    params, num_valid, min_batch = runtime.params, runtime.step.num_valid, runtime.cfg.min_batch
    ids, weights, logits = output.topk_ids, output.topk_weights, output.router_logits
    index = runtime.index(layer_id)
    cache = runtime.cache
    resident = cache.resident_mask(index) if cache is not None and params.cache_bonus > 0 else None
    # router_logits: [T, E], ids/weights: [T, k]
    result = select_experts(logits, ids, weights, params, num_valid=num_valid, resident=resident)
    new_ids, new_weights = result.topk_ids.to(ids.dtype), result.topk_weights.to(weights.dtype)
    if isinstance(num_valid, torch.Tensor) and min_batch > 1:
        # Under a graph the real count is only on the device: small batches keep their routing.
        big = num_valid >= min_batch
        new_ids = torch.where(big, new_ids, ids)
        new_weights = torch.where(big, new_weights, weights)
    if runtime.stats is not None:
        runtime.stats.record(index, ids, new_ids, num_valid)
    if cache is not None and runtime.cfg.eviction == "score":
        cache.note_scores(index, result.scores)
    return output._replace(topk_ids=new_ids, topk_weights=new_weights)


def applies(runtime: LynxRuntime, rows: int) -> bool:
    """Selection runs on decode batches of at least ``min_batch`` real rows (``rows``: T, padded
    to the graph's batch size under capture, where the real count is checked on the device)."""
    step, min_batch = runtime.step, runtime.cfg.min_batch
    if runtime.params is None or not step.decode or rows == 0 or rows < min_batch:
        return False
    return not (isinstance(step.num_valid, int) and step.num_valid < min_batch)


def prefetch_selector(
    runtime: LynxRuntime,
) -> Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]:
    """The cache's prefetch hook: a predicted decode routing passed through the same selection,
    so prefetch copies the kept set rather than the raw top-k."""

    def select(layer_index: int, topk_ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        if not applies(runtime, topk_ids.shape[0]):
            return topk_ids
        weights = torch.ones_like(topk_ids, dtype=torch.float32)  # prefetch needs only the ids
        num_valid = runtime.step.num_valid
        return select_experts(
            logits, topk_ids, weights, runtime.params, num_valid=num_valid
        ).topk_ids

    return select
