"""The torch reference of the Lynx selection policy: hand-worked examples pin the semantics,
hypothesis properties cover the rest (the reference is the oracle for the kernels)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lynx_sglang.config import LynxConfig
from lynx_sglang.selection import (
    SelectionParams,
    distinct_experts,
    select_experts,
    select_experts_ref,
)
from lynx_sglang.selection.policy import target_size

PROPS = settings(max_examples=40, deadline=None)


def routing(seed, T, E, k, kind="normal", shuffle=True, lead=()):
    """Router logits and their top-k (slots shuffled: the policy must not assume sorted ids).

    kind: "normal" (no ties), "ties" (integer logits), "equal" (all logits equal), "flat"
    (all logits equal, random ids: scores tie at the cut).
    """
    g = torch.Generator().manual_seed(seed)
    shape = (*lead, T, E)
    if kind == "normal":
        logits = torch.randn(shape, generator=g) * 2
    elif kind == "ties":
        logits = torch.randint(0, 3, shape, generator=g).float()
    else:
        logits = torch.zeros(shape)
    weights, ids = torch.softmax(logits, -1).topk(k)  # [..., T, k]
    if kind == "flat":
        ids = torch.rand(shape, generator=g).argsort(-1)[..., :k]
    if shuffle:
        perm = torch.rand(*lead, T, k, generator=g).argsort(-1)
        ids, weights = ids.gather(-1, perm), weights.gather(-1, perm)
    return logits, ids, weights


@st.composite
def cases(draw, kinds=("normal", "ties", "equal", "flat")):
    """(logits, ids, weights, params, num_valid) for small decode batches."""
    E = draw(st.integers(2, 20))
    k = draw(st.integers(1, min(E, 6)))
    T = draw(st.integers(1, 10))
    logits, ids, weights = routing(
        draw(st.integers(0, 2**31 - 1)), T, E, k, draw(st.sampled_from(kinds))
    )
    params = SelectionParams(
        policy=draw(st.sampled_from(["lynx", "lynx", "oea"])),
        budget=draw(st.sampled_from([0.1, 0.25, 0.5, 0.6, 0.75, 1.0])),
        max_experts=draw(st.sampled_from([0, 0, 1, 3, 8])),
        protect_top=draw(st.integers(0, 2)),
        protect_p=draw(st.sampled_from([0.0, 0.0, 0.3, 0.7])),
        conf_bins=draw(st.integers(1, 5)),
        low_conf_weight=draw(st.sampled_from([1.0, 2.0, 4.0])),
    )
    num_valid = draw(st.one_of(st.none(), st.integers(0, T)))
    return logits, ids, weights, params, num_valid


def n_valid(num_valid, T):
    return T if num_valid is None else num_valid


def protected_mask(logits, ids, params):
    """[T, k] protected choices, computed independently of the reference (sort + cumsum)."""
    p = torch.softmax(logits.float(), -1)
    lg_k, p_k = logits.float().gather(-1, ids), p.gather(-1, ids)
    order = torch.sort(-lg_k, dim=-1, stable=True).indices  # rank -> position
    rank = order.argsort(-1)  # position -> rank
    p_sorted = p_k.gather(-1, order)
    mass_before = (p_sorted.cumsum(-1) - p_sorted).gather(-1, rank)
    prot = rank < params.protect_top
    if params.protect_p > 0:
        prot |= mass_before < params.protect_p - 1e-6  # margin: cumsum rounds differently
    return prot


# ---------------------------------------------------------------------------------------------
# Hand-worked examples
# ---------------------------------------------------------------------------------------------


def test_example_budget_keeps_protected_plus_best_scored():
    """T=3, E=6, k=2, no confidence bins. D = 5 chosen {0,1,2,3,4}; budget 0.5 -> n = 3.
    Top-1s are protected: P = {0, 3}; one more slot goes to the best score among {1, 2, 4}:
    p[1, 2] ~ 0.37 > p[2, 4] ~ 0.23 > p[0, 1] ~ 0.10, so keep = {0, 2, 3}. Token 0 moves
    expert 1 to its best kept expert not in the row (3: logit 0.8 > 0.5); token 2 moves 4 to 2."""
    logits = torch.tensor(
        [
            [3.0, 1.0, 0.5, 0.8, -1.0, -2.0],
            [3.0, -1.0, 2.5, -2.0, -2.0, -2.0],
            [-1.0, -1.0, 0.0, 2.0, 1.0, -3.0],
        ]
    )
    ids = torch.tensor([[0, 1], [2, 0], [3, 4]])  # token 1's slots unsorted on purpose
    p = torch.softmax(logits, -1)
    weights = p.gather(-1, ids)
    params = SelectionParams(budget=0.5, conf_bins=1)
    out = select_experts_ref(logits, ids, weights, params)
    assert out.keep.tolist() == [True, False, True, True, False, False]
    assert out.topk_ids.tolist() == [[0, 3], [2, 0], [3, 2]]
    torch.testing.assert_close(out.scores, (p * torch.zeros_like(p).scatter(-1, ids, 1.0)).sum(0))
    # token 1 is untouched (bit for bit); the others are renormalised to their old sums
    assert torch.equal(out.topk_weights[1], weights[1])
    for t in (0, 2):
        new_p = p[t, out.topk_ids[t]]
        torch.testing.assert_close(out.topk_weights[t], new_p * weights[t].sum() / new_p.sum())


def test_example_low_confidence_choices_weigh_more():
    """Token A is confident (top-1 0.8 -> top bin, weight 1), its 2nd choice has p 0.18; token B
    is not (top-1 0.2 -> bottom bin, weight 2), its 2nd choice has p 0.12. With 4 bins B's
    expert 3 scores 0.24 > 0.18 and is kept; with one bin A's expert 1 wins. Budget 0.75 of
    D = 4 -> n = 3 = both top-1s + one."""
    rest = 0.68 / 6
    probs = torch.tensor(
        [
            [0.8, 0.18, 0.005, 0.004, 0.004, 0.004, 0.0015, 0.0015],
            [rest, rest, 0.2, 0.12, rest, rest, rest, rest],
        ]
    )
    logits = probs.log()
    ids = torch.tensor([[0, 1], [2, 3]])
    weights = probs.gather(-1, ids)
    binned = select_experts_ref(logits, ids, weights, SelectionParams(budget=0.75, conf_bins=4))
    assert binned.keep.nonzero().flatten().tolist() == [0, 2, 3]
    assert binned.topk_ids.tolist() == [[0, 2], [2, 3]]  # A: 1 -> its best kept expert, 2
    flat = select_experts_ref(logits, ids, weights, SelectionParams(budget=0.75, conf_bins=1))
    assert flat.keep.nonzero().flatten().tolist() == [0, 1, 2]
    # B's 3 moves to the best kept expert it lacks: experts 0 and 1 tie, the lower index wins
    assert flat.topk_ids.tolist() == [[0, 1], [2, 0]]


def test_example_protect_p_protects_until_mass_reached():
    """protect_top=0, T=2, k=3, D=6, budget 0.1 -> n = 3. Token A (slots unsorted: experts
    2, 0, 1 with p .2, .3, .25) ranks 0 > 1 > 2; token B ranks 5 (.55) > 6 (.4) > 7 (.02).
    protect_p=0.5 protects A's 0 (mass before 0) and 1 (.3) and B's 5 only (6 has .55 before
    it): P = {0, 1, 5} fills n. protect_p=0.2 protects only the top-1s: P = {0, 5} plus the
    best score, B's 6 (.4 x weight 4/3) over A's 1 (.25 x 5/3)."""
    probs = torch.tensor(
        [
            [0.3, 0.25, 0.2, 0.15, 0.06, 0.02, 0.015, 0.005],
            [0.01, 0.008, 0.004, 0.004, 0.004, 0.55, 0.4, 0.02],
        ]
    )
    ids = torch.tensor([[2, 0, 1], [5, 6, 7]])
    weights = probs.gather(-1, ids)

    def run(protect_p):
        params = SelectionParams(budget=0.1, protect_top=0, protect_p=protect_p)
        return select_experts_ref(probs.log(), ids, weights, params)

    out = run(0.5)
    assert out.keep.nonzero().flatten().tolist() == [0, 1, 5]
    assert out.topk_ids.tolist() == [[5, 0, 1], [5, 0, 1]]
    out = run(0.2)
    assert out.keep.nonzero().flatten().tolist() == [0, 5, 6]
    assert out.topk_ids.tolist() == [[5, 0, 6], [5, 6, 0]]


def test_example_exact_score_ties_keep_the_lower_index():
    """Logits 0 or -1e4 make p exactly 1/2 on the live experts: A lives on {0, 2}, B on {1, 3};
    their top-1s (ties: first position) 0 and 1 are protected, and 2 and 3 tie for the one
    free slot (D = 4, budget 0.75 -> n = 3): the lower index, 2, wins. B's 3 then moves to its
    best kept expert, again a tie (0 and 2 both at -1e4): 0."""
    dead = -1e4
    logits = torch.tensor([[0.0, dead, 0.0, dead], [dead, 0.0, dead, 0.0]])
    ids = torch.tensor([[0, 2], [1, 3]])
    weights = torch.full((2, 2), 0.5)
    out = select_experts_ref(logits, ids, weights, SelectionParams(budget=0.75))
    assert out.scores[2] == out.scores[3]
    assert out.keep.tolist() == [True, True, True, False]
    assert out.topk_ids.tolist() == [[0, 2], [1, 0]]
    assert out.topk_weights.tolist() == [[0.5, 0.5], [1.0, 0.0]]  # p of expert 0 for B is 0


def test_example_oea_keeps_union_of_top_k0():
    """OEA with k0 = 1: n = k = 2. Top-1s {0, 1} already fill it; token 1's 2nd choice moves."""
    logits = torch.tensor([[4.0, 1.0, 2.0, 0.0], [1.0, 4.0, 0.0, 3.0]])
    ids = torch.tensor([[0, 2], [1, 3]])
    weights = torch.softmax(logits, -1).gather(-1, ids)
    out = select_experts_ref(logits, ids, weights, SelectionParams(policy="oea", protect_top=1))
    assert out.keep.tolist() == [True, True, False, False]
    assert out.topk_ids.tolist() == [[0, 1], [1, 0]]


