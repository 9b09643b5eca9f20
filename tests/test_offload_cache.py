"""Expert cache behaviour on CPU: exactness, eviction, prefetch, counters (the GPU only adds streams)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from offload_helpers import H, forward, make_store, one_thread  # noqa: F401 (autouse fixture)

from lynx_sglang.config import ConfigError, LynxConfig, SelectionParams
from lynx_sglang.moe import fused_moe_ref, reference_kernel
from lynx_sglang.offload import ExpertCache
from lynx_sglang.step import Step, moe_layer_step


def assert_close(out: torch.Tensor, ref: torch.Tensor) -> None:
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-5), float((out - ref).abs().max())


def route(g: torch.Generator, tokens: int, num_experts: int, k: int):
    """Random routing: topk_ids [T, k] int32 (distinct per token), topk_weights [T, k] float32."""
    logits = torch.randn(tokens, num_experts, generator=g)
    w, ids = logits.softmax(-1).topk(k)
    return ids.to(torch.int32), w / w.sum(-1, keepdim=True)


def ids(*rows: list[int]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.int32)


def resident(cache: ExpertCache, layer: int = 0) -> set[int]:
    return set(torch.nonzero(cache.resident_mask(layer)).flatten().tolist())


# ---------------------------------------------------------------- exactness
@pytest.mark.parametrize("extra_waves", [0, 1, 3])
@pytest.mark.parametrize("slot_pool", ["layer", "shared"])
@pytest.mark.parametrize("eviction", ["lru", "lfu", "score"])
def test_eager_cache_equals_fully_resident_layer(eviction, slot_pool, extra_waves):
    store, weights = make_store()
    k = 2
    # 4 slots per layer (shared: 2 per layer -> a pool of 6): many steps need waves.
    cache = ExpertCache(
        store,
        4 if slot_pool == "layer" else 2,
        "cpu",
        k,
        eviction=eviction,
        slot_pool=slot_pool,
        prefetch="both",
        extra_waves=extra_waves,
    )
    for layer in range(3):
        cache.set_router(layer, torch.randn(12, H))
    g = torch.Generator().manual_seed(1)
    steps = waves = 0
    for step in range(8):
        for layer in range(3):
            topk_ids, topk_w = route(g, 1 + (step * 3 + layer) % 6, 12, k)
            x = torch.randn(topk_ids.shape[0], H, generator=g)
            scores = torch.rand(12, generator=g)
            out = forward(cache, layer, x, topk_ids, topk_w, scores=scores)
            ref = fused_moe_ref(x, *weights[layer], topk_ids, topk_w)
            assert_close(out, ref)
            c = cache.counters()["total"]
            fewest = -(-c["distinct"] // cache.num_slots)
            # a planned step: at most extra_waves more (LRU plans no end of step)
            assert c["waves"] <= fewest + extra_waves * (eviction != "lru")
            assert c["misses"] == c["distinct"] - c["hits"]  # each miss loaded once
            steps, waves = steps + 1, waves + c["waves"]
    assert waves > steps  # the waves path was exercised


@pytest.mark.parametrize("slot_pool", ["layer", "shared"])
def test_graph_executor_equals_fully_resident_layer(slot_pool):
    store, weights = make_store()
    k = 2
    cache = ExpertCache(
        store, 4, "cpu", k, slot_pool=slot_pool, executor="graph", prefetch="both", eviction="lfu"
    )
    for layer in range(3):
        cache.set_router(layer, torch.randn(12, H))
    g = torch.Generator().manual_seed(2)
    for _ in range(6):
        for layer in range(3):
            topk_ids, topk_w = route(g, 2, 12, k)  # batch <= K // k always fits
            x = torch.randn(2, H, generator=g)
            out = forward(cache, layer, x, topk_ids, topk_w)
            assert_close(out, fused_moe_ref(x, *weights[layer], topk_ids, topk_w))
    cache.check_overflow()
    c = cache.counters()["total"]
    assert c["hits"] + c["misses"] == c["distinct"] and c["overflow"] == 0


def test_slot_ids_address_the_same_weights_as_expert_ids_did():
    store, weights = make_store(num_layers=2)
    cache = ExpertCache(store, 6, "cpu", 2)
    g = torch.Generator().manual_seed(3)
    for _ in range(10):
        for layer in range(2):
            topk_ids, _ = route(g, 3, 12, 2)
            plan = cache.prepare(layer, topk_ids)
            slot_ids = plan.slot_ids
            assert slot_ids.shape == topk_ids.shape and slot_ids.dtype == topk_ids.dtype
            assert 0 <= int(slot_ids.min()) and int(slot_ids.max()) < cache.num_slots
            w = cache.slot_weights(layer)
            assert torch.equal(w["w13"][slot_ids.long()], weights[layer][0][topk_ids.long()])
            assert torch.equal(w["w2"][slot_ids.long()], weights[layer][1][topk_ids.long()])


def test_waves_serve_a_step_that_needs_more_experts_than_slots():
    store, weights = make_store(num_layers=1)
    cache = ExpertCache(store, 2, "cpu", 2)
    topk_ids = ids([0, 1], [2, 3], [4, 5])
    topk_w = torch.full((3, 2), 0.5)
    x = torch.randn(3, H)
    plan = cache.prepare(0, topk_ids)
    assert len(plan) == 3
    with pytest.raises(RuntimeError, match="waves"):
        _ = plan.slot_ids
    out = forward(cache, 0, x, topk_ids, topk_w)
    assert_close(out, fused_moe_ref(x, *weights[0], topk_ids, topk_w))


def test_a_mapped_plan_runs_the_same_waves_through_the_wrapper():
    """Plan.map_later (how bench/compare_offload.py times the waves planned on demand): the
    wrapper sees every later wave's maker, once, and the waves are those of the plain plan."""
    store, _ = make_store(num_layers=1)
    topk_ids = ids([0, 1], [2, 3], [4, 5])
    plain = [w.slot_ids.clone() for w in ExpertCache(store, 2, "cpu", 2).prepare(0, topk_ids)]
    seen = []

    def wrap(make):
        def made():
            seen.append(make)
            return make()

        return made

    mapped = ExpertCache(store, 2, "cpu", 2).prepare(0, topk_ids).map_later(wrap)
    assert len(mapped) == 3
    got = [w.slot_ids for w in mapped]
    assert len(seen) == 2 and all(torch.equal(a, b) for a, b in zip(plain, got))


