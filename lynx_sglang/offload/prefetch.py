"""Prefetch predictors: which experts layer l+1 will need, guessed while layer l computes.

- temporal: the experts layer l+1 needed at the previous step (decode batches change slowly);
- cross-layer: layer l+1's router applied to layer l's hidden state, top-k per token;
- both: the union, ranked by votes (a cross-layer vote per token, half a vote from the past step).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

# (next layer, predicted topk_ids [T, k], predicted router logits [T, E]) -> topk_ids [T, k].
# The integration passes the Lynx selection here so prefetch copies the kept set, not the raw one.
PrefetchSelect = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]

TEMPORAL_VOTE = 0.5
MODES = ("off", "temporal", "cross-layer", "both")


def cross_layer_votes(
    hidden: torch.Tensor,
    router_next: torch.Tensor,
    top_k: int,
    layer_next: int,
    select: PrefetchSelect | None = None,
) -> torch.Tensor:
    """Tokens voting for each expert of the next layer: [E] float32, on hidden's device, no sync."""
    # hidden: [T, H], router_next: [E, H] -> logits: [T, E]
    logits = hidden.to(router_next.dtype) @ router_next.t()
    ids = logits.topk(top_k, dim=-1).indices  # [T, k]
    if select is not None:
        ids = select(layer_next, ids, logits)
    num_experts = router_next.shape[0]
    flat = ids.reshape(-1).long()
    votes = torch.zeros(num_experts + 1, dtype=torch.float32, device=hidden.device)
    votes.index_add_(
        0, torch.where(flat >= 0, flat, num_experts), torch.ones_like(flat, dtype=torch.float32)
    )
    return votes[:num_experts]


def rank_experts(
    mode: str,
    num_experts: int,
    votes: np.ndarray | None = None,
    previous: np.ndarray | None = None,
) -> np.ndarray:
    """Predicted experts of the next layer, most votes first. votes: [E]; previous: expert ids."""
    score = np.zeros(num_experts, dtype=np.float64)
    if mode in ("cross-layer", "both") and votes is not None:
        score += votes
    if mode in ("temporal", "both") and previous is not None and len(previous):
        score[previous] += TEMPORAL_VOTE
    picked = np.flatnonzero(score > 0)
    return picked[np.argsort(-score[picked], kind="stable")]


def rank_experts_device(
    mode: str,
    num_experts: int,
    votes: torch.Tensor | None,
    previous: torch.Tensor | None,
) -> torch.Tensor:
    """Device twin of ``rank_experts`` with fixed shapes: a score per expert, [E] float32 (0: not predicted)."""
    device = votes.device if votes is not None else previous.device
    score = torch.zeros(num_experts, dtype=torch.float32, device=device)
    if mode in ("cross-layer", "both") and votes is not None:
        score += votes
    if mode in ("temporal", "both") and previous is not None:
        score += previous.float() * TEMPORAL_VOTE
    return score
