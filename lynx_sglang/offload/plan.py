"""What ``ExpertCache.prepare`` returns: the waves a layer's step runs in (usually one).

A step whose needed experts fit the slots runs in one wave over all its choices. A step that
needs more distinct experts than the slots can hold runs in several waves; each wave's slot ids
address only its own experts, and a weight mask zeroes the choices served by other waves, so
summing the waves' outputs gives the exact layer output.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch


@dataclass
class Wave:
    """One fused-MoE launch: slot ids for every choice, and which choices count in it."""

    slot_ids: torch.Tensor  # [T, k] dtype of topk_ids, values in [0, K) (-1 kept for padding)
    # [T, k] float32: 1 = this wave serves the choice, 0 = another wave does, NaN = nobody could
    # (graph-safe overflow: the output is poisoned rather than silently wrong). None = all 1.
    weight_mask: torch.Tensor | None = None

    def weights(self, topk_weights: torch.Tensor) -> torch.Tensor:
        """topk_weights restricted to this wave's choices."""
        if self.weight_mask is None:
            return topk_weights
        return topk_weights * self.weight_mask.to(topk_weights.dtype)


class Plan:
    """The waves of one prepared step. Iterate once, in order, queueing each wave's compute
    before asking for the next: later waves may refill slots that earlier waves read."""

    def __init__(self, first: Wave, rest: list[Callable[[], Wave]] | None = None) -> None:
        self._first = first
        self._rest = rest or []

    def __len__(self) -> int:
        return 1 + len(self._rest)

    def __iter__(self) -> Iterator[Wave]:
        yield self._first
        for make in self._rest:
            yield make()

    @property
    def single(self) -> bool:
        return not self._rest

    def map_later(self, wrap: Callable[[Callable[[], Wave]], Callable[[], Wave]]) -> Plan:
        """The same plan with each later wave's maker passed through ``wrap`` (a timer, a tracer)."""
        return Plan(self._first, [wrap(make) for make in self._rest])

    def _only(self) -> Wave:
        if self._rest:
            raise RuntimeError(
                f"this step needs {len(self)} waves (more distinct experts than slots); "
                "iterate the plan or use ExpertCache.forward"
            )
        return self._first

    @property
    def slot_ids(self) -> torch.Tensor:
        """The slot ids of a one-wave step (the common case): [T, k], same dtype as topk_ids."""
        return self._only().slot_ids

    def weights(self, topk_weights: torch.Tensor) -> torch.Tensor:
        """The one-wave step's weights: topk_weights times the weight mask when there is one.

        Always pass the weights through here: the graph executor poisons (NaN) the choices it
        could not serve, so an overflowing step can never produce a plausible wrong output.
        """
        return self._only().weights(topk_weights)

    @property
    def weight_mask(self) -> torch.Tensor | None:
        """The one-wave step's weight mask (None in eager mode; set by the graph executor)."""
        return self._only().weight_mask