def test_a_multi_wave_step_leaves_the_experts_the_policy_values_most_resident():
    """Waves run hits first, then misses by ascending value: every miss is loaded once (the
    step's minimum), and the step ends with the highest-valued misses resident, whatever their
    ids; the output stays exact."""
    store, weights = make_store(num_layers=1, num_experts=16)
    cache = ExpertCache(store, 4, "cpu", 2, eviction="path", path_decay=0.5, max_requests=1)
    cache.prepare(0, ids([0, 1]))  # resident: 0, 1
    cache.counters(reset=True)
    # request row 1's prompt routes to 9, 2 (twice) and 7, 4 (once): values 9 = 2 > 7 = 4 > rest
    path = cache.executor.eviction_policy
    path.observe_requests(0, torch.tensor([1, 1, 1]), ids([9, 2], [9, 2], [7, 4]), False)
    topk_ids = ids([0, 2], [3, 4], [5, 6], [7, 9], [1, 8])  # 10 experts, 4 slots: 3 waves
    topk_w = torch.full((5, 2), 0.5)
    x = torch.randn(5, H)
    out = forward(cache, 0, x, topk_ids, topk_w)
    assert_close(out, fused_moe_ref(x, *weights[0], topk_ids, topk_w))
    c = cache.counters()["total"]
    assert (c["waves"], c["misses"], c["hits"]) == (3, 8, 2)  # each miss loaded once
    assert resident(cache) == {2, 4, 7, 9}  # the four valued misses stay