def test_example_max_experts_caps_the_kept_set():
    logits = torch.tensor([[5.0, 4.0, 0, 0, 0, 0], [0, 0, 5.0, 3.5, 0, 0], [0, 0, 0, 0, 5.0, 3.0]])
    ids = torch.tensor([[0, 1], [2, 3], [4, 5]])
    weights = torch.softmax(logits, -1).gather(-1, ids)
    params = SelectionParams(budget=1.0, max_experts=4)
    out = select_experts_ref(logits, ids, weights, params)
    assert out.keep.sum() == 4  # n = min(D = 6, 4): P = {0, 2, 4} plus the best of {1, 3, 5}
    assert out.keep.tolist() == [True, True, True, False, True, False]


def test_example_no_valid_rows_is_identity():
    logits, ids, weights = routing(0, 4, 8, 2)
    out = select_experts_ref(logits, ids, weights, SelectionParams(budget=0.1), num_valid=0)
    assert not out.keep.any() and not out.scores.any()
    assert torch.equal(out.topk_ids, ids) and torch.equal(out.topk_weights, weights)


def test_budget_is_applied_in_exact_decimals():
    """ceil(0.6 * 10) is 6 (float32 arithmetic would say 7); the target is at least k."""
    d = torch.tensor([10, 10, 3, 0])
    assert target_size(d, 2, SelectionParams(budget=0.6)).tolist() == [6, 6, 2, 2]
    assert target_size(d, 1, SelectionParams(budget=0.3)).tolist() == [3, 3, 1, 1]
    assert target_size(d, 2, SelectionParams(budget=1.0, max_experts=4)).tolist() == [4, 4, 3, 2]
    assert target_size(d, 2, SelectionParams(policy="oea")).tolist() == [2, 2, 2, 2]


