"""Prefetch predictors: which experts layer l+1 will need, guessed while layer l computes.

- temporal: the experts layer l+1 needed at the previous step (decode batches change slowly);
- cross-layer: layer l+1's router applied to layer l's hidden state, top-k per token
  (``lynx_sglang.step.predict_votes``, passed to the cache's ``prepare``);
- both: the union, ranked by votes (a cross-layer vote per token, half a vote from the past step).
"""

from __future__ import annotations

import numpy as np
import torch

TEMPORAL_VOTE = 0.5


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
