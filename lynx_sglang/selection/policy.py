"""The Lynx expert-selection policy: the torch reference (the spec and the test
oracle for the Triton kernels) and the dispatch between the two.

Named dimensions: G groups (independent decode batches), T tokens, E experts, k top-k slots.
Imports only torch; the Triton kernels are imported lazily by the dispatch.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from lynx_sglang.config import BUDGET_SCALE, SelectionParams
from lynx_sglang.selection.types import (
    MAX_KERNEL_EXPERTS,
    ExpertSimilarity,
    NumValid,
    SelectionResult,
)

BACKENDS = ("auto", "triton", "torch")


# ---------------------------------------------------------------------------------------------
# Small pieces of the spec, shared by the reference and the tests.
# ---------------------------------------------------------------------------------------------


def valid_rows(num_valid: NumValid, lead: tuple[int, ...], T: int, device) -> torch.Tensor:
    """[..., T] bool: rows t < num_valid are real tokens, the rest CUDA-graph padding."""
    t = torch.arange(T, device=device)
    if num_valid is None:
        return torch.ones(*lead, T, dtype=torch.bool, device=device)
    if isinstance(num_valid, int):
        return (t < num_valid).expand(*lead, T)
    nv = num_valid.to(device=device, dtype=torch.long)
    nv = nv.reshape(()) if nv.numel() == 1 else nv.reshape(*lead, 1)  # one count, or per group
    return (t < nv).expand(*lead, T)


def bin_weights(conf: torch.Tensor, conf_bins: int, low_conf_weight: float) -> torch.Tensor:
    """Token weights from top-1 probabilities: low_conf_weight for the least confident bin,
    1 for the most confident, linear in between. conf: [...] float32 -> [...] float32."""
    if conf_bins == 1:
        return torch.ones_like(conf)
    b = torch.clamp(torch.floor(conf * conf_bins), max=conf_bins - 1)
    # divide by a tensor: CUDA turns division by a Python scalar into a reciprocal multiply
    return low_conf_weight - (b * (low_conf_weight - 1.0)) / b.new_full((), conf_bins - 1)


def target_size(
    distinct: torch.Tensor,
    k: int,
    params: SelectionParams,
    resident: Optional[torch.Tensor] = None,
    protected_missing: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Kept-set target n per group: [...] int64. distinct: D, the chosen count. Miss-aware
    selection passes resident, R, the chosen experts already resident (they cost no copy), and
    protected_missing, Pm, the protected ones that are not: the budget applies to the D - R
    missing ones (at ``miss_budget``), and protected ones are kept anyway:
    n = R + max(ceil(miss_budget * (D - R)), Pm)."""
    if params.policy == "oea":
        return torch.full_like(distinct, k)
    if resident is None:
        n = (distinct * params.budget_ppm + BUDGET_SCALE - 1) // BUDGET_SCALE  # ceil(budget * D)
    else:
        missing = (distinct - resident) * params.miss_budget_ppm + BUDGET_SCALE - 1
        missing = missing // BUDGET_SCALE
        n = resident + torch.maximum(missing, protected_missing)
    n = torch.clamp(n, min=k)
    if params.max_experts > 0:
        n = torch.clamp(n, max=max(params.max_experts, k))
    return n


def protected_choices(
    lg_k: torch.Tensor, p_k: torch.Tensor, protect_top: int, protect_p: float
) -> torch.Tensor:
    """Which of a token's k choices are protected. lg_k, p_k: [..., T, k] -> [..., T, k] bool.

    Choices rank by router logit (the order of p, without p's rounding ties), ties by position.
    """
    k = lg_k.shape[-1]
    pos = torch.arange(k, device=lg_k.device)
    a, b = lg_k[..., :, None], lg_k[..., None, :]  # [..., T, k, 1], [..., T, 1, k]
    # before[..., i, j]: choice i ranks ahead of choice j
    before = (a > b) | ((a == b) & (pos[:, None] < pos[None, :]))  # [..., T, k, k]
    rank = before.sum(-2)  # [..., T, k]
    prot = rank < protect_top
    if protect_p > 0.0:
        mass_before = (before * p_k[..., :, None]).sum(-2)  # [..., T, k]
        prot = prot | (mass_before < protect_p)
    return prot