def test_params_from_config_and_validation():
    cfg = LynxConfig(budget=0.4, max_experts=12, protect_top=2, protect_p=0.5, cache_bonus=0.1)
    params = cfg.selection
    assert (params.budget, params.max_experts, params.protect_top) == (0.4, 12, 2)
    assert (params.protect_p, params.cache_bonus, params.policy) == (0.5, 0.1, "lynx")
    with pytest.raises(ValueError):
        SelectionParams(budget=0.0)
    with pytest.raises(ValueError):
        SelectionParams(policy="topk")


def test_cache_bonus_prefers_resident_among_near_ties():
    """Experts 2 (p ~ .1085) and 3 (p ~ .1064) compete for the one free slot (n = 3, P = {0, 1});
    2 wins on score, but a 20% bonus on the resident 3 tips the kept set towards it."""
    logits = torch.tensor([[3.0, 0.0, 1.05, 0.5, -1, -1], [0.0, 3.0, 0.0, 1.0, -1, -1]])
    ids = torch.tensor([[0, 2], [1, 3]])
    weights = torch.softmax(logits, -1).gather(-1, ids)
    resident = torch.tensor([True, True, False, True, False, False])
    plain = select_experts_ref(logits, ids, weights, SelectionParams(budget=0.75, conf_bins=1))
    assert plain.keep.tolist() == [True, True, True, False, False, False]
    params = SelectionParams(budget=0.75, conf_bins=1, cache_bonus=0.2, miss_budget=0.0)
    biased = select_experts_ref(logits, ids, weights, params, resident=resident)
    assert biased.keep.tolist() == [True, True, False, True, False, False]
    torch.testing.assert_close(biased.scores[3], plain.scores[3] * 1.2)
    assert biased.topk_ids.tolist() == [[0, 3], [1, 3]]
    assert torch.equal(select_experts_ref(logits, ids, weights, params).keep, plain.keep)


