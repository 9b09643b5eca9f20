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

With a learned ``PathPredictor`` (ExpertFlow's routing-path predictor; trained by ``python -m
bench.train_path_predictor`` on recorded routing), p[r, l] is instead the predictor's forecast
from r's latest token at layer l: the history's p, the router's softmax and the experts it chose
(each [E]), and the layer's MoE input [H]. The value is formed the same way.

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
PREDICTOR_FILE = "path_predictor.pt"  # beside a model's config.json: the file the script writes

LOGIT_EPS = 1e-4  # the history's p is clamped to [eps, 1 - eps] before its logit


class PathPredictor:
    """Per MoE layer, a logistic map of a request's latest token to its next token's experts.

    ``weight`` [L, E, 3E + H] and ``bias`` [L, E] read the features [logit(p), softmax(router
    logits), chosen, x] of one token (each [E], p the decayed history's estimate at ``decay``;
    x [H] the layer's MoE input; H = 0: no hidden-state columns); the output is the chance of each
    expert at the request's next token. The features' order and the decay are part of the file,
    so a predictor serves only the history and the model it was trained on."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, decay: float,
                 meta: dict | None = None) -> None:  # fmt: skip
        L, E, F = weight.shape
        if F < 3 * E or tuple(bias.shape) != (L, E):
            raise ValueError(f"path predictor: weight [L, E, 3E + H] and bias [L, E], got "
                             f"{tuple(weight.shape)} and {tuple(bias.shape)}")  # fmt: skip
        self.weight, self.bias, self.decay = weight.float(), bias.float(), float(decay)
        self.meta = dict(meta or {})

    @property
    def num_layers(self) -> int:
        return self.weight.shape[0]

    @property
    def num_experts(self) -> int:
        return self.weight.shape[1]

    @property
    def hidden_size(self) -> int:
        """H of the MoE input it reads (0: none)."""
        return self.weight.shape[2] - 3 * self.num_experts

    @staticmethod
    def features(p: torch.Tensor, probs: torch.Tensor, chosen: torch.Tensor,
                 x: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """[T, 3E (+ H)]: the history's estimate p, the router's softmax, the chosen experts and,
        where given, the MoE input x [T, H]."""
        parts = [torch.logit(p, eps=LOGIT_EPS), probs, chosen]
        if x is not None:
            parts.append(x.float())
        return torch.cat(parts, dim=-1)

    def __call__(self, layer: int, p: torch.Tensor, probs: torch.Tensor, chosen: torch.Tensor,
                 x: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """[T, E]: each row's chance of routing to each expert at its next token."""
        f = self.features(p, probs, chosen, x if self.hidden_size else None)
        return torch.sigmoid(torch.addmm(self.bias[layer], f, self.weight[layer].t()))

    def to(self, device: torch.device | str) -> PathPredictor:
        return PathPredictor(self.weight.to(device), self.bias.to(device), self.decay, self.meta)

    def save(self, path) -> None:
        """fp16 on disk (the map's precision is not what limits it; half the bytes to ship)."""
        torch.save({"weight": self.weight.cpu().half(), "bias": self.bias.cpu().half(),
                    "decay": self.decay, "meta": self.meta}, path)  # fmt: skip

    @classmethod
    def load(cls, path, num_layers: int, num_experts: int, decay: float,
             hidden_size: int | None = None) -> PathPredictor:  # fmt: skip
        """The predictor in ``path``, checked against the model (L MoE layers, E experts, hidden
        size H where given) and the history's decay; a mismatch is refused in one line."""
        try:
            d = torch.load(path, map_location="cpu", weights_only=True)
            pred = cls(d["weight"], d["bias"], d["decay"], d.get("meta"))
        except Exception as e:  # noqa: BLE001 (unreadable, unpicklable, or not ours): one line
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"--lynx-path-predictor: cannot read {path}: {first}") from None
        if (pred.num_layers, pred.num_experts) != (num_layers, num_experts):
            raise ValueError(
                f"--lynx-path-predictor {path} was trained for {pred.num_layers} MoE layers of "
                f"{pred.num_experts} experts; this model has {num_layers} of {num_experts}: "
                "train one with python -m bench.train_path_predictor --model <this model>"
            )
        if hidden_size is not None and pred.hidden_size not in (0, hidden_size):
            raise ValueError(
                f"--lynx-path-predictor {path} reads a hidden state of {pred.hidden_size}; this "
                f"model's is {hidden_size}: train one with python -m bench.train_path_predictor "
                "--model <this model>"
            )
        if abs(pred.decay - decay) > 1e-9:
            raise ValueError(
                f"--lynx-path-predictor {path} was trained at --lynx-path-decay {pred.decay}, "
                f"not {decay}: pass --lynx-path-decay {pred.decay}"
            )
        return pred