def distinct_experts(
    topk_ids: torch.Tensor, num_experts: int, num_valid: NumValid = None
) -> torch.Tensor:
    """Distinct experts the valid rows choose, per group. ids: [..., T, k] -> [...] int64."""
    *lead, T, _ = topk_ids.shape
    valid = valid_rows(num_valid, tuple(lead), T, topk_ids.device)  # [..., T]
    mask = valid[..., None].expand(topk_ids.shape).reshape(*lead, -1)  # [..., T * k]
    return _scatter_true(mask, topk_ids.long().reshape(*lead, -1), num_experts).sum(-1)


# ---------------------------------------------------------------------------------------------
# The reference.
# ---------------------------------------------------------------------------------------------


def select_experts_ref(
    router_logits: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    params: SelectionParams,
    num_valid: NumValid = None,
    resident: Optional[torch.Tensor] = None,
    similarity: Optional[ExpertSimilarity] = None,
) -> SelectionResult:
    """Shrink a decode batch's set of active experts (the spec; vectorised over groups).

    Shapes: router_logits [..., T, E] (any float dtype), topk_ids [..., T, k] (int32/int64),
    topk_weights [..., T, k]; leading dims are independent groups. Rows t >= num_valid are
    CUDA-graph padding. resident: [E] (or [..., E]) bool, experts now on the GPU (read by the
    cache bonus and by miss-aware selection). similarity: the layer's ExpertSimilarity
    (finite values), required by the "similar" policy.

    1. p = softmax(logits.float()). Valid rows: t < num_valid.
    2. Confidence c_t = max_e p[t, e]; bin b_t = min(floor(c_t * bins), bins - 1); token
       weight w_t = low - (b_t * (low - 1)) / (bins - 1) (1 when bins == 1): low-confidence
       tokens' choices weigh more, since moving a confident token's choices costs less.
    3. A token's k choices rank by router logit descending (= by p; ties: lower position).
       Rank r is protected if r < protect_top, or if protect_p > 0 and the p-mass of the
       choices ranked before it is < protect_p. Only valid rows protect. OEA: protect_top = k0.
    4. Score s_e = sum over valid t choosing e of w_t * p[t, e] (float32 products summed in
       float64, so the order of the sum does not matter; returned as float32); resident
       experts' scores x (1 + cache_bonus). Chosen: picked by a valid token; D = #chosen.
       P: experts with a protected choice; "similar" adds the chosen critical experts.
       (A row's ids are distinct, as top-k makes them.)
    5. n = max(ceil(budget * D), k) (budget in millionths); miss-aware (miss_budget > 0 and a
       resident mask): max(R + max(ceil(miss_budget * (D - R)), Pm), k), R the chosen resident
       experts, Pm the protected experts
       not resident (so every chosen resident expert is kept unless the cap binds; OEA's n
       stays k); capped at max(max_experts, k) when
       max_experts > 0; OEA: n = k. Keep = P + the best (n - |P|)+ chosen experts outside P,
       ranked by score (miss-aware: resident ones first; ties: lower index). With no valid
       rows nothing is kept.
    6. Every row (padding too: it has no protected choices) keeps a choice if it is kept
       (protected choices all are). The other, "moved", slots:
       lynx, oea: each, in position order, takes the token's highest-logit kept expert not
         already in the row (ties: lower index);
       similar: each, in position order, takes the kept expert not already in the row (nor
         taken by an earlier slot) with the highest similarity to the expert it loses (ties:
         lower index);
       drop: as lynx, at weight 0 (the ids only keep each row's k ids distinct, as fused
         kernels expect; a weight-0 choice of a kept expert costs no expert).
       A row with fewer available kept experts than moved slots stays unchanged. k distinct
       ids per row.
    7. Unchanged rows keep their weights bit for bit. A changed row with original weight sum S:
       lynx, oea: w'_j = p[t, id'_j] * S / sum_j p[t, id'_j] (S / k if that sum is 0);
       similar: each slot keeps its weight (the stand-in does the lost expert's share);
       drop: moved slots 0, kept slots w_j * S / sum_kept w_j in float32; a row whose kept
         choices weigh 0 in all (none kept: padding rows, or protect_top 0) as lynx.
    """
    *lead_list, T, E = router_logits.shape
    lead = tuple(lead_list)
    k = topk_ids.shape[-1]
    dev = router_logits.device
    if topk_ids.shape != (*lead, T, k) or topk_weights.shape != topk_ids.shape:
        raise ValueError(
            f"shapes disagree: logits {tuple(router_logits.shape)}, ids "
            f"{tuple(topk_ids.shape)}, weights {tuple(topk_weights.shape)}"
        )

    # 1. router probabilities
    logits = router_logits.float()  # [..., T, E]
    ex = torch.exp(logits - logits.amax(-1, keepdim=True))
    p = ex / ex.sum(-1, keepdim=True)  # [..., T, E]
    ids = topk_ids.long()  # [..., T, k]
    valid = valid_rows(num_valid, lead, T, dev)  # [..., T]

    # 2. token confidence -> score weight
    tok_w = bin_weights(p.amax(-1), params.conf_bins, params.low_conf_weight)  # [..., T]

    # 3. protected choices
    lg_k = logits.gather(-1, ids)  # [..., T, k]
    p_k = p.gather(-1, ids)  # [..., T, k]
    prot = protected_choices(lg_k, p_k, params.protect_top, params.protect_p)
    prot = prot & valid[..., None]  # [..., T, k]
    if params.policy == "similar" and similarity is None:
        raise ValueError("the similar policy needs the layer's ExpertSimilarity")

    # 4. batch-wide scores over valid rows
    hits = _scatter_true(valid[..., None].expand(ids.shape), ids, E)  # [..., T, E]
    contrib = torch.where(hits, tok_w[..., None] * p, 0.0)  # [..., T, E] float32
    scores = contrib.double().sum(-2).float()  # [..., E]
    if resident is not None and params.cache_bonus > 0.0:
        bonus = 1.0 + params.cache_bonus  # a float32 multiply, as in the kernel
        scores = torch.where(resident.to(dev), scores * bonus, scores)
    chosen = hits.any(-2)  # [..., E]
    in_p = _scatter_true(prot, ids, E).any(-2)  # [..., E]
    if params.policy == "similar":
        in_p = in_p | (chosen & similarity.critical.to(dev))

    # 5. the kept set
    free = None  # miss-aware: the chosen experts already resident
    if params.miss_aware and resident is not None:
        free = chosen & resident.to(dev)
    if free is None:
        n = target_size(chosen.sum(-1), k, params)  # [...]
    else:
        n = target_size(chosen.sum(-1), k, params, free.sum(-1), (in_p & ~free).sum(-1))
    quota = torch.clamp(n - in_p.sum(-1), min=0)  # [...]
    cand = chosen & ~in_p  # [..., E]
    key = torch.where(cand, scores, float("-inf"))
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices  # [..., E]
    if free is not None:  # resident candidates first, each part in score order
        first = (cand & free).gather(-1, order)
        order = order.gather(-1, torch.sort(first.byte(), dim=-1, descending=True, stable=True).indices)
    rank = torch.empty_like(order).scatter_(
        -1, order, torch.arange(E, device=dev).expand(order.shape)
    )
    keep = in_p | (cand & (rank < quota[..., None]))  # [..., E]

    # 6. move each row's unkept choices (protected choices are kept experts)
    stay = keep.gather(-1, ids.reshape(*lead, T * k)).reshape(ids.shape)  # [..., T, k]
    moved = ~stay  # [..., T, k]
    need = moved.sum(-1)  # [..., T]
    in_row = _scatter_true(torch.ones_like(stay), ids, E)  # [..., T, E]
    avail = keep[..., None, :] & ~in_row  # [..., T, E] kept experts the row lacks
    change = (need > 0) & (avail.sum(-1) >= need)  # [..., T]
    total = topk_weights.float().sum(-1, keepdim=True)  # [..., T, 1]
    if params.policy == "similar":
        new_ids = _similar_moves(ids, moved & change[..., None], avail, similarity.matrix)
        w_new = topk_weights.float()
    else:
        finite = torch.clamp(logits, min=torch.finfo(torch.float32).min)  # -inf logits usable
        pref = torch.where(avail, finite, float("-inf"))  # [..., T, E]
        best = torch.sort(pref, dim=-1, descending=True, stable=True).indices  # [..., T, E]
        slot = torch.clamp(moved.long().cumsum(-1) - 1, min=0)  # [..., T, k] q-th moved slot
        repl = best.gather(-1, slot)  # [..., T, k]
        new_ids = torch.where(moved & change[..., None], repl, ids)  # [..., T, k]
        # 7. renormalise changed rows by router probability over the new ids
        p_new = p.gather(-1, new_ids)  # [..., T, k]
        p_sum = p_new.sum(-1, keepdim=True)
        w_new = torch.where(p_sum > 0, p_new * total / p_sum, total / k)
        if params.policy == "drop":  # over the row's kept choices instead; moved slots weigh 0
            w_kept = torch.where(stay, topk_weights.float(), 0.0)  # [..., T, k]
            kept_sum = w_kept.sum(-1, keepdim=True)
            w_drop = w_kept * total / torch.where(kept_sum > 0, kept_sum, 1.0)
            w_new = torch.where(kept_sum > 0, w_drop, w_new)
    out_w = torch.where(change[..., None], w_new.to(topk_weights.dtype), topk_weights)
    return SelectionResult(new_ids.to(topk_ids.dtype), out_w, keep, scores)


