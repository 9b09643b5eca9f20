"""Routing-path eviction (ExpertFlow's idea, from the running requests' own routing).

An expert cache that knows which request each row of a step belongs to can predict what the
next decode step will route to: each request keeps routing much as it did (its prompt, its
recent tokens), and a request that finished stops needing its experts at once. Per request row
r (SGLang's ``req_pool_idx``) and layer l, a decayed histogram of r's choices,

    H[r, l] <- decay * H[r, l] + onehot(r's current token's top-k)       (decode)
    H[r, l] <- choices per prompt token / (1 - decay)                    (r's prefill)

so that p[r, l, e] = (1 - decay) * H[r, l, e] (summing to k) estimates r's chance of choosing e
at its next token. An expert's value is the chance that at least one running request chooses
it, 1 - prod_r (1 - p[r, l, e]); the lowest value is evicted first, least recently used on ties.
The running requests are the latest decode step's rows, joined by each prefill's requests.

``RequestHistory`` holds H on the step's device as torch tensors, updated by indexing and
scatter only (no host read, so a captured decode graph replays the update); row 0 is scratch:
SGLang pads a captured batch with request row 0, which no request is given. One history serves
both executors of a hybrid cache; each executor's policy keeps its own copy of the values.
"""

from __future__ import annotations

import numpy as np
import torch

from .eviction import Array, EvictionPolicy, zeros

PADDING_ROW = 0  # SGLang's ReqToTokenPool: cuda-graph padding rows read request row 0


class RequestHistory:
    """Per request row and MoE layer, the decayed histogram of the request's expert choices."""

    def __init__(self, num_layers: int, num_experts: int, device: torch.device | str,
                 decay: float = 0.95, rows: int = 0) -> None:  # fmt: skip
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"--lynx-path-decay must be in [0, 1), got {decay}")
        self.num_layers, self.num_experts, self.decay = num_layers, num_experts, decay
        self.device = torch.device(device)
        self.hist = torch.zeros(0, num_layers, num_experts, device=self.device)  # [R, L, E]
        self.active = torch.zeros(0, device=self.device)  # [R] 1.0: running
        if rows:
            self.reserve(rows)

    @property
    def rows(self) -> int:
        return self.hist.shape[0]

    def reserve(self, rows: int) -> None:
        """Hold ``rows`` request rows (SGLang: its request pool's size + 1). Call before any
        CUDA-graph capture: the tensors a graph captured must never be replaced."""
        if rows > self.rows:
            self.hist = torch.zeros(rows, self.num_layers, self.num_experts, device=self.device)
            self.active = torch.zeros(rows, device=self.device)

    def observe(self, layer: int, requests: torch.Tensor, ids: torch.Tensor,
                decode: bool) -> torch.Tensor:  # fmt: skip
        """One layer-step: row i of ``ids`` [T, k] (-1: padding) is request ``requests[i]``'s
        token ([T] ints; a decode step has one row per request). Returns the values [E]."""
        R, E = self.rows, self.num_experts
        if R == 0:
            raise RuntimeError("expert cache: path eviction has no request rows (reserve first)")
        req = requests.to(self.device).long()
        req = torch.where((req >= 0) & (req < R), req, PADDING_ROW)
        ids = ids.to(self.device).long()
        real = (ids >= 0).float()  # [T, k]
        ids = ids.clamp(min=0)
        hist = self.hist[:, layer]  # [R, E] view
        if decode:  # the batch's rows are the running requests
            self.active.zero_()
            self.active.index_fill_(0, req, 1.0)
            h = hist.index_select(0, req) * self.decay  # [T, E]
            h.scatter_add_(1, ids, real)
            hist.index_copy_(0, req, h)  # distinct rows, but padding (row 0, scratch)
        else:  # a prefill (chunk): each of its requests is seeded by its rows
            counts = torch.zeros(R, E, device=self.device)
            counts.index_put_((req[:, None].expand_as(ids), ids), real, accumulate=True)
            tokens = torch.zeros(R, device=self.device).index_add_(0, req, torch.ones_like(req, dtype=torch.float32))
            seen = tokens > 0
            seeded = counts / tokens.clamp(min=1)[:, None] / (1.0 - self.decay)
            hist.copy_(torch.where(seen[:, None], seeded, hist))
            self.active.masked_fill_(seen, 1.0)
        self.active[PADDING_ROW] = 0.0
        hist[PADDING_ROW] = 0.0
        p = ((1.0 - self.decay) * hist).clamp(max=1.0 - 1e-6)  # [R, E]
        return -torch.expm1((self.active[:, None] * torch.log1p(-p)).sum(0))


class RequestPathPolicy(EvictionPolicy):
    """Evicts the expert the running requests are least likely to route to at their next token."""

    name = "path"
    reads_requests = True

    def __init__(self, history: RequestHistory, like: str | torch.device) -> None:
        super().__init__(history.num_layers, history.num_experts, like)
        self.history = history
        self.pred = zeros((history.num_layers, history.num_experts), like)  # [L, E] values

    def arrays(self) -> dict[str, Array]:
        return {"pred": self.pred}

    def observe_requests(self, layer: int, requests: torch.Tensor, ids: torch.Tensor,
                         decode: bool) -> None:  # fmt: skip
        value = self.history.observe(layer, requests, ids, decode)
        if isinstance(self.pred, np.ndarray):  # host planning: a read it is already paying for
            self.pred[layer] = value.cpu().numpy()
        else:
            self.pred[layer].copy_(value)

    def probabilities(self, layer: int) -> Array:
        """[E]: the chance that some running request routes to each expert at its next token."""
        return self.pred[layer]

    def value(self, slot_layer: Array, slot_expert: Array) -> Array:
        return self.pred[slot_layer, slot_expert]