@pytest.mark.parametrize(
    "extra_waves, waves, kept", [(0, 2, {5, 6, 7, 9}), (1, 3, {2, 5, 6, 9}), (2, 4, {2, 3, 5, 9})]
)
def test_a_planned_multi_wave_step_keeps_the_best_valued_within_its_extra_waves(
    extra_waves, waves, kept
):
    """With values, the waves keep the best of the resident experts and the misses, as Belady's
    MIN keeps the nearest next uses: the top-valued hit (2) is never overwritten by the step's
    own fills (cutting hits-then-misses into waves would lose it). Each expert that stays
    protects its slot, so the step keeps only as many residents as leave it within
    ``extra_waves`` of the fewest (here 2 for 8 experts in 4 slots): at one extra wave, 3 is
    given up for a miss; at two, the four best-valued (2, 3, 9, 5) stay; at none, the plan runs
    in the fewest waves and keeps only the valued misses of its last. Every miss is still loaded
    once, and the output is exact."""
    store, weights = make_store(num_layers=1, num_experts=16)
    cache = ExpertCache(store, 4, "cpu", 2, eviction="path", path_decay=0.5, max_requests=1,
                        extra_waves=extra_waves)  # fmt: skip
    cache.prepare(0, ids([0, 1], [2, 3]))  # resident: 0, 1, 2, 3
    cache.counters(reset=True)
    # request row 1's prompt: values 2 = 3 > 9 > 5 > every other expert
    path = cache.executor.eviction_policy
    prompt = ids([2, 3], [2, 3], [2, 3], [9, 5], [9, 11])
    path.observe_requests(0, torch.ones(5, dtype=torch.long), prompt, False)
    topk_ids = ids([0, 2], [5, 6], [7, 8], [9, 10])  # 8 experts: hits 0, 2; six misses
    topk_w = torch.full((4, 2), 0.5)
    x = torch.randn(4, H)
    out = forward(cache, 0, x, topk_ids, topk_w)
    assert_close(out, fused_moe_ref(x, *weights[0], topk_ids, topk_w))
    c = cache.counters()["total"]
    assert (c["waves"], c["misses"], c["hits"]) == (waves, 6, 2)
    assert resident(cache) == kept


def test_padding_ids_stay_padding():
    store, _ = make_store(num_layers=1)
    cache = ExpertCache(store, 4, "cpu", 2)
    plan = cache.prepare(0, ids([3, -1], [5, 3]))
    assert plan.slot_ids[0, 1] == -1
    assert cache.counters()["total"]["distinct"] == 2


# ---------------------------------------------------------------- eviction
def test_evicts_the_least_recently_used_expert():
    store, _ = make_store(num_layers=1)
    cache = ExpertCache(store, 3, "cpu", 1)
    for e in (0, 1, 2, 0):
        cache.prepare(0, ids([e]))
    cache.prepare(0, ids([3]))
    assert resident(cache) == {0, 2, 3}


def test_never_evicts_an_expert_the_step_needs():
    store, weights = make_store(num_layers=1)
    cache = ExpertCache(store, 3, "cpu", 1)
    for e in (0, 1, 2):
        cache.prepare(0, ids([e]))
    plan = cache.prepare(0, ids([0], [3]))  # 0 is the least recently used, yet needed
    assert resident(cache) == {0, 2, 3}
    w13 = cache.slot_weights(0)["w13"]
    assert torch.equal(w13[plan.slot_ids.long()], weights[0][0][ids([0], [3]).long()])


def test_never_evicts_an_expert_an_in_flight_copy_targets(monkeypatch):
    store, _ = make_store(num_layers=1)
    cache = ExpertCache(store, 3, "cpu", 1)
    for e in (0, 1, 2):
        cache.prepare(0, ids([e]))
    slot0 = int(cache.slots.table[0, 0])
    ex = cache.executor
    ex.unsettled.add(slot0)  # pretend expert 0's slot still has a copy in flight
    monkeypatch.setattr(ex.transfer, "in_flight", lambda g: g == slot0)
    cache.prepare(0, ids([3]))
    assert resident(cache) == {0, 2, 3}


def test_waves_reuse_slots_whose_in_flight_copies_the_step_waited_on(monkeypatch):
    store, weights = make_store(num_layers=1)
    cache = ExpertCache(store, 4, "cpu", 2)
    cache.prefetch(0, [0, 1])
    ex = cache.executor
    inflight = {int(cache.slots.table[0, 0]), int(cache.slots.table[0, 1])}
    ex.unsettled.update(inflight)
    monkeypatch.setattr(ex.transfer, "in_flight", lambda g: g in inflight)
    topk_ids = ids([0, 1], [2, 3], [4, 5], [6, 7])  # 8 experts, 4 slots: two waves
    topk_w = torch.full((4, 2), 0.5)
    x = torch.randn(4, H)
    out = forward(cache, 0, x, topk_ids, topk_w)
    assert_close(out, fused_moe_ref(x, *weights[0], topk_ids, topk_w))
    assert cache.counters()["total"]["waves"] == 2


