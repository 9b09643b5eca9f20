"""The hybrid executor: captured decode steps planned on the device, every other step on the
host, over one state. On CPU a captured step is one whose row count is a device tensor (what a
CUDA-graph capture passes); on a GPU the same step is captured in a real graph and replayed."""

from __future__ import annotations

import pytest
import torch
from offload_helpers import H, make_store, one_thread  # noqa: F401 (autouse fixture)

from lynx_sglang.config import SelectionParams
from lynx_sglang.moe import fused_moe_ref, reference_kernel
from lynx_sglang.offload import ExpertCache
from lynx_sglang.selection import select_experts_ref
from lynx_sglang.step import Step, bounded_selection, decode_capture_cap, moe_layer_step

E, K, TOP_K, L = 12, 6, 2, 3


def route(g: torch.Generator, tokens: int):
    logits = torch.randn(tokens, E, generator=g) * 2
    w, ids = logits.softmax(-1).topk(TOP_K)
    return logits, ids.to(torch.int32), w / w.sum(-1, keepdim=True)


def step_of(rows: int, captured: bool, device="cpu") -> Step:
    """A decode step of ``rows`` real tokens, as eager SGLang or a graph capture hands it."""
    if captured:
        return Step(decode=True, num_valid=torch.tensor(rows, device=device))
    return Step(decode=True, num_valid=rows)


def same_state(cache: ExpertCache) -> None:
    """The host's copy and the device state agree (after the host pushed)."""
    ex = cache.executor
    ex._push()
    host = torch.as_tensor(cache.slots.table, dtype=torch.int32)
    assert torch.equal(host, ex.device.table_flat[:-1].view(L, E + 1).cpu())


@pytest.mark.parametrize("eviction", ["lru", "lfu", "score"])
@pytest.mark.parametrize("prefetch", ["off", "both"])
def test_interleaved_captured_and_eager_steps_equal_the_resident_layer(eviction, prefetch):
    store, weights = make_store(num_layers=L, num_experts=E)
    cache = ExpertCache(store, K, "cpu", TOP_K, eviction=eviction, executor="hybrid",
                        prefetch=prefetch)  # fmt: skip
    for layer in range(L):
        cache.set_router(layer, torch.randn(E, H, generator=torch.Generator().manual_seed(layer)))
    cap = decode_capture_cap(None, K, TOP_K, E)  # K // top_k = 3 tokens
    g = torch.Generator().manual_seed(0)
    for n in range(12):
        captured = n % 3 != 2  # two graph steps, then an eager one (e.g. a new request)
        rows = cap if captured else 5 + n % 3  # eager batches need up to 10 > K experts: waves
        for layer in range(L):
            logits, ids, w = route(g, rows)
            x = torch.randn(rows, H, generator=g)
            out = moe_layer_step(layer, x, ids, w, logits, reference_kernel(None, None),
                                 step_of(rows, captured), cache=cache)  # fmt: skip
            assert not torch.isnan(out).any()
            ref = fused_moe_ref(x, *weights[layer], ids, w)
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    cache.check_overflow()
    c = cache.counters()["total"]
    assert c["overflow"] == 0 and c["waves"] > c["steps"] and c["hits"] > 0
    same_state(cache)


def test_hybrid_makes_the_eager_executors_decisions_when_nothing_is_captured():
    """Without captures the hybrid cache is the eager one: same hits, misses and waves."""
    store, _ = make_store(num_layers=L, num_experts=E)
    caches = [ExpertCache(store, K, "cpu", TOP_K, eviction="lfu", executor=x)
              for x in ("eager", "hybrid")]  # fmt: skip
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        for layer in range(L):
            _, ids, _ = route(g, 4)
            for cache in caches:
                for _wave in cache.prepare(layer, ids):
                    pass
                cache.end_step(layer)
    eager, hybrid = (c.counters()["total"] for c in caches)
    assert eager == hybrid


def test_selection_bounds_captured_steps_far_beyond_k_over_top_k():
    """lynx+offload: graphs capture up to K tokens (not K // top_k); every such step's kept set
    fits the slots, so the device-side executor serves it whole: exact, never NaN."""
    store, weights = make_store(num_layers=1, num_experts=E)
    cache = ExpertCache(store, K, "cpu", TOP_K, executor="hybrid")
    plain = SelectionParams(budget=0.9, miss_budget=0.0, layer_budgets="")  # the mechanics alone
    sel = bounded_selection(plain, K, E)
    cap = decode_capture_cap(sel, K, TOP_K, E)
    assert cap == K > K // TOP_K
    g = torch.Generator().manual_seed(2)
    for _ in range(10):
        logits, ids, w = route(g, cap)
        x = torch.randn(cap, H, generator=g)
        step = step_of(cap, captured=True)
        out = moe_layer_step(0, x, ids, w, logits, reference_kernel(None, None), step, sel, cache)
        chosen = select_experts_ref(logits, ids, w, sel, num_valid=cap)
        ref = fused_moe_ref(x, *weights[0], chosen.topk_ids, chosen.topk_weights)
        assert not torch.isnan(out).any()
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    cache.check_overflow()
    assert cache.counters()["total"]["overflow"] == 0


def test_the_eager_executor_refuses_a_capture():
    store, _ = make_store(num_layers=1, num_experts=E)
    cache = ExpertCache(store, K, "cpu", TOP_K, executor="eager")
    with pytest.raises(RuntimeError, match="--lynx-executor hybrid"):
        cache.prepare(0, torch.tensor([[0, 1]], dtype=torch.int32), captured=True)