def _similar_moves(
    ids: torch.Tensor, move: torch.Tensor, avail: torch.Tensor, sim: torch.Tensor
) -> torch.Tensor:
    """Step 6 of "similar": each moved slot j, in order, takes the available expert most similar
    to ids[..., t, j] (ties: lower index), which is then no longer available in that row.
    ids, move: [..., T, k]; avail: [..., T, E]; sim: [E, E] -> new ids [..., T, k]."""
    sim = sim.to(device=ids.device, dtype=torch.float32)
    out, avail = ids.clone(), avail.clone()
    for j in range(ids.shape[-1]):
        row_sim = sim[ids[..., j]]  # [..., T, E] similarity to the expert slot j loses
        pick = torch.where(avail, row_sim, float("-inf")).argmax(-1)  # [..., T] first max
        mv = move[..., j]
        out[..., j] = torch.where(mv, pick, ids[..., j])
        avail = avail & ~(mv[..., None] & (torch.arange(avail.shape[-1], device=ids.device) == pick[..., None]))
    return out


def _scatter_true(mask: torch.Tensor, ids: torch.Tensor, E: int) -> torch.Tensor:
    """[..., T, E] bool: True at ids[..., t, j] where mask[..., t, j]."""
    out = torch.zeros(*ids.shape[:-1], E + 1, dtype=torch.bool, device=ids.device)
    out.scatter_(-1, torch.where(mask, ids, E), True)
    return out[..., :E]


