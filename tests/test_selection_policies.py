"""The policies beside Lynx's remap (drop, similar), miss-aware selection, per-layer budgets and
the expert similarity, in the torch reference (the spec), and through the layer step."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lynx_sglang.config import ConfigError, LynxConfig, SelectionParams
from lynx_sglang.moe import reference_kernel
from lynx_sglang.selection import distinct_experts, select_experts_ref
from lynx_sglang.selection.similarity import expert_outputs, expert_similarity
from lynx_sglang.selection.types import ExpertSimilarity
from lynx_sglang.step import Step, moe_layer_step
from tests.test_selection_policy import n_valid, routing

PROPS = settings(max_examples=40, deadline=None)


def random_similarity(E: int, seed: int, critical: float = 0.0) -> ExpertSimilarity:
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(E, E, generator=g) * 2 - 1
    sim = ((a + a.t()) / 2).fill_diagonal_(1.0)
    return ExpertSimilarity(sim, torch.rand(E, generator=g) < critical)


@st.composite
def cases(draw):
    """(logits, ids, weights, params, num_valid, resident, similarity)."""
    E = draw(st.integers(2, 20))
    k = draw(st.integers(1, min(E, 6)))
    T = draw(st.integers(1, 10))
    seed = draw(st.integers(0, 2**31 - 1))
    logits, ids, weights = routing(seed, T, E, k, draw(st.sampled_from(["normal", "ties"])))
    params = SelectionParams(
        policy=draw(st.sampled_from(["lynx", "drop", "similar"])),
        budget=draw(st.sampled_from([0.1, 0.25, 0.5, 0.75, 1.0])),
        max_experts=draw(st.sampled_from([0, 0, 1, 3, 8])),
        protect_top=draw(st.integers(0, 2)),
        miss_budget=draw(st.sampled_from([0.0, 0.0, 0.3, 0.6])),
    )
    g = torch.Generator().manual_seed(seed + 1)
    resident = torch.rand(E, generator=g) < draw(st.sampled_from([0.0, 0.3, 0.7, 1.0]))
    sim = random_similarity(E, seed, draw(st.sampled_from([0.0, 0.3])))
    num_valid = draw(st.one_of(st.none(), st.integers(0, T)))
    return logits, ids, weights, params, num_valid, resident, sim


def chosen_mask(ids, E, nv):
    return torch.zeros(E, dtype=torch.bool).scatter(0, ids[:nv].flatten(), True)


# ---------------------------------------------------------------------------------------------
# Properties every policy keeps
# ---------------------------------------------------------------------------------------------


@PROPS
@given(cases())
def test_rows_stay_distinct_in_the_kept_set_and_keep_their_sums(case):
    logits, ids, weights, params, num_valid, resident, sim = case
    out = select_experts_ref(logits, ids, weights, params, num_valid, resident, sim)
    T, k = ids.shape
    assert all(len(set(row)) == k for row in out.topk_ids.tolist())
    torch.testing.assert_close(out.topk_weights.sum(-1), weights.sum(-1))
    if n_valid(num_valid, T) > 0:
        used = out.topk_weights > 0
        assert out.keep[out.topk_ids[used]].all()  # every weighted choice is a kept expert
        assert not (out.keep & ~chosen_mask(ids, logits.shape[-1], n_valid(num_valid, T))).any()
    same = (out.topk_ids == ids).all(-1) & (out.topk_weights == weights).all(-1)
    unchanged = (out.topk_ids == ids).all(-1)
    if params.policy != "drop":
        assert torch.equal(same, unchanged)  # a row whose ids stay keeps its weights


@PROPS
@given(cases())
def test_full_budget_with_nothing_critical_is_identity(case):
    logits, ids, weights, params, _, resident, sim = case
    params = dataclasses.replace(
        params, budget=1.0, miss_budget=1.0 if params.miss_aware else 0.0, max_experts=0
    )
    out = select_experts_ref(logits, ids, weights, params, None, resident, sim)
    assert torch.equal(out.topk_ids, ids) and torch.equal(out.topk_weights, weights)


# ---------------------------------------------------------------------------------------------
# drop
# ---------------------------------------------------------------------------------------------


@PROPS
@given(cases())
def test_drop_zeroes_the_moved_choices_and_renormalises_the_kept(case):
    logits, ids, weights, params, num_valid, resident, sim = case
    params = dataclasses.replace(params, policy="drop")
    lynx = select_experts_ref(
        logits, ids, weights, dataclasses.replace(params, policy="lynx"), num_valid, resident
    )
    out = select_experts_ref(logits, ids, weights, params, num_valid, resident)
    assert torch.equal(out.keep, lynx.keep) and torch.equal(out.topk_ids, lynx.topk_ids)
    moved = out.topk_ids != ids
    keeps_some = (~moved).any(-1, keepdim=True)  # a row keeping none is remapped as Lynx
    assert torch.equal(out.topk_weights[~keeps_some[:, 0]], lynx.topk_weights[~keeps_some[:, 0]])
    assert (out.topk_weights[moved & keeps_some] == 0).all()
    kept = ~moved & moved.any(-1, keepdim=True)  # kept choices of changed rows
    scale = weights.sum(-1, keepdim=True) / torch.where(~moved, weights, 0).sum(-1, keepdim=True)
    torch.testing.assert_close(out.topk_weights[kept], (weights * scale)[kept])


# ---------------------------------------------------------------------------------------------
# similar
# ---------------------------------------------------------------------------------------------


def test_similar_moves_a_choice_to_the_most_similar_kept_expert():
    """4 experts, top-2, two tokens: token 0 picks (0, 1), token 1 picks (0, 2); budget keeps
    2 of 3 chosen: 0 (protected, both tokens) and the better-scored of 1 and 2. Lynx moves the
    lost choice to the token's best-logit kept expert; similar moves it to the kept expert most
    similar to the lost one, at the lost choice's weight."""
    logits = torch.tensor([[3.0, 1.0, -5.0, 0.9], [3.0, -5.0, 2.0, 1.5]])
    ids = torch.tensor([[0, 1], [0, 2]])
    weights = torch.softmax(logits, -1).gather(-1, ids)
    weights = weights / weights.sum(-1, keepdim=True)
    sim = torch.eye(4)
    sim[1, 3] = sim[3, 1] = 0.9  # 3 is 1's stand-in
    sim[1, 2] = sim[2, 1] = 0.1
    params = SelectionParams(policy="similar", budget=0.75, conf_bins=1)  # n = ceil(2.25) = 3
    out = select_experts_ref(logits, ids, weights, params, similarity=ExpertSimilarity(
        sim, torch.zeros(4, dtype=torch.bool)))  # fmt: skip
    # chosen {0, 1, 2}: all kept at n = 3; now budget 0.5: n = max(ceil(1.5), k=2) = 2
    assert out.keep.tolist() == [True, True, True, False]
    params = dataclasses.replace(params, budget=0.5)
    out = select_experts_ref(logits, ids, weights, params, similarity=ExpertSimilarity(
        sim, torch.zeros(4, dtype=torch.bool)))  # fmt: skip
    assert out.keep.tolist() == [True, False, True, False]  # 2 scores 0.27 > 1's 0.10
    # token 0 lost expert 1: its only available kept expert is 2 (3 is not kept)
    assert out.topk_ids.tolist() == [[0, 2], [0, 2]]
    assert torch.equal(out.topk_weights, weights)  # the stand-in carries the lost weight


