"""Routing-path eviction (ExpertFlow's idea, from the running requests' own routing).

An expert cache that knows which requests are running can predict what the next decode step
will route to: each request keeps routing much as it did (its prompt, its recent tokens), and a
request that finished stops needing its experts at once. Per request slot r and layer l the
policy keeps a decayed histogram of r's choices,

    H[r, l] <- decay * H[r, l] + onehot(r's current token's top-k)       (seeded by r's prefill)

so that p[r, l, e] = (1 - decay) * H[r, l, e] (summing to k) estimates r's chance of choosing e
at its next token. An expert's value is the chance that at least one active request chooses it,
1 - prod_r (1 - p[r, l, e]); the lowest value is evicted first, least recently used on ties.

The caller (the serving replay; in a server, the step with the batch's request slots) tells it
who runs: ``admit`` at prefill, ``observe_rows`` before each layer-step, ``release`` at the
finish. Every update is indexing and in-place arithmetic on [R, L, E] arrays (numpy here).
"""

from __future__ import annotations

import numpy as np

from .eviction import Array, EvictionPolicy


class RequestPathPolicy(EvictionPolicy):
    """Evicts the expert the running requests are least likely to route to at their next token."""

    name = "path"

    def __init__(self, num_layers: int, num_experts: int, max_requests: int,
                 decay: float = 0.95) -> None:  # fmt: skip
        super().__init__(num_layers, num_experts, "numpy")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.hist = np.zeros((max_requests, num_layers, num_experts))  # [R, L, E]
        self.active = np.zeros(max_requests, dtype=bool)  # [R]
        self.pred = np.zeros((num_layers, num_experts))  # [L, E] value of each expert

    def arrays(self) -> dict[str, Array]:
        return {"hist": self.hist, "pred": self.pred}

    def admit(self, slot: int, prefill_ids: np.ndarray) -> None:
        """Request ``slot`` starts: its prompt's routing ``prefill_ids`` [L, P, k] seeds it."""
        L, E = self.num_layers, self.num_experts
        P = max(1, prefill_ids.shape[1])
        h = np.zeros((L, E))
        for layer in range(L):
            h[layer] = np.bincount(prefill_ids[layer].reshape(-1), minlength=E)[:E]
        self.hist[slot] = h / P / (1.0 - self.decay)  # p = choices per prompt token
        self.active[slot] = True
        self._refresh()

    def release(self, slot: int) -> None:
        """Request ``slot`` finished: its experts no longer count."""
        self.hist[slot] = 0.0
        self.active[slot] = False
        self._refresh()

    def observe_rows(self, layer: int, slots: np.ndarray, ids: np.ndarray) -> None:
        """A decode layer-step: row i of ``ids`` [T, k] is request ``slots[i]``'s current token."""
        h = self.hist[slots, layer]  # [T, E] (a copy)
        h *= self.decay
        np.add.at(h, (np.arange(len(slots))[:, None], ids), 1.0)
        self.hist[slots, layer] = h
        self._refresh(layer)

    def probabilities(self, layer: int) -> np.ndarray:
        """[E]: the chance that some active request routes to each expert at its next token."""
        return self.pred[layer]

    def _refresh(self, layer: int | None = None) -> None:
        rows = np.flatnonzero(self.active)
        layers = range(self.num_layers) if layer is None else (layer,)
        for la in layers:
            p = np.minimum((1.0 - self.decay) * self.hist[rows, la], 1.0 - 1e-9)  # [R', E]
            self.pred[la] = -np.expm1(np.log1p(-p).sum(0))

    def value(self, slot_layer: Array, slot_expert: Array) -> Array:
        return self.pred[slot_layer, slot_expert]
