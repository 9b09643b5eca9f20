"""Eviction policies: which resident expert leaves a slot first.

One implementation serves both executors: the state arrays are numpy on the host (eager
executor) or torch tensors on the device (graph-safe executor); every update is plain
indexing and in-place arithmetic that both libraries share. A policy ranks slots by a pair of
keys (primary, secondary); the lowest pair is evicted first. The caller masks out slots that
must stay (needed by the step, targeted by an in-flight copy) and puts empty slots first.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

Array = Any  # np.ndarray on the host, torch.Tensor on the device


def zeros(shape: tuple[int, ...], like: str | torch.device, dtype: str = "float") -> Array:
    """A zero array: numpy when ``like == "numpy"``, else a torch tensor on that device."""
    if like == "numpy":
        return np.zeros(shape, dtype=np.float64 if dtype == "float" else np.int64)
    return torch.zeros(shape, dtype=torch.float32 if dtype == "float" else torch.int64, device=like)


class EvictionPolicy:
    """Base: least recently used first. Subclasses rank by a per-expert value, LRU breaks ties."""

    name = "lru"
    reads_requests = False  # told each step's request rows (``observe_requests``)

    def __init__(self, num_layers: int, num_experts: int, like: str | torch.device) -> None:
        self.num_layers = num_layers
        self.num_experts = num_experts
        self.like = like

    def observe(self, layer: int, needed: Array) -> None:
        """Called once per prepared step of ``layer``; needed: [E] bool."""

    def note_scores(self, layer: int, scores: Array) -> None:
        """Per-expert importance from the selection policy; scores: [E]. Ignored by default."""

    def observe_requests(self, layer: int, requests: torch.Tensor, ids: torch.Tensor,
                         decode: bool, router_logits: torch.Tensor | None = None,
                         hidden_states: torch.Tensor | None = None) -> None:  # fmt: skip
        """The step's rows by request: row i of ``ids`` [T, k] is request ``requests[i]``'s
        token (device tensors), with its router logits [T, E] and MoE input [T, H] where the
        step has them. Read only by policies with ``reads_requests``."""

    def value(self, slot_layer: Array, slot_expert: Array) -> Array | None:
        """Per-slot primary key (None: recency only). slot_layer/slot_expert: [K], >= 0."""
        return None

    def arrays(self) -> dict[str, Array]:
        """The policy's state arrays by name (none for LRU, whose state is the slots' last use)."""
        return {}

    def keys(self, slot_layer: Array, slot_expert: Array, last_use: Array) -> tuple[Array, Array]:
        """(primary, secondary) per slot; lowest evicted first."""
        v = self.value(slot_layer, slot_expert)
        return (last_use if v is None else v), last_use


class LRUPolicy(EvictionPolicy):
    """Evicts the least recently used expert (the baseline)."""

    name = "lru"


class LFUPolicy(EvictionPolicy):
    """Evicts the least frequently used expert; counts decay per step so old popularity fades."""

    name = "lfu"

    def __init__(
        self, num_layers: int, num_experts: int, like: str | torch.device, decay: float = 0.9
    ) -> None:
        super().__init__(num_layers, num_experts, like)
        self.decay = decay
        self.freq = zeros((num_layers, num_experts), like)  # [L, E]

    def arrays(self) -> dict[str, Array]:
        return {"freq": self.freq}

    def observe(self, layer: int, needed: Array) -> None:
        row = self.freq[layer]
        row *= self.decay
        row += needed

    def value(self, slot_layer: Array, slot_expert: Array) -> Array:
        return self.freq[slot_layer, slot_expert]


class ScorePolicy(EvictionPolicy):
    """Evicts the expert with the lowest selection score, decayed over its layer's steps.

    score <- decay * score + this step's scores: an expert the batch no longer routes to keeps
    some of its past importance instead of tying at zero with every other unrouted expert.
    """

    name = "score"

    def __init__(
        self, num_layers: int, num_experts: int, like: str | torch.device, decay: float = 0.9
    ) -> None:
        super().__init__(num_layers, num_experts, like)
        self.decay = decay
        self.score = zeros((num_layers, num_experts), like)  # [L, E]

    def arrays(self) -> dict[str, Array]:
        return {"score": self.score}

    def note_scores(self, layer: int, scores: Array) -> None:
        row = self.score[layer]
        row *= self.decay
        row += scores

    def value(self, slot_layer: Array, slot_expert: Array) -> Array:
        return self.score[slot_layer, slot_expert]


def make_policy(
    name: str, num_layers: int, num_experts: int, like: str | torch.device, lfu_decay: float = 0.9
) -> EvictionPolicy:
    """Build a policy by its config name (lru, lfu, score)."""
    if name == "lru":
        return LRUPolicy(num_layers, num_experts, like)
    if name == "lfu":
        return LFUPolicy(num_layers, num_experts, like, decay=lfu_decay)
    if name == "score":
        return ScorePolicy(num_layers, num_experts, like, decay=lfu_decay)
    raise ValueError(f"--lynx-eviction must be one of lru, lfu, score; got {name!r}")


def eviction_order(primary: Array, secondary: Array) -> Array:
    """Slot indices sorted by (primary, secondary) ascending; stable on ties."""
    if isinstance(primary, np.ndarray):
        return np.lexsort((secondary, primary))
    idx = torch.argsort(secondary, stable=True)
    return idx[torch.argsort(primary[idx], stable=True)]