@PROPS
@given(cases())
def test_similar_takes_the_most_similar_available_expert(case):
    logits, ids, weights, params, num_valid, resident, sim = case
    params = dataclasses.replace(params, policy="similar")
    out = select_experts_ref(logits, ids, weights, params, num_valid, resident, sim)
    nv = n_valid(num_valid, ids.shape[0])
    if nv == 0:
        return
    E = logits.shape[-1]
    # chosen critical experts are never moved
    crit = sim.critical & chosen_mask(ids, E, nv)
    assert out.keep[crit].all()
    for t in range(ids.shape[0]):
        row, new = ids[t].tolist(), out.topk_ids[t].tolist()
        avail = [e for e in range(E) if out.keep[e] and e not in row]
        for j in range(len(row)):
            if new[j] != row[j]:
                best = max(avail, key=lambda e: (sim.matrix[row[j], e].item(), -e))
                assert new[j] == best
                avail.remove(best)
    assert torch.equal(out.topk_weights, weights)


def test_similar_needs_the_similarity():
    logits, ids, weights = routing(0, 4, 8, 2)
    with pytest.raises(ValueError, match="ExpertSimilarity"):
        select_experts_ref(logits, ids, weights, SelectionParams(policy="similar"))


def test_expert_similarity_sees_functions_not_neuron_order():
    """An expert with its intermediate neurons permuted is the same function: similarity 1;
    an independent expert is far less similar; experts without a close peer are critical."""
    g = torch.Generator().manual_seed(0)
    E, inter, H = 4, 16, 24
    w13 = torch.randn(E, 2 * inter, H, generator=g)
    w2 = torch.randn(E, H, inter, generator=g)
    perm = torch.randperm(inter, generator=g)
    w13[1] = torch.cat([w13[0, :inter][perm], w13[0, inter:][perm]])
    w2[1] = w2[0][:, perm]
    s = expert_similarity(w13, w2, threshold=0.9)
    assert s.matrix.shape == (E, E) and torch.allclose(s.matrix, s.matrix.t())
    assert s.matrix[0, 1] > 0.999 and s.matrix[0, 2] < 0.5
    assert s.critical.tolist() == [False, False, True, True]
    out = expert_outputs(w13, w2, torch.randn(3, H, generator=g))
    assert out.shape == (E, 3 * H)