def test_lfu_prefers_evicting_the_rarely_used():
    store, _ = make_store(num_layers=1)
    lru = ExpertCache(store, 2, "cpu", 1, eviction="lru")
    lfu = ExpertCache(store, 2, "cpu", 1, eviction="lfu", lfu_decay=0.9)
    for cache in (lru, lfu):
        for e in (0, 0, 0, 0, 1, 2):
            cache.prepare(0, ids([e]))
    assert resident(lru) == {1, 2}
    assert resident(lfu) == {0, 2}


def test_score_aware_evicts_the_lowest_score():
    store, _ = make_store(num_layers=1)
    cache = ExpertCache(store, 2, "cpu", 1, eviction="score")
    cache.prepare(0, ids([0]))
    cache.prepare(0, ids([1]))
    scores = torch.zeros(12)
    scores[0], scores[1], scores[2] = 5.0, 0.1, 3.0
    cache.prepare(0, ids([2]), scores=scores)  # LRU would evict 0; its score is the highest
    assert resident(cache) == {0, 2}
    cache.prepare(0, ids([3]), scores=-torch.arange(12.0))  # now 0 scores highest, 2 lowest
    assert resident(cache) == {0, 3}


def test_k_below_top_k_is_an_error():
    store, _ = make_store(num_layers=1)
    with pytest.raises(ValueError, match="--lynx-slots=1 is below top_k=2"):
        ExpertCache(store, 1, "cpu", 2)
    with pytest.raises(ValueError, match="--lynx-slots"):
        ExpertCache(store, 1, "cpu", 2, slot_pool="shared")  # pool of 1 slot


# ---------------------------------------------------------------- counters and prefetch
def test_counters_add_up():
    store, _ = make_store()
    cache = ExpertCache(store, 3, "cpu", 2, slot_pool="shared")
    g = torch.Generator().manual_seed(4)
    distinct = 0
    for _ in range(6):
        for layer in range(3):
            topk_ids, _ = route(g, 4, 12, 2)
            distinct += len(torch.unique(topk_ids))
            for _wave in cache.prepare(layer, topk_ids):
                pass
    c = cache.counters()
    t = c["total"]
    assert t["hits"] + t["misses"] == t["distinct"] == distinct
    assert t["steps"] == 18 and t["bytes_h2d"] == t["misses"] * store.nbytes_per_expert
    assert sum(c["layers"][layer]["misses"] for layer in range(3)) == t["misses"]
    assert cache.counters()["total"]["steps"] == 0  # read resets


def test_prefetch_of_a_correct_prediction_turns_misses_into_hits():
    store, _ = make_store(num_layers=1)
    cache = ExpertCache(store, 4, "cpu", 2)
    cache.prefetch(0, torch.tensor([5, 6]))
    cache.prepare(0, ids([5, 6]))
    c = cache.counters()["total"]
    assert (c["hits"], c["misses"], c["prefetch_hits"], c["prefetch_wasted"]) == (2, 0, 2, 0)
    assert c["bytes_h2d"] == 2 * store.nbytes_per_expert


def test_wasted_prefetches_are_counted():
    store, _ = make_store(num_layers=1)
    cache = ExpertCache(store, 2, "cpu", 1)
    cache.prefetch(0, [7])
    cache.prefetch(0, [8])
    cache.prefetch(0, [9])  # evicts 7 before any step used it: wasted
    assert cache.counters(reset=False)["total"]["prefetch_wasted"] == 1
    assert resident(cache) == {8, 9}
    cache.prepare(0, ids([9]))  # 8 is unused by the next step: wasted
    c = cache.counters()["total"]
    assert (c["prefetch_hits"], c["prefetch_wasted"], c["prefetch_fills"]) == (1, 2, 3)


def test_cross_layer_prefetch_predicts_from_the_next_router():
    store, weights = make_store(num_layers=2)
    cache = ExpertCache(store, 8, "cpu", 2, prefetch="cross-layer")
    router1 = torch.randn(12, H)
    cache.set_router(1, router1)
    x = torch.randn(2, H)
    topk0, w0 = route(torch.Generator().manual_seed(5), 2, 12, 2)
    forward(cache, 0, x, topk0, w0)
    topk1 = (x @ router1.t()).topk(2).indices.to(torch.int32)  # layer 1 routes as predicted
    cache.prepare(1, topk1)
    c = cache.counters()["layers"][1]
    assert c["misses"] == 0 and c["prefetch_hits"] == len(torch.unique(topk1))