# ---------------------------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------------------------


@PROPS
@given(cases())
def test_rows_keep_k_distinct_ids_within_the_kept_set(case):
    logits, ids, weights, params, num_valid = case
    out = select_experts_ref(logits, ids, weights, params, num_valid)
    T, k = ids.shape
    assert out.topk_ids.shape == ids.shape and out.topk_ids.dtype == ids.dtype
    assert all(len(set(row)) == k for row in out.topk_ids.tolist())
    if n_valid(num_valid, T) > 0:
        # every row, padding included, now routes only to kept experts
        assert out.keep[out.topk_ids].all()
        # the kept set is exactly what the valid rows use
        assert distinct_experts(out.topk_ids, logits.shape[-1], num_valid) == out.keep.sum()


@PROPS
@given(cases())
def test_kept_set_size(case):
    """Keep is within the chosen set and has max(|P|, min(n, D)) experts."""
    logits, ids, weights, params, num_valid = case
    out = select_experts_ref(logits, ids, weights, params, num_valid)
    T, k = ids.shape
    nv = n_valid(num_valid, T)
    chosen = torch.zeros_like(out.keep).scatter(0, ids[:nv].flatten(), True)
    assert not (out.keep & ~chosen).any()
    if nv == 0 or params.protect_p > 0:  # (the test's protect_p mask has a rounding margin)
        return
    n = int(target_size(chosen.sum(), k, params))
    n_prot = len(set(ids[:nv][protected_mask(logits, ids, params)[:nv]].tolist()))
    assert out.keep.sum() == max(n_prot, min(n, int(chosen.sum())))