# ---------------------------------------------------------------------------------------------
# miss-aware
# ---------------------------------------------------------------------------------------------


@PROPS
@given(cases())
def test_miss_aware_keeps_the_resident_and_budgets_the_missing(case):
    logits, ids, weights, params, num_valid, resident, sim = case
    params = dataclasses.replace(params, policy="lynx", miss_budget=params.budget, max_experts=0)
    out = select_experts_ref(logits, ids, weights, params, num_valid, resident)
    nv = n_valid(num_valid, ids.shape[0])
    if nv == 0:
        return
    chosen = chosen_mask(ids, logits.shape[-1], nv)
    assert out.keep[chosen & resident].all()  # a resident expert the batch needs costs nothing
    plain = select_experts_ref(
        logits, ids, weights, dataclasses.replace(params, miss_budget=0.0), num_valid, resident
    )
    # the copies it asks for: no more than Lynx's at the same budget
    missing = chosen & ~resident
    budget_missing = -(-int(missing.sum()) * params.budget_ppm // 1_000_000)
    assert int((out.keep & ~resident).sum()) <= max(
        budget_missing, int((plain.keep & ~resident).sum()), ids.shape[1]
    )


def test_miss_aware_without_a_resident_mask_is_lynx():
    logits, ids, weights = routing(3, 12, 32, 4)
    p = SelectionParams(budget=0.5)
    a = select_experts_ref(logits, ids, weights, p)
    b = select_experts_ref(logits, ids, weights, dataclasses.replace(p, miss_budget=0.3))
    assert torch.equal(a.topk_ids, b.topk_ids) and torch.equal(a.keep, b.keep)


# ---------------------------------------------------------------------------------------------
# per-layer budgets, config, and the layer step
# ---------------------------------------------------------------------------------------------


def test_layer_budgets_parse_check_and_apply():
    p = SelectionParams(budget=0.5, layer_budgets="0:1.0, 3:0.8")
    assert p.layer_budget_map == {0: 1.0, 3: 0.8}
    assert p.at_layer(0).budget == 1.0 and p.at_layer(3).budget == 0.8
    assert p.at_layer(1).budget == 0.5 and p.at_layer(1).layer_budgets == ""
    p0 = SelectionParams(layer_budgets="")
    assert p0.at_layer(2) is p0
    for bad in ("0=1.0", "x:0.5", "0:1.5", "-1:0.5"):
        with pytest.raises(ConfigError, match="--lynx-layer-budgets"):
            SelectionParams(layer_budgets=bad)
    cfg = LynxConfig.from_env({"LYNX_SGLANG_MODE": "lynx", "LYNX_SGLANG_LAYER_BUDGETS": "0:1"})
    assert cfg.selection.at_layer(0).budget == 1.0
    with pytest.raises(ConfigError, match="--lynx-similar-threshold"):
        SelectionParams(similar_threshold=2.0)


def test_the_similar_policy_does_not_bound_the_kept_set():
    """Chosen experts without a peer are kept past any cap, so no capture bound holds."""
    assert SelectionParams(policy="similar", max_experts=8).max_kept(8, 16) is None
    assert SelectionParams(policy="similar", max_experts=8, similar_threshold=-1.0).max_kept(
        8, 16
    ) == max(8, 16)
    assert SelectionParams(policy="drop", max_experts=32).max_kept(8, 16) == 32


def test_layer_step_applies_the_layers_budget_and_similarity():
    g = torch.Generator().manual_seed(1)
    T, E, k, H, inter = 16, 32, 4, 8, 6
    w13, w2 = torch.randn(E, 2 * inter, H, generator=g), torch.randn(E, H, inter, generator=g)
    x = torch.randn(T, H, generator=g)
    logits, ids, weights = routing(5, T, E, k)
    step = Step(decode=True, num_valid=T)
    sims = [expert_similarity(w13, w2, 0.0), random_similarity(E, 2)]
    params = SelectionParams(policy="similar", budget=0.4, layer_budgets="0:1.0")
    kern = reference_kernel(w13, w2)
    for layer in (0, 1):
        out = moe_layer_step(layer, x, ids, weights, logits, kern, step, params, similarity=sims)
        ref = select_experts_ref(logits, ids, weights, params.at_layer(layer), T, None, sims[layer])
        torch.testing.assert_close(out, kern(x, ref.topk_ids, ref.topk_weights, None))
        if layer == 0:
            assert torch.equal(ref.topk_ids, ids)  # budget 1.0 on layer 0
        else:
            assert distinct_experts(ref.topk_ids, E) < distinct_experts(ids, E)
