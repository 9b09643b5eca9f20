"""Triton kernels for the Lynx selection policy on decode batches.

Two launches, no host sync, fixed output shapes, CUDA-graph capturable (num_valid may be a
device tensor read inside the kernels):
  _keep_kernel   one program per group: scans the valid tokens (confidence bins, protected
                 choices, batch-wide scores, deterministic: no atomics), then picks the kept
                 set on device (target size, then a bisection over the scores' bit patterns;
                 miss-aware: resident candidates first, then the missing ones).
  _remap_kernel  one program per block of rows (valid and padding alike): moves choices
                 outside the kept set to kept experts the row lacks (the row's best by logit,
                 or, "similar", the most similar to the expert lost) and sets the weights.
Each policy ("lynx", "drop", "similar", "oea") and miss-aware selection is a constexpr variant.
The spec and test oracle is `lynx_sglang.selection.policy.select_experts_ref`.

Named dimensions: G groups, T tokens, E experts, K = k top-k slots.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from lynx_sglang.config import BUDGET_SCALE, SelectionParams
from lynx_sglang.selection.types import (
    MAX_KERNEL_EXPERTS,
    ExpertSimilarity,
    NumValid,
    SelectionResult,
)

__all__ = ["interpreted", "select_experts_triton"]

FLOAT32_MIN = tl.constexpr(-3.4028234663852886e38)  # finite stand-in for -inf logits (remap)
INF_BITS = tl.constexpr(0x7F800000)  # bit pattern of +inf in float32


@triton.jit
def _div(x, y):
    """IEEE float32 division, broadcasting (Triton's `/` is approximate on NVIDIA GPUs)."""
    x, y = tl.broadcast(x, y)
    return tl.math.div_rn(x, y)


@triton.jit
def _keep_kernel(
    logits_ptr,  # [G, T, E] any float
    ids_ptr,  # [G, T, K] int32/int64
    nv_ptr,  # [1] or [G] int, read when NV_FROM_PTR
    resident_ptr,  # [E] uint8, read when CACHE_BONUS or MISS_AWARE
    critical_ptr,  # [E] uint8, read when POLICY == "similar"
    keep_ptr,  # out [G, E] uint8
    scores_ptr,  # out [G, E] float32
    T,
    E,
    nv_const,
    nv_stride,
    conf_bins,
    low_w,  # low_conf_weight (1 when conf_bins == 1)
    low_w_m1,  # low_conf_weight - 1 (0 when conf_bins == 1)
    bins_m1,  # conf_bins - 1 (1 when conf_bins == 1)
    protect_top,
    protect_p,
    bonus,  # 1 + cache_bonus
    budget_ppm,  # in millionths: miss_budget when MISS_AWARE, else budget
    n_cap,  # max(max_experts, K), 0 for no cap
    K: tl.constexpr,
    POLICY: tl.constexpr,  # "lynx" | "drop" | "similar" | "oea"
    NV_FROM_PTR: tl.constexpr,
    CACHE_BONUS: tl.constexpr,  # resident scores x bonus
    MISS_AWARE: tl.constexpr,  # the budget on the missing experts, resident ones first
    SCALE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    g = tl.program_id(0)
    if NV_FROM_PTR:  # the group's real rows: a device count (CUDA graphs) or an argument
        nv = tl.minimum(tl.maximum(tl.load(nv_ptr + g * nv_stride).to(tl.int32), 0), T)
    else:
        nv = nv_const
    e = tl.arange(0, BLOCK_E)
    e_in = e < E
    j = tl.arange(0, BLOCK_K)
    j_in = j < K
    score = tl.zeros([BLOCK_E], dtype=tl.float64)  # sum of w_t * p[t, e], order-free
    hit = tl.zeros([BLOCK_E], dtype=tl.int32)  # valid tokens choosing e
    phit = tl.zeros([BLOCK_E], dtype=tl.int32)  # valid tokens protecting e

    for t0 in range(0, nv, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        t_in = t < nv
        row = (g * T + t).to(tl.int64)  # [BT]
        # softmax statistics of each row
        lg = tl.load(
            logits_ptr + row[:, None] * E + e[None, :],
            mask=t_in[:, None] & e_in[None, :],
            other=float("-inf"),
        ).to(tl.float32)  # [BT, BE]
        mx = tl.where(t_in, tl.max(lg, 1), 0.0)  # [BT]
        ssum = tl.where(t_in, tl.sum(tl.exp(lg - mx[:, None]), 1), 1.0)  # [BT]
        # 2. confidence bin -> token weight
        conf = _div(tl.full([BLOCK_T], 1.0, tl.float32), ssum)  # top-1 p
        b = tl.minimum(tl.floor(conf * conf_bins), bins_m1)
        tok_w = low_w - _div(b * low_w_m1, tl.full([BLOCK_T], bins_m1, tl.float32))
        # 3. rank the k choices by logit (ties: lower position), protect
        tj_in = t_in[:, None] & j_in[None, :]
        ids = tl.load(ids_ptr + row[:, None] * K + j[None, :], mask=tj_in, other=0).to(tl.int32)
        lgk = tl.load(logits_ptr + row[:, None] * E + ids, mask=tj_in, other=float("-inf"))
        lgk = lgk.to(tl.float32)  # [BT, BK]
        pk = _div(tl.exp(lgk - mx[:, None]), ssum[:, None])  # [BT, BK]
        prot = _protected(lgk, pk, j, j_in, protect_top, protect_p) & tj_in
        # 4. per-expert scores: mark each row's chosen (and protected) experts, then reduce
        chosen_t = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.int1)
        prot_t = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.int1)
        for jj in tl.static_range(K):
            id_j = tl.load(ids_ptr + row * K + jj, mask=t_in, other=-1).to(tl.int32)  # [BT]
            pr_j = tl.sum(tl.where(j[None, :] == jj, prot.to(tl.int32), 0), 1) > 0  # [BT]
            match = id_j[:, None] == e[None, :]  # [BT, BE]
            chosen_t = chosen_t | match
            prot_t = prot_t | (match & pr_j[:, None])
        p = _div(tl.exp(lg - mx[:, None]), ssum[:, None])  # [BT, BE]
        contrib = tl.where(chosen_t, tok_w[:, None] * p, 0.0)  # [BT, BE] float32
        score += tl.sum(contrib.to(tl.float64), 0)
        hit += tl.sum(chosen_t.to(tl.int32), 0)
        phit += tl.sum(prot_t.to(tl.int32), 0)

    # 4b. cache bonus
    s = score.to(tl.float32)  # [BE]
    res = tl.zeros([BLOCK_E], dtype=tl.int1)
    if CACHE_BONUS or MISS_AWARE:
        res = tl.load(resident_ptr + e, mask=e_in, other=0) != 0
    if CACHE_BONUS:
        s = tl.where(res, s * bonus, s)
    tl.store(scores_ptr + g * E + e, s, mask=e_in)
    chosen = hit > 0
    in_p = phit > 0
    if POLICY == "similar":  # chosen experts without a similar peer are never moved
        in_p = in_p | (chosen & (tl.load(critical_ptr + e, mask=e_in, other=0) != 0))
    # 5. target size, then the best `quota` candidates by (score desc, index asc)
    distinct = tl.sum(chosen.to(tl.int64), 0)
    free = chosen & res  # miss-aware: chosen and already resident (no copy)
    if MISS_AWARE:  # n = R + max(ceil(miss_budget * (D - R)), Pm)
        n_free = tl.sum(free.to(tl.int64), 0)
        p_missing = tl.sum((in_p & ~free).to(tl.int64), 0)
        missing = ((distinct - n_free) * budget_ppm + (SCALE - 1)) // SCALE
        n = n_free + tl.maximum(missing, p_missing)
    else:
        n = (distinct * budget_ppm + (SCALE - 1)) // SCALE
    n = tl.maximum(n, K)
    n = tl.where(n_cap > 0, tl.minimum(n, n_cap), n)
    if POLICY == "oea":
        n = tl.full([], K, tl.int64)
    cand = chosen & ~in_p
    quota = tl.maximum(n - tl.sum(in_p.to(tl.int64), 0), 0)
    if MISS_AWARE:  # resident candidates first, the rest of the quota on the missing ones
        first = cand & free
        q_first = tl.minimum(quota, tl.sum(first.to(tl.int64), 0))
        rest = cand & ~free
        q_rest = tl.minimum(quota - q_first, tl.sum(rest.to(tl.int64), 0))
        keep = in_p | _top_quota(s, first, q_first.to(tl.int32))
        keep = keep | _top_quota(s, rest, q_rest.to(tl.int32))
    else:
        quota = tl.minimum(quota, tl.sum(cand.to(tl.int64), 0)).to(tl.int32)
        keep = in_p | _top_quota(s, cand, quota)
    tl.store(keep_ptr + g * E + e, keep.to(tl.uint8), mask=e_in)


@triton.jit
def _protected(lgk, pk, j, j_in, protect_top, protect_p):
    """[BT, BK] bool: choice rank < protect_top, or p-mass ranked before it < protect_p."""
    a = lgk[:, :, None]  # choice i
    b = lgk[:, None, :]  # choice j
    earlier = (j[:, None] < j[None, :])[None, :, :]
    before = ((a > b) | ((a == b) & earlier)) & j_in[None, :, None]  # [BT, BK, BK]
    rank = tl.sum(before.to(tl.int32), 1)  # [BT, BK]
    mass = tl.sum(tl.where(before, pk[:, :, None], 0.0), 1)  # [BT, BK]
    return (rank < protect_top) | ((mass < protect_p) & (protect_p > 0.0))


@triton.jit
def _top_quota(s, cand, quota):
    """[BE] bool: the `quota` candidates with the highest scores (ties: lower index).

    Scores are >= 0, so their int32 bit patterns order like the floats. Bisection finds the
    largest threshold thr with #(cand & bits >= thr) >= quota; everything above thr is taken,
    and ties at thr are taken in index order up to the quota.
    """
    bits = s.to(tl.int32, bitcast=True)
    lo = tl.full([], 0, tl.int32)
    hi = tl.full([], INF_BITS + 1, tl.int32)
    for _ in range(31):  # hi - lo <= 2^31 halves to 1
        mid = lo + (hi - lo) // 2
        enough = tl.sum((cand & (bits >= mid)).to(tl.int32), 0) >= quota
        lo = tl.where(enough, mid, lo)
        hi = tl.where(enough, hi, mid)
    above = cand & (bits > lo)
    at = cand & (bits == lo)
    room = quota - tl.sum(above.to(tl.int32), 0)
    return above | (at & (tl.cumsum(at.to(tl.int32), 0) <= room))


@triton.jit
def _remap_kernel(
    logits_ptr,  # [G, T, E]
    ids_ptr,  # [G, T, K]
    w_ptr,  # [G, T, K]
    keep_ptr,  # [G, E] uint8 from _keep_kernel
    sim_ptr,  # [E, E] float32, read when POLICY == "similar"
    ids_out_ptr,  # out [G, T, K] ids dtype
    w_out_ptr,  # out [G, T, K] weights dtype
    T,
    E,
    K: tl.constexpr,
    POLICY: tl.constexpr,  # "lynx" | "drop" | "similar" | "oea"
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    g = tl.program_id(0)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_in = t < T  # valid and padding rows alike
    row = (g * T + t).to(tl.int64)
    e = tl.arange(0, BLOCK_E)
    e_in = e < E
    j = tl.arange(0, BLOCK_K)
    j_in = j < K
    tj_in = t_in[:, None] & j_in[None, :]

    lg = tl.load(
        logits_ptr + row[:, None] * E + e[None, :],
        mask=t_in[:, None] & e_in[None, :],
        other=float("-inf"),
    ).to(tl.float32)  # [BT, BE]
    mx = tl.where(t_in, tl.max(lg, 1), 0.0)
    ssum = tl.where(t_in, tl.sum(tl.exp(lg - mx[:, None]), 1), 1.0)
    ids = tl.load(ids_ptr + row[:, None] * K + j[None, :], mask=tj_in, other=0).to(tl.int32)
    w = tl.load(w_ptr + row[:, None] * K + j[None, :], mask=tj_in, other=0.0)  # [BT, BK]
    kept_e = tl.load(keep_ptr + g * E + e, mask=e_in, other=0) != 0  # [BE]
    kept_k = tl.load(keep_ptr + g * E + ids, mask=tj_in, other=0) != 0  # [BT, BK]

    # 6. kept choices stay (protected experts all are kept); each other slot, in order, takes
    # a kept expert that the row lacks
    avail = tl.broadcast_to(kept_e[None, :], [BLOCK_T, BLOCK_E])  # [BT, BE]
    for jj in tl.static_range(K):
        id_j = tl.load(ids_ptr + row * K + jj, mask=t_in, other=-1).to(tl.int32)  # [BT]
        avail = avail & (e[None, :] != id_j[:, None])
    moved = ~kept_k & tj_in  # [BT, BK]
    need = tl.sum(moved.to(tl.int32), 1)  # [BT]
    change = (need > 0) & (tl.sum(avail.to(tl.int32), 1) >= need)
    new_ids = ids
    if POLICY == "similar":
        # the available expert most similar to the one the slot loses (ties: lower index),
        # then no longer available to the row's later slots; every weight stays
        for jj in tl.static_range(K):
            col = j[None, :] == jj
            mv_j = (tl.sum(tl.where(col, moved.to(tl.int32), 0), 1) > 0) & change  # [BT]
            id_j = tl.load(ids_ptr + row * K + jj, mask=t_in, other=0).to(tl.int64)  # [BT]
            sim = tl.load(
                sim_ptr + id_j[:, None] * E + e[None, :],
                mask=t_in[:, None] & e_in[None, :],
                other=float("-inf"),
            )  # [BT, BE] matrix[id_j, e]
            sim = tl.where(avail, sim, float("-inf"))
            pick = tl.argmax(sim, 1, tie_break_left=True).to(tl.int32)  # [BT]
            new_ids = tl.where(col & mv_j[:, None], pick[:, None], new_ids)
            avail = avail & ~(mv_j[:, None] & (e[None, :] == pick[:, None]))
        out_w = w
    else:
        # the row's highest-logit kept experts (ties: lower index), in slot order
        pref = tl.where(avail, tl.maximum(lg, FLOAT32_MIN), float("-inf"))  # [BT, BE]
        for jj in tl.static_range(K):
            col = j[None, :] == jj
            mv_j = (tl.sum(tl.where(col, moved.to(tl.int32), 0), 1) > 0) & change  # [BT]
            pick = tl.argmax(pref, 1, tie_break_left=True).to(tl.int32)  # [BT] lowest index wins
            new_ids = tl.where(col & mv_j[:, None], pick[:, None], new_ids)
            pref = tl.where(mv_j[:, None] & (e[None, :] == pick[:, None]), float("-inf"), pref)

        # 7. renormalise changed rows to their original weight sum, by router probability
        lgn = tl.load(logits_ptr + row[:, None] * E + new_ids, mask=tj_in, other=float("-inf"))
        pn = _div(tl.exp(lgn.to(tl.float32) - mx[:, None]), ssum[:, None])
        pn = tl.where(tj_in, pn, 0.0)  # [BT, BK]
        w32 = w.to(tl.float32)  # [BT, BK], 0 outside the row
        total = tl.sum(w32, 1)[:, None]  # [BT, 1]
        psum = tl.sum(pn, 1)[:, None]
        even = _div(total, tl.full([BLOCK_T, 1], K, tl.float32))  # only if all new p underflow
        w_new = tl.where(psum > 0, _div(pn * total, tl.where(psum > 0, psum, 1.0)), even)
        if POLICY == "drop":  # over the row's kept choices instead; moved slots weigh 0
            w_kept = tl.where(kept_k, w32, 0.0)  # [BT, BK]
            kept_sum = tl.sum(w_kept, 1)[:, None]  # [BT, 1]
            w_drop = _div(w_kept * total, tl.where(kept_sum > 0, kept_sum, 1.0))
            w_new = tl.where(kept_sum > 0, w_drop, w_new)
        out_w = tl.where(change[:, None], w_new.to(w.dtype), w)
    tl.store(ids_out_ptr + row[:, None] * K + j[None, :], new_ids, mask=tj_in)
    tl.store(w_out_ptr + row[:, None] * K + j[None, :], out_w, mask=tj_in)


def interpreted() -> bool:
    """Whether these kernels run in Triton's CPU interpreter: TRITON_INTERPRET=1 was set when
    Triton (its language) and this module were imported."""
    return isinstance(_keep_kernel, InterpretedFunction) and isinstance(
        tl.zeros, InterpretedFunction
    )


def select_experts_triton(
    router_logits: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    params: SelectionParams,
    num_valid: NumValid = None,
    resident: Optional[torch.Tensor] = None,
    similarity: Optional[ExpertSimilarity] = None,
) -> SelectionResult:
    """The Triton selection: same contract as `select_experts_ref` (leading dims are groups,
    one keep program each); resident must be [E]; similarity (matrix [E, E], critical [E]) is
    required by "similar". No host sync when num_valid is a tensor."""
    *lead, T, E = router_logits.shape
    k = topk_ids.shape[-1]
    _check(router_logits, topk_ids, topk_weights, params, num_valid, resident, similarity)
    if router_logits.device.type != "cuda" and not interpreted():
        raise ValueError(
            "the selection kernels take CUDA tensors, or CPU tensors when TRITON_INTERPRET=1 "
            "was set before triton and lynx_sglang.kernels.selection were imported"
        )
    G = math.prod(lead)
    dev = router_logits.device
    logits = router_logits.reshape(G, T, E).contiguous()  # [G, T, E]
    ids = topk_ids.reshape(G, T, k).contiguous()  # [G, T, k]
    w = topk_weights.reshape(G, T, k).contiguous()  # [G, T, k]

    keep = torch.empty(G, E, dtype=torch.uint8, device=dev)
    scores = torch.empty(G, E, dtype=torch.float32, device=dev)
    ids_out = torch.empty_like(ids)
    w_out = torch.empty_like(w)
    result = SelectionResult(
        ids_out.view(topk_ids.shape),
        w_out.view(topk_weights.shape),
        keep.view(torch.bool).view(*lead, E),
        scores.view(*lead, E),
    )
    if G == 0 or T == 0:
        keep.zero_()
        scores.zero_()
        return result

    # num_valid: a device count read in the kernels, or a launch argument
    nv_from_ptr = isinstance(num_valid, torch.Tensor)
    nv_ptr = num_valid.reshape(-1) if nv_from_ptr else scores
    nv_stride = 1 if nv_from_ptr and num_valid.numel() > 1 else 0
    nv_const = T if num_valid is None or nv_from_ptr else max(0, min(int(num_valid), T))
    cache_bonus = resident is not None and params.cache_bonus > 0.0
    miss_aware = resident is not None and params.miss_aware
    res_ptr = _as_uint8(resident) if cache_bonus or miss_aware else keep
    similar = params.policy == "similar"
    crit_ptr = _as_uint8(similarity.critical) if similar else keep
    sim_ptr = similarity.matrix.to(torch.float32).contiguous() if similar else scores  # [E, E]
    bins = params.conf_bins

    # tiles of [BLOCK_T, BLOCK_E] (and [BLOCK_T, BLOCK_K, BLOCK_K]): sized to stay in registers
    BLOCK_E = triton.next_power_of_2(E)
    BLOCK_K = triton.next_power_of_2(k)
    keep_bt = _block_t(BLOCK_E, BLOCK_K, 2048)
    remap_bt = _block_t(BLOCK_E, BLOCK_K, 1024)
    _keep_kernel[(G,)](
        logits, ids, nv_ptr, res_ptr, crit_ptr, keep, scores,
        T, E, nv_const, nv_stride,
        bins,
        params.low_conf_weight if bins > 1 else 1.0,
        params.low_conf_weight - 1.0 if bins > 1 else 0.0,
        float(bins - 1) if bins > 1 else 1.0,
        params.protect_top,
        params.protect_p,
        1.0 + params.cache_bonus,
        params.miss_budget_ppm if miss_aware else params.budget_ppm,
        max(params.max_experts, k) if params.max_experts > 0 else 0,
        K=k,
        POLICY=params.policy,
        NV_FROM_PTR=nv_from_ptr,
        CACHE_BONUS=cache_bonus,
        MISS_AWARE=miss_aware,
        SCALE=BUDGET_SCALE,
        BLOCK_T=keep_bt,
        BLOCK_E=BLOCK_E,
        BLOCK_K=BLOCK_K,
        num_warps=8,  # one program per group: use more of the SM
        enable_fp_fusion=False,  # plain IEEE multiply and add, as in the torch reference
    )  # fmt: skip
    _remap_kernel[(G, triton.cdiv(T, remap_bt))](
        logits, ids, w, keep, sim_ptr, ids_out, w_out,
        T, E,
        K=k,
        POLICY=params.policy,
        BLOCK_T=remap_bt,
        BLOCK_E=BLOCK_E,
        BLOCK_K=BLOCK_K,
        num_warps=4,
    )  # fmt: skip
    return result


def _block_t(block_e: int, block_k: int, tile: int) -> int:
    """Rows per program step: the [BT, BE] and [BT, BK, BK] tiles hold <= tile values. Not a
    function of T, so each decode batch size reuses the same compiled kernels."""
    return max(1, min(64, tile // block_e, tile // block_k**2))


def _check(
    logits: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    params: SelectionParams,
    num_valid: NumValid,
    resident: Optional[torch.Tensor],
    similarity: Optional[ExpertSimilarity],
) -> None:
    """Shapes, dtypes and devices the kernels take; raises ValueError otherwise."""
    *lead, T, E = logits.shape
    k = ids.shape[-1]
    if ids.shape != (*lead, T, k) or weights.shape != ids.shape:
        raise ValueError(
            f"shapes disagree: logits {tuple(logits.shape)}, ids {tuple(ids.shape)}, "
            f"weights {tuple(weights.shape)}"
        )
    if not 1 <= k <= E or E > MAX_KERNEL_EXPERTS:
        raise ValueError(f"kernels take 1 <= k <= E <= {MAX_KERNEL_EXPERTS}, got k={k}, E={E}")
    if ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"topk_ids must be int32 or int64, got {ids.dtype}")
    if not (logits.is_floating_point() and weights.is_floating_point()):
        raise ValueError("router_logits and topk_weights must be floating point")
    tensors = [ids, weights]
    if isinstance(num_valid, torch.Tensor):
        if num_valid.numel() not in (1, math.prod(lead)):
            raise ValueError("num_valid tensor must hold one count, or one per group")
        if num_valid.is_floating_point():
            raise ValueError("num_valid tensor must be an integer tensor")
        tensors.append(num_valid)
    if resident is not None:
        if resident.shape != (E,):
            raise ValueError(f"resident must be [E]={E}, got {tuple(resident.shape)}")
        tensors.append(resident)
    if params.policy == "similar" and similarity is None:
        raise ValueError("the similar policy needs the layer's ExpertSimilarity")
    if similarity is not None:
        matrix, critical = similarity
        if matrix.shape != (E, E) or not matrix.is_floating_point():
            shape = f"{tuple(matrix.shape)} {matrix.dtype}"
            raise ValueError(f"similarity matrix must be float [E, E], E={E}; got {shape}")
        if critical.shape != (E,):
            raise ValueError(f"similarity critical must be [E]={E}, got {tuple(critical.shape)}")
        tensors += [matrix, critical]
    if any(x.device != logits.device for x in tensors):
        raise ValueError("all selection inputs must be on one device")


def _as_uint8(mask: torch.Tensor) -> torch.Tensor:
    """A [E] bool/int mask as uint8 for the kernel (a view when it is already bool)."""
    mask = mask.contiguous()
    return mask.view(torch.uint8) if mask.dtype == torch.bool else (mask != 0).view(torch.uint8)