@PROPS
@given(cases(kinds=("normal",)))
def test_protected_choices_never_move(case):
    logits, ids, weights, params, num_valid = case
    out = select_experts_ref(logits, ids, weights, params, num_valid)
    prot = protected_mask(logits, ids, params)
    prot[n_valid(num_valid, ids.shape[0]) :] = False
    assert torch.equal(out.topk_ids[prot], ids[prot])


@PROPS
@given(cases())
def test_weights_keep_their_row_sums(case):
    logits, ids, weights, params, num_valid = case
    out = select_experts_ref(logits, ids, weights, params, num_valid)
    assert out.topk_weights.dtype == weights.dtype
    torch.testing.assert_close(out.topk_weights.sum(-1), weights.sum(-1))
    same = (out.topk_ids == ids).all(-1)
    assert torch.equal(out.topk_weights[same], weights[same])  # untouched rows: bit for bit


@PROPS
@given(cases())
def test_full_budget_is_identity(case):
    logits, ids, weights, params, _ = case
    params = SelectionParams(budget=1.0, protect_top=params.protect_top, conf_bins=params.conf_bins)
    out = select_experts_ref(logits, ids, weights, params)
    assert torch.equal(out.topk_ids, ids) and torch.equal(out.topk_weights, weights)
    chosen = torch.zeros_like(out.keep).scatter(0, ids.flatten(), True)
    assert torch.equal(out.keep, chosen)


@PROPS
@given(cases(kinds=("normal",)))
def test_oea_keeps_each_tokens_top_k0(case):
    logits, ids, weights, params, num_valid = case
    k0 = min(max(1, params.protect_top), ids.shape[1])
    params = SelectionParams(policy="oea", protect_top=k0)
    out = select_experts_ref(logits, ids, weights, params, num_valid)
    nv = n_valid(num_valid, ids.shape[0])
    top = torch.zeros_like(out.keep).scatter(0, logits[:nv].topk(k0).indices.flatten(), True)
    assert not (top & ~out.keep).any()
    if nv > 0:
        assert out.keep.sum() == max(int(top.sum()), ids.shape[1])


@PROPS
@given(cases(), st.integers(0, 2**31 - 1))
def test_padding_rows_do_not_steer_the_selection(case, seed):
    logits, ids, weights, params, num_valid = case
    T, k = ids.shape
    nv = n_valid(num_valid, T)
    out = select_experts_ref(logits, ids, weights, params, num_valid)
    other_logits, other_ids, other_w = routing(seed, T, logits.shape[-1], k)
    logits2, ids2, w2 = logits.clone(), ids.clone(), weights.clone()
    logits2[nv:], ids2[nv:], w2[nv:] = other_logits[nv:], other_ids[nv:], other_w[nv:]
    out2 = select_experts_ref(logits2, ids2, w2, params, num_valid)
    assert torch.equal(out.keep, out2.keep) and torch.equal(out.scores, out2.scores)
    assert torch.equal(out.topk_ids[:nv], out2.topk_ids[:nv])
    assert torch.equal(out.topk_weights[:nv], out2.topk_weights[:nv])


@PROPS
@given(cases(), st.sampled_from([0.1, 0.5, 2.0]), st.integers(0, 2**31 - 1))
def test_cache_bonus_only_helps_resident_experts(case, bonus, seed):
    logits, ids, weights, params, num_valid = case
    E = logits.shape[-1]
    resident = torch.rand(E, generator=torch.Generator().manual_seed(seed)) < 0.5
    plain = select_experts_ref(logits, ids, weights, params, num_valid, resident)  # bonus 0
    params = dataclasses.replace(params, cache_bonus=bonus)
    out = select_experts_ref(logits, ids, weights, params, num_valid, resident)
    assert out.keep.sum() == plain.keep.sum()  # the bonus reorders, it never grows the set
    boosted = torch.where(resident, plain.scores * (1 + bonus), plain.scores)
    torch.testing.assert_close(out.scores, boosted)
    assert (out.keep | ~(plain.keep & resident)).all()  # kept residents stay kept
    assert (plain.keep | ~(out.keep & ~resident)).all()  # no cold expert gains a place