def test_prefetch_copies_the_set_the_selection_keeps():
    """A decode step's cross-layer prediction goes through the same selection: prefetch copies
    the kept set of layer 1's predicted routing, not its raw top-k."""
    from lynx_sglang.selection import select_experts_ref

    store, weights = make_store(num_layers=2)
    router1 = torch.randn(12, H, generator=torch.Generator().manual_seed(7))
    params = SelectionParams(budget=0.3, protect_top=0)
    x = torch.randn(6, H, generator=torch.Generator().manual_seed(8))
    predicted = x @ router1.t()  # [T, E] layer 1's router on layer 0's input
    raw = predicted.topk(2).indices
    kept = select_experts_ref(predicted, raw, torch.ones(6, 2), params).topk_ids
    assert set(kept.unique().tolist()) < set(raw.unique().tolist())
    for select, expected in ((True, kept), (False, raw)):
        cache = ExpertCache(store, 12, "cpu", 2, prefetch="cross-layer", prefetch_select=select)
        cache.set_router(1, router1)
        topk0, w0 = ids(*([0, 1] for _ in range(6))), torch.full((6, 2), 0.5)
        logits0 = torch.zeros(6, 12)
        step = Step(decode=True, num_valid=6)
        kernel = reference_kernel(*weights[0])
        moe_layer_step(0, x, topk0, w0, logits0, kernel, step, params, cache)
        assert resident(cache, 1) == set(expected.unique().tolist())


def test_temporal_prefetch_brings_back_the_previous_steps_set():
    store, _ = make_store(num_layers=2)
    # shared pool of 4: layer 0's step evicts layer 1's experts, temporal prefetch restores them
    cache = ExpertCache(store, 2, "cpu", 2, slot_pool="shared", pool_slots=4, prefetch="temporal")
    cache.prepare(1, ids([2, 3]))
    cache.prepare(0, ids([0, 1]))
    x, w = torch.randn(1, H), torch.full((1, 2), 0.5)
    forward(cache, 0, x, ids([4, 5]), w)  # evicts layer 1's {2, 3} (LRU), prefetches them back
    assert resident(cache, 1) == {2, 3}
    cache.prepare(1, ids([2, 3]))
    c = cache.counters()["layers"][1]
    assert (c["misses"], c["hits"], c["prefetch_hits"]) == (2, 2, 2)


def test_from_config_reads_the_cache_knobs():
    store, _ = make_store(num_layers=2)
    cfg = LynxConfig(mode="offload", slots=3, eviction="lfu", slot_pool="shared", prefetch="off",
                     extra_waves=3)  # fmt: skip
    cache = ExpertCache.from_config(store, cfg, "cpu", top_k=2)
    assert cache.num_slots == 6 and cache.eviction == "lfu"
    assert cache.executor.eager.extra_waves == 3
    assert ExpertCache.from_config(store, LynxConfig(), "cpu", 2).executor.eager.extra_waves == 1
    with pytest.raises(ConfigError, match="--lynx-extra-waves must be >= 0"):
        LynxConfig(extra_waves=-1)
    assert ExpertCache.from_config(store, cfg.cache, "cpu", top_k=2).num_slots == 6
    assert ExpertCache.from_config(store, LynxConfig(), "cpu", 2).num_slots == 12  # slots=0: all


def test_resident_mask_is_a_device_bool_vector():
    store, _ = make_store(num_layers=1)
    cache = ExpertCache(store, 4, "cpu", 2)
    cache.prepare(0, ids([1, 2]))
    mask = cache.resident_mask(0)
    assert mask.dtype == torch.bool and mask.shape == (12,)
    assert np.flatnonzero(mask.numpy()).tolist() == [1, 2]


# ---------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("executor", ["eager", "graph"])
def test_cuda_cache_is_bit_identical_to_the_resident_layer(executor):
    store, weights = make_store()
    cache = ExpertCache(store, 6, "cuda", 2, executor=executor, prefetch="both")
    for layer in range(3):
        cache.set_router(layer, torch.randn(12, H, device="cuda"))
    g = torch.Generator().manual_seed(6)
    for _ in range(5):
        for layer in range(3):
            topk_ids, topk_w = route(g, 3, 12, 2)
            x = torch.randn(3, H, generator=g)
            d = [t.cuda() for t in (x, topk_ids, topk_w)]
            out = forward(cache, layer, d[0], d[1], d[2])
            ref = fused_moe_ref(
                d[0], weights[layer][0].cuda(), weights[layer][1].cuda(), d[1], d[2]
            )
            assert_close(out, ref)
    cache.check_overflow()