class RequestHistory:
    """Per request row and MoE layer, the decayed histogram of the request's expert choices."""

    def __init__(self, num_layers: int, num_experts: int, device: torch.device | str,
                 decay: float = 0.95, rows: int = 0,
                 predictor: PathPredictor | None = None) -> None:  # fmt: skip
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"--lynx-path-decay must be in [0, 1), got {decay}")
        self.num_layers, self.num_experts, self.decay = num_layers, num_experts, decay
        self.device = torch.device(device)
        self.predictor = predictor.to(self.device) if predictor is not None else None
        self.hist = torch.zeros(0, num_layers, num_experts, device=self.device)  # [R, L, E]
        # with a predictor: [R, L, E] its forecast of each request's next token (else unused)
        self.next = torch.zeros(0, num_layers, num_experts, device=self.device)
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
            if self.predictor is not None:
                self.next = torch.zeros_like(self.hist)
            self.active = torch.zeros(rows, device=self.device)

    def observe(self, layer: int, requests: torch.Tensor, ids: torch.Tensor, decode: bool,
                router_logits: torch.Tensor | None = None,
                hidden_states: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """One layer-step: row i of ``ids`` [T, k] (-1: padding) is request ``requests[i]``'s
        token ([T] ints; a decode step has one row per request). A learned predictor also reads
        the rows' router logits [T, E] (their softmax) and, if it was trained on it, their MoE
        input [T, H]. Returns the values [E]."""
        R, E = self.rows, self.num_experts
        if R == 0:
            raise RuntimeError("expert cache: path eviction has no request rows (reserve first)")
        req = requests.to(self.device).long()
        req = torch.where((req >= 0) & (req < R), req, PADDING_ROW)
        ids = ids.to(self.device).long()
        real = (ids >= 0).float()  # [T, k]
        ids = ids.clamp(min=0)
        hist = self.hist[:, layer]  # [R, E] view
        pred, x = self.predictor, None
        if pred is not None:
            if router_logits is None or router_logits.shape[0] != ids.shape[0]:
                raise RuntimeError("expert cache: the path predictor needs the step's router "
                                   "logits (ExpertCache.prepare(router_logits=...))")  # fmt: skip
            probs = torch.softmax(router_logits.to(self.device).float(), dim=-1)  # [T, E]
            if pred.hidden_size:
                if hidden_states is None or hidden_states.shape != (ids.shape[0], pred.hidden_size):
                    raise RuntimeError(
                        "expert cache: the path predictor reads the step's MoE input [T, "
                        f"{pred.hidden_size}] (ExpertCache.prepare(hidden_states=...))"
                    )
                x = hidden_states.to(self.device).float()
            chosen = torch.zeros(ids.shape[0], E, device=self.device).scatter_add_(1, ids, real)
            chosen = chosen.clamp(max=1.0)  # [T, E]
        if decode:  # the batch's rows are the running requests
            self.active.zero_()
            self.active.index_fill_(0, req, 1.0)
            h = hist.index_select(0, req) * self.decay  # [T, E]
            h.scatter_add_(1, ids, real)
            hist.index_copy_(0, req, h)  # distinct rows, but padding (row 0, scratch)
            if pred is not None:  # each running request's next token, from its latest
                nxt = pred(layer, (1.0 - self.decay) * h, probs, chosen, x)
                self.next[:, layer].index_copy_(0, req, nxt)
        else:  # a prefill (chunk): each of its requests is seeded by its rows
            counts = torch.zeros(R, E, device=self.device)
            counts.index_put_((req[:, None].expand_as(ids), ids), real, accumulate=True)
            tokens = torch.zeros(R, device=self.device).index_add_(
                0, req, torch.ones_like(req, dtype=torch.float32)
            )
            seen = tokens > 0
            seeded = counts / tokens.clamp(min=1)[:, None] / (1.0 - self.decay)
            hist.copy_(torch.where(seen[:, None], seeded, hist))
            self.active.masked_fill_(seen, 1.0)
            if pred is not None:  # the first decode token, from the prompt's last row
                rows = torch.arange(ids.shape[0], device=self.device)
                last = torch.zeros(R, dtype=torch.long, device=self.device)
                last.scatter_reduce_(0, req, rows, reduce="amax")
                x_last = x[last] if x is not None else None
                nxt = pred(layer, (1.0 - self.decay) * seeded, probs[last], chosen[last], x_last)
                self.next[:, layer].copy_(torch.where(seen[:, None], nxt, self.next[:, layer]))
        self.active[PADDING_ROW] = 0.0
        hist[PADDING_ROW] = 0.0
        src = self.next[:, layer] if pred is not None else (1.0 - self.decay) * hist
        p = src.clamp(max=1.0 - 1e-6)  # [R, E]
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
                         decode: bool, router_logits: torch.Tensor | None = None,
                         hidden_states: torch.Tensor | None = None) -> None:  # fmt: skip
        value = self.history.observe(layer, requests, ids, decode, router_logits, hidden_states)
        if isinstance(self.pred, np.ndarray):  # host planning: a read it is already paying for
            self.pred[layer] = value.cpu().numpy()
        else:
            self.pred[layer].copy_(value)

    def probabilities(self, layer: int) -> Array:
        """[E]: the chance that some running request routes to each expert at its next token."""
        return self.pred[layer]

    def value(self, slot_layer: Array, slot_expert: Array) -> Array:
        return self.pred[slot_layer, slot_expert]