@PROPS
@given(cases(), st.integers(1, 3), st.integers(0, 2**31 - 1))
def test_groups_are_independent_batches(case, G, seed):
    _, ids, _, params, _ = case
    T, k = ids.shape
    E = case[0].shape[-1]
    logits, ids, weights = routing(seed, T, E, k, lead=(G,))
    nv = torch.randint(0, T + 1, (G,), generator=torch.Generator().manual_seed(seed))
    out = select_experts_ref(logits, ids, weights, params, num_valid=nv)
    for g in range(G):
        one = select_experts_ref(logits[g], ids[g], weights[g], params, num_valid=int(nv[g]))
        for a, b in zip(out, one):
            assert torch.equal(a[g], b)


@PROPS
@given(cases())
def test_id_dtypes_and_num_valid_forms_agree(case):
    logits, ids, weights, params, num_valid = case
    base = select_experts_ref(logits, ids, weights, params, num_valid)
    as32 = select_experts_ref(logits, ids.int(), weights, params, num_valid)
    assert as32.topk_ids.dtype == torch.int32
    assert torch.equal(as32.topk_ids.long(), base.topk_ids) and torch.equal(as32.keep, base.keep)
    if num_valid is not None:
        for nv in (torch.tensor(num_valid), torch.tensor([num_valid], dtype=torch.int32)):
            other = select_experts_ref(logits, ids, weights, params, nv)
            assert all(torch.equal(a, b) for a, b in zip(other, base))


@PROPS
@given(cases(kinds=("normal",)))
def test_slot_order_does_not_change_the_routing(case):
    """Sorting each row's slots permutes the output with them: same id -> weight per token."""
    logits, ids, weights, params, num_valid = case
    order = logits.gather(-1, ids).argsort(-1, descending=True)
    out = select_experts_ref(logits, ids, weights, params, num_valid)
    ids2, weights2 = ids.gather(-1, order), weights.gather(-1, order)
    srt = select_experts_ref(logits, ids2, weights2, params, num_valid)
    assert torch.equal(out.keep, srt.keep)
    for t in range(ids.shape[0]):
        a = dict(zip(out.topk_ids[t].tolist(), out.topk_weights[t].tolist()))
        b = dict(zip(srt.topk_ids[t].tolist(), srt.topk_weights[t].tolist()))
        assert a.keys() == b.keys()
        assert all(math.isclose(a[e], b[e], rel_tol=1e-5, abs_tol=1e-7) for e in a)


def test_low_precision_inputs_keep_their_dtypes():
    logits, ids, weights = routing(3, 9, 16, 4)
    out = select_experts_ref(
        logits.bfloat16(), ids.int(), weights.half(), SelectionParams(budget=0.3), num_valid=7
    )
    assert out.topk_ids.dtype == torch.int32 and out.topk_weights.dtype == torch.float16
    assert out.keep.dtype == torch.bool and out.scores.dtype == torch.float32


def test_distinct_experts_counts_valid_rows_per_group():
    ids = torch.tensor([[[0, 1], [1, 2], [5, 6]], [[3, 3], [3, 4], [0, 1]]])
    assert distinct_experts(ids, 8).tolist() == [5, 4]
    assert distinct_experts(ids, 8, num_valid=2).tolist() == [3, 2]
    assert distinct_experts(ids, 8, num_valid=torch.tensor([1, 0])).tolist() == [2, 0]


def test_dispatch_on_cpu_without_interpreter_uses_the_reference(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    logits, ids, weights = routing(1, 6, 12, 2)
    a = select_experts(logits, ids, weights, SelectionParams(budget=0.3))
    b = select_experts_ref(logits, ids, weights, SelectionParams(budget=0.3))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    with pytest.raises(ValueError):
        select_experts(logits, ids, weights, SelectionParams(), backend="cuda")
