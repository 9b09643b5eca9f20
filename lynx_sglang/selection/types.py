"""Types and limits shared by the selection policy and its Triton kernels (so the kernels never
import the policy): the result of a selection and how a batch's real row count is given."""

from __future__ import annotations

from typing import NamedTuple, Union

import torch

# The real row count of a decode batch: None (all rows), an int (eager), or a 0-dim / per-group
# device tensor (CUDA graphs: written before each replay, read inside the kernels).
NumValid = Union[None, int, torch.Tensor]

# Largest expert count the Triton kernels take (one program holds a row of E logits).
MAX_KERNEL_EXPERTS = 1024


class SelectionResult(NamedTuple):
    """The remapped routing plus the batch's kept set and scores."""

    topk_ids: torch.Tensor  # [..., T, k] same dtype as the input ids
    topk_weights: torch.Tensor  # [..., T, k] same dtype as the input weights
    keep: torch.Tensor  # [..., E] bool, the kept set
    scores: torch.Tensor  # [..., E] float32 batch-wide scores (after the cache bonus)


class ExpertSimilarity(NamedTuple):
    """One layer's expert similarity, computed once at load (``selection.similarity``): the
    "similar" policy moves a choice to the kept expert most similar to the one it loses."""

    matrix: torch.Tensor  # [E, E] float32, cosine similarity of expert outputs (diagonal 1)
    critical: torch.Tensor  # [E] bool, experts whose best peer is below the threshold: kept
