"""Overlap-aware admission (ExpertFlow's token regrouping, across batches): when more requests
wait than can run, admit first the ones whose routing overlaps what the expert cache holds, with
a bound on how often any request can be passed over.

What a server knows of a waiting request is its prompt's tokens, not their routing (that comes
with the prefill). ``PromptProfiler`` estimates it: each MoE layer's router on the prompt tokens'
own embeddings (through that layer's pre-MoE RMSNorm; no attention, no earlier layers), the share
of their top-k choices per expert, [L, E]. On the serving replay it orders the queue as well as
the true prompt routing does (README). ``OverlapAdmission`` orders a queue by each profile's mass
on the resident experts. Imports only torch: the scheduler hook and the replay both drive it.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch


class PromptProfiler:
    """A request's expert profile before its prefill: [L, E] float32, rows summing to 1."""

    def __init__(
        self,
        embed: torch.Tensor,  # [V, H] the token embeddings
        norms: Sequence[tuple[torch.Tensor, float]],  # per MoE layer: pre-MoE RMSNorm (weight, eps)
        routers: Sequence[torch.Tensor],  # per MoE layer: router weight [E, H]
        top_k: int,
        max_tokens: int = 1024,
    ) -> None:
        if len(norms) != len(routers) or not routers:
            raise ValueError(f"need one norm per router, got {len(norms)} and {len(routers)}")
        self.embed, self.norms, self.routers = embed, list(norms), list(routers)
        self.top_k, self.max_tokens = top_k, max_tokens
        self.num_experts = routers[0].shape[0]

    @torch.no_grad()
    def __call__(self, token_ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
        ids = torch.as_tensor(token_ids, dtype=torch.long, device=self.embed.device)
        ids = ids[-self.max_tokens :]  # the prompt's end: what its decode continues from
        x = self.embed.index_select(0, ids).float()  # [P, H]
        out = []
        for (weight, eps), router in zip(self.norms, self.routers):
            h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
            top = (h @ router.float().T).topk(self.top_k, -1).indices.reshape(-1)
            out.append(torch.bincount(top, minlength=self.num_experts).float() / top.numel())
        return torch.stack(out)  # [L, E]


class OverlapAdmission:
    """Orders a waiting queue: a request passed over ``max_passed`` times goes first (in queue
    order); then by its profile's mass on the resident experts, most first; then queue order.

    ``order`` is called with the queue as the base policy left it (SGLang's FCFS: arrival order)
    each time the scheduler orders it. Requests gone since the last call were admitted, and every
    request still waiting that stood before an admitted one in that call's queue was passed over
    once."""

    def __init__(self, max_passed: int) -> None:
        if max_passed < 0:
            raise ValueError(f"max_passed must be >= 0, got {max_passed}")
        self.max_passed = max_passed
        self.passed: dict[Hashable, int] = {}
        self._previous: list[Hashable] = []

    def order(
        self, keys: Sequence[Hashable], profiles: Sequence[torch.Tensor], resident: torch.Tensor
    ) -> list[int]:
        """Indices into ``keys`` (the queue, in base order) in admission order. ``profiles``:
        one [L, E] per key; ``resident``: [L, E] bool, what the cache holds now."""
        self._count_passes(keys)
        if not keys:
            return []
        mass = (torch.stack(list(profiles)) * resident.to(profiles[0].device)).sum((-2, -1))
        mass = mass.tolist()  # one read, in the scheduler (never inside a captured step)

        def key(i: int) -> tuple:
            if self.passed.get(keys[i], 0) >= self.max_passed:
                return (0, 0.0, i)
            return (1, -mass[i], i)

        return sorted(range(len(keys)), key=key)

    def _count_passes(self, keys: Sequence[Hashable]) -> None:
        waiting = set(keys)
        last_admitted = max(
            (i for i, k in enumerate(self._previous) if k not in waiting), default=-1
        )
        for k in self._previous[:last_admitted]:
            if k in waiting:
                self.passed[k] = self.passed.get(k, 0) + 1
        self.passed = {k: n for k, n in self.passed.items() if k in waiting}
        self._previous = list(keys)