# ---------------------------------------------------------------- GPU: a real CUDA graph
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("eviction", ["lfu", "learned"])
def test_captured_hybrid_step_replays_bit_for_bit(eviction):
    """A decode step captured in a CUDA graph and replayed on new routing gives bit-for-bit the
    output of the same step run eagerly (device path) and of the resident layer's kernel; eager
    steps in between (waves) and replays share the one state; nothing is ever NaN. "learned":
    path eviction reading a learned predictor (request rows and router logits inside the graph),
    whose forecasts the replays update exactly as the eager twin's steps do."""
    from lynx_sglang.offload.path import PathPredictor

    store, weights = make_store(num_layers=1, num_experts=E)
    kernel = _dense_kernel
    cap = K // TOP_K
    kw = dict(executor="hybrid", eviction="lfu")
    requests = None
    if eviction == "learned":
        g0 = torch.Generator().manual_seed(5)
        w0 = 0.1 * torch.randn(1, E, 3 * E + H, generator=g0)  # reads the MoE input too
        pred = PathPredictor(w0, torch.zeros(1, E), 0.95)
        kw = dict(executor="hybrid", eviction="path", path_predictor=pred, max_requests=cap)
        requests = torch.arange(1, cap + 1, device="cuda")
    cache = ExpertCache(store, K, "cuda", TOP_K, **kw)
    twin = ExpertCache(store, K, "cuda", TOP_K, **kw)
    x = torch.randn(cap, H, device="cuda")
    logits = torch.randn(cap, E, device="cuda")
    w, ids = logits.softmax(-1).topk(TOP_K)
    ids, w = ids.to(torch.int32), w / w.sum(-1, keepdim=True)
    nv = torch.tensor(cap, device="cuda")
    step = Step(decode=True, num_valid=nv, requests=requests)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up, as SGLang runs before capturing
        moe_layer_step(0, x, ids, w, logits, kernel, step, cache=cache)
    torch.cuda.current_stream().wait_stream(s)
    moe_layer_step(0, x, ids, w, logits, kernel, step, cache=twin)  # the same history
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = moe_layer_step(0, x, ids, w, logits, kernel, step, cache=cache)
    w13, w2 = (t.cuda() for t in weights[0])
    g = torch.Generator().manual_seed(3)
    for n in range(6):
        new_logits = torch.randn(cap, E, generator=g).cuda()
        nw, nids = new_logits.softmax(-1).topk(TOP_K)
        logits.copy_(new_logits), ids.copy_(nids.to(torch.int32)), w.copy_(nw / nw.sum(-1, True))
        graph.replay()
        eager_twin = moe_layer_step(0, x, ids, w, logits, kernel, step, cache=twin)
        resident = kernel(x, ids, w, {"w13": w13, "w2": w2})
        assert not torch.isnan(out).any()
        assert torch.equal(out, eager_twin) and torch.equal(out, resident)
        if requests is not None:  # the captured forecast is the eager one's
            torch.testing.assert_close(cache.requests.next, twin.requests.next)
        if n % 2:  # an eager (host-planned) prefill-sized step in between, in waves
            big_ids = torch.randperm(E, generator=g)[: 4 * TOP_K].view(4, TOP_K).to(torch.int32)
            bx, bw = torch.randn(4, H).cuda(), torch.full((4, TOP_K), 0.5).cuda()
            got = moe_layer_step(0, bx, big_ids.cuda(), bw, torch.zeros(4, E).cuda(), kernel,
                                 Step(), cache=cache)  # fmt: skip
            torch.testing.assert_close(got, kernel(bx, big_ids.cuda(), bw, {"w13": w13, "w2": w2}))
    cache.check_overflow()


def _dense_kernel(x, ids, weights, experts):
    """A capturable MoE kernel (no host reads, same arithmetic for slots and resident weights)."""
    w13, w2 = experts["w13"], experts["w2"]
    inter = w2.shape[-1]
    h = torch.einsum("tkoh,th->tko", w13[ids.long()], x)
    h = torch.nn.functional.silu(h[..., :inter]) * h[..., inter:]
    y = torch.einsum("tkhi,tki->tkh", w2[ids.long()], h)
    return (y * weights.unsqueeze(-1)).sum(1)


def test_resident_mask_before_any_capture_is_the_host_state_without_a_push():
    """Before any graph is captured, host-planned steps own the state: the resident mask
    (what cache- and miss-aware selection read every step) comes from the host table, equal to
    what a full push would give, and pushes nothing."""
    store, _ = make_store(num_layers=L, num_experts=E)
    cache = ExpertCache(store, K, "cpu", TOP_K, executor="hybrid")
    hybrid = cache.executor
    g = torch.Generator().manual_seed(4)
    for _ in range(5):
        for layer in range(L):
            logits, ids, w = route(g, K // TOP_K)  # one wave: the step's experts stay resident
            for _wave in cache.prepare(layer, ids):
                pass
            cache.end_step(layer)
            assert hybrid.host_moved and not hybrid.graphs
            host = cache.resident_mask(layer)
            assert hybrid.host_moved  # no push happened
            hybrid._push()
            assert torch.equal(host, hybrid.device.resident_mask(layer))
            assert host[ids.flatten()].all()