# ---------------------------------------------------------------------------------------------
# Dispatch.
# ---------------------------------------------------------------------------------------------


def select_experts(
    router_logits: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    params: SelectionParams,
    num_valid: NumValid = None,
    resident: Optional[torch.Tensor] = None,
    similarity: Optional[ExpertSimilarity] = None,
    backend: str = "auto",
) -> SelectionResult:
    """Select with the Triton kernels where they run (CUDA, or TRITON_INTERPRET=1), else torch.

    backend: "auto" | "triton" | "torch". "auto" also falls back to torch for inputs the kernels
    do not take (more than MAX_KERNEL_EXPERTS experts, a per-group resident mask).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "triton" or (backend == "auto" and _kernels_run(router_logits, resident)):
        from lynx_sglang.kernels.selection import select_experts_triton

        return select_experts_triton(
            router_logits, topk_ids, topk_weights, params, num_valid, resident, similarity
        )
    return select_experts_ref(
        router_logits, topk_ids, topk_weights, params, num_valid, resident, similarity
    )


def _kernels_run(router_logits: torch.Tensor, resident: Optional[torch.Tensor]) -> bool:
    """ "auto": the kernels take CUDA tensors, and CPU tensors under TRITON_INTERPRET=1."""
    if not kernels_accept(router_logits, resident):
        return False
    if router_logits.is_cuda:
        return True
    if router_logits.device.type != "cpu" or os.environ.get("TRITON_INTERPRET") != "1":
        return False
    from lynx_sglang.kernels.selection import interpreted

    return interpreted()  # False if the kernels were imported before TRITON_INTERPRET was set


def kernels_accept(router_logits: torch.Tensor, resident: Optional[torch.Tensor]) -> bool:
    """Whether the Triton kernels take this input (else the torch reference runs)."""
    return router_logits.shape[-1] <= MAX_KERNEL_EXPERTS and (
        resident is None or resident.dim() == 1
    )
