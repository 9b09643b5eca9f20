"""Our hooks inside SGLang's real TopK + FusedMoE on CPU, with one layer of the shipped model
(random weights of its shapes until it is trained): off is stock, offload is exact, lynx equals
the reference policy, and prefill is never touched. What selection did is read where it acts:
the TopK output the layer's fused kernel (its base method) is asked to compute."""

from __future__ import annotations

import inspect
import json

import pytest
import torch
from sglang_helpers import kernel_calls

from lynx_sglang import SHIPPED_MODEL, SHIPPED_MODELS
from lynx_sglang.config import LynxConfig
from lynx_sglang.moe import fused_moe_ref
from lynx_sglang.selection import distinct_experts, select_experts_ref

pytest.importorskip("sglang")

from lynx_sglang.sglang.runtime import (  # noqa: E402
    NOT_DECODE,
    LynxRuntime,
    ModelFacts,
    activated,
)
from lynx_sglang.step import Step  # noqa: E402

LAYER = 0
TOKENS = 16  # T: a decode batch of 16 requests


@pytest.fixture(scope="module", params=SHIPPED_MODELS, ids=lambda p: p.name)
def weights(request):
    """One MoE layer of each shipped model: router [E, H] and per-expert w1/w3 [E, I, H],
    w2 [E, H, I] (float32)."""
    if (request.param / "model.safetensors").exists():
        return checkpoint_layer(request.param, LAYER)
    if request.param != SHIPPED_MODEL:
        pytest.skip(f"{request.param.name} not trained yet")
    # the shipped model's shapes: 64 experts top-8, hidden 192, expert width 128
    E, H, inter = 64, 192, 128
    g = torch.Generator().manual_seed(0)
    return {
        "gate": torch.randn(E, H, generator=g) * 0.3,
        "w1": torch.randn(E, inter, H, generator=g) * H**-0.5,
        "w3": torch.randn(E, inter, H, generator=g) * H**-0.5,
        "w2": torch.randn(E, H, inter, generator=g) * inter**-0.5,
        "top_k": 8,
    }


def checkpoint_layer(model_dir, layer: int) -> dict:
    """One layer of a Hugging Face Qwen3-MoE checkpoint (per-expert gate/up/down tensors)."""
    from safetensors import safe_open

    hf = json.loads((model_dir / "config.json").read_text())
    prefix = f"model.layers.{layer}.mlp."
    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as f:

        def stack(proj: str) -> torch.Tensor:
            names = [f"{prefix}experts.{e}.{proj}.weight" for e in range(hf["num_experts"])]
            return torch.stack([f.get_tensor(n).float() for n in names])

        return {
            "gate": f.get_tensor(prefix + "gate.weight").float(),
            "w1": stack("gate_proj"),
            "w3": stack("up_proj"),
            "w2": stack("down_proj"),
            "top_k": hf["num_experts_per_tok"],
        }


def facts(w: dict) -> ModelFacts:
    E, inter, H = w["w1"].shape
    return ModelFacts(E, w["top_k"], H, inter, (LAYER,), torch.float32)


def build(sglang_layers, w: dict, runtime: LynxRuntime | None):
    """A real FusedMoE + TopK built (with ``runtime`` active) and loaded the way SGLang's model
    loaders do: each expert's checkpoint tensors through the parameter's weight_loader."""
    FusedMoE, TopK = sglang_layers
    E, inter, H = w["w1"].shape
    with activated(runtime):
        moe = FusedMoE(
            num_experts=E,
            hidden_size=H,
            intermediate_size=inter,
            top_k=w["top_k"],
            layer_id=LAYER,
            params_dtype=torch.float32,
            prefix="model.layers.0.mlp.experts",
        )
        topk = TopK(top_k=w["top_k"], layer_id=LAYER, renormalize=True)
    for e in range(E):
        for name, param, shard in (
            ("w1", moe.w13_weight, "w1"),
            ("w3", moe.w13_weight, "w3"),
            ("w2", moe.w2_weight, "w2"),
        ):
            pname = "w13_weight" if shard != "w2" else "w2_weight"
            param.weight_loader(param, w[name][e], f"experts.{pname}", shard_id=shard, expert_id=e)
    moe.quant_method.process_weights_after_loading(moe)
    return moe, topk


def runtime_for(w: dict, **cfg) -> LynxRuntime:
    """A runtime for LAYER (MoE layer 0): the tests of selection's mechanics run it without
    per-layer budgets and, with a cache, without miss-aware selection, unless they ask
    (``test_defaults_*`` check the defaults)."""
    cfg = {"layer_budgets": "", "miss_budget": 0.0, **cfg}
    return LynxRuntime(LynxConfig(**cfg), facts(w), torch.device("cpu"), stats=True)


def inputs(w: dict, seed: int, tokens: int = TOKENS) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, w["gate"].shape[1], generator=g)  # [T, H]
    return x, x @ w["gate"].t()  # router logits [T, E]


def reference(w: dict, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    w13 = torch.cat([w["w1"], w["w3"]], dim=1)  # [E, 2I, H]
    return fused_moe_ref(x, w13, w["w2"], ids, weights)


@pytest.fixture(scope="module")
def stock(sglang_layers, weights):
    return build(sglang_layers, weights, None)


# ---------------------------------------------------------------------------------------------


def test_mode_off_is_stock(sglang_layers, weights, stock):
    """No runtime (mode off): the hooked TopK returns exactly what the unhooked one does, and the
    layer keeps SGLang's own quant method."""
    moe, topk = stock
    from sglang.srt.layers.moe.topk import TopK
    from sglang.srt.layers.quantization.unquant import UnquantizedFusedMoEMethod

    assert type(moe.quant_method) is UnquantizedFusedMoEMethod
    x, logits = inputs(weights, 1)
    hooked = topk.forward_native(x, logits)
    unhooked = inspect.unwrap(TopK.forward_native)(topk, x, logits)
    assert torch.equal(hooked.topk_ids, unhooked.topk_ids)
    assert torch.equal(hooked.topk_weights, unhooked.topk_weights)
    out = moe(x, hooked)
    ref = reference(weights, x, hooked.topk_ids, hooked.topk_weights)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("slots", [8, 16, 64])
def test_offload_is_exact(sglang_layers, weights, stock, slots):
    """K >= top_k slots over the host store: allclose to the fully resident layer, also when the
    batch needs more distinct experts than K (the step then runs in waves)."""
    moe_stock, topk = stock
    runtime = runtime_for(weights, mode="offload", slots=slots, prefetch="off")
    moe, _ = build(sglang_layers, weights, runtime)
    from lynx_sglang.sglang.moe_method import LynxMoEMethod

    assert isinstance(moe.quant_method, LynxMoEMethod)
    assert moe.w13_weight.shape[0] == slots  # the GPU holds K slots, not E experts
    assert moe.w13_weight.data_ptr() == runtime.cache.slot_weights(0)["w13"].data_ptr()
    torch.testing.assert_close(
        runtime.cache.store.tensor(0, "w13"), moe_stock.w13_weight.data, atol=0, rtol=0
    )
    distinct = []
    for seed in range(3):
        x, logits = inputs(weights, seed)
        routed = topk.forward_native(x, logits)
        distinct.append(int(distinct_experts(routed.topk_ids, weights["gate"].shape[0])))
        with runtime.scope(runtime.decode_step(TOKENS)):
            out = moe(x, routed)
        torch.testing.assert_close(out, moe_stock(x, routed), atol=2e-5, rtol=1e-4)
    counters = runtime.cache.counters()["total"]
    assert counters["steps"] == 3 and counters["misses"] > 0
    if slots < max(distinct):
        assert counters["waves"] > counters["steps"]


def test_lynx_equals_reference_policy(sglang_layers, weights):
    """Decode batch: the TopK output is our reference policy on the same router logits, and the
    layer computes with the selected experts."""
    runtime = runtime_for(weights, mode="lynx", budget=0.5)
    moe, topk = build(sglang_layers, weights, runtime)
    params = runtime.cfg.selection
    x, logits = inputs(weights, 3)
    stock_out = topk.forward_native(x, logits)  # SGLang's TopK, unhooked
    with activated(runtime), runtime.scope(runtime.decode_step(TOKENS)), kernel_calls(moe) as k:
        out = moe(x, topk.forward_native(x, logits))
    (selected,) = k
    ref = select_experts_ref(
        logits, stock_out.topk_ids, stock_out.topk_weights, params, num_valid=TOKENS
    )
    assert torch.equal(selected.topk_ids, ref.topk_ids)
    torch.testing.assert_close(selected.topk_weights, ref.topk_weights, atol=0, rtol=0)
    E = weights["gate"].shape[0]
    assert distinct_experts(ref.topk_ids, E) < distinct_experts(stock_out.topk_ids, E)
    torch.testing.assert_close(
        out, reference(weights, x, ref.topk_ids, ref.topk_weights), atol=1e-5, rtol=1e-5
    )
    stats = runtime.read_counters()["selection"]
    assert stats["steps"] == 1 and stats["distinct_after"] < stats["distinct_before"]


def test_lynx_masks_graph_padding(sglang_layers, weights):
    """Under graph capture the real row count is a device tensor; padding rows do not vote."""
    runtime = runtime_for(weights, mode="lynx", budget=0.5)
    moe, topk = build(sglang_layers, weights, runtime)
    params = runtime.cfg.selection
    x, logits = inputs(weights, 4)
    stock_out = topk.forward_native(x, logits)
    with activated(runtime), runtime.scope(runtime.capture_step(TOKENS)), kernel_calls(moe) as k:
        runtime.graph_rows.fill_(10)  # what a replay of 10 real requests writes
        moe(x, topk.forward_native(x, logits))
    (selected,) = k
    ref = select_experts_ref(
        logits, stock_out.topk_ids, stock_out.topk_weights, params, num_valid=torch.tensor(10)
    )
    assert torch.equal(selected.topk_ids, ref.topk_ids)
    unpadded = select_experts_ref(
        logits[:10], stock_out.topk_ids[:10], stock_out.topk_weights[:10], params
    )
    assert torch.equal(selected.topk_ids[:10], unpadded.topk_ids)


def test_prefill_and_small_batches_untouched(sglang_layers, weights):
    """Prefill/extend/mixed (not decode) and decode batches below min_batch pass through."""
    runtime = runtime_for(weights, mode="lynx+offload", budget=0.5, slots=16, min_batch=4)
    moe, topk = build(sglang_layers, weights, runtime)
    lynx_only = runtime_for(weights, mode="lynx", budget=0.5, min_batch=4)
    moe_lynx, _ = build(sglang_layers, weights, lynx_only)
    x, logits = inputs(weights, 5)
    stock_out = topk.forward_native(x, logits)
    with activated(runtime):
        with runtime.scope(NOT_DECODE):
            out = moe(x, topk.forward_native(x, logits))
        with runtime.scope(runtime.decode_step(3)):
            out_small = moe(x[:3], topk.forward_native(x[:3], logits[:3]))
    with activated(lynx_only), kernel_calls(moe_lynx) as k:
        with lynx_only.scope(NOT_DECODE):
            moe_lynx(x, topk.forward_native(x, logits))
        with lynx_only.scope(lynx_only.decode_step(3)):
            moe_lynx(x[:3], topk.forward_native(x[:3], logits[:3]))
    prefill, small = k
    assert torch.equal(prefill.topk_ids, stock_out.topk_ids)
    assert torch.equal(prefill.topk_weights, stock_out.topk_weights)
    assert torch.equal(small.topk_ids, stock_out.topk_ids[:3])
    ref = reference(weights, x, stock_out.topk_ids, stock_out.topk_weights)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(out_small, ref[:3], atol=2e-5, rtol=1e-4)


def test_lynx_plus_offload(sglang_layers, weights):
    """The product: selection shrinks the set, the cache serves it exactly."""
    runtime = runtime_for(weights, mode="lynx+offload", budget=0.5, slots=16, prefetch="off")
    moe, topk = build(sglang_layers, weights, runtime)
    params = runtime.cfg.selection
    x, logits = inputs(weights, 6)
    stock_out = topk.forward_native(x, logits)
    with activated(runtime), runtime.scope(runtime.decode_step(TOKENS)):
        out = moe(x, topk.forward_native(x, logits))
    ref = select_experts_ref(
        logits, stock_out.topk_ids, stock_out.topk_weights, params, num_valid=TOKENS
    )
    expected = reference(weights, x, ref.topk_ids, ref.topk_weights)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-4)
    counters = runtime.read_counters()
    assert counters["cache"]["distinct"] == int(
        distinct_experts(ref.topk_ids, weights["gate"].shape[0])
    )


@pytest.mark.parametrize("policy", ["drop", "similar"])
def test_other_policies_equal_the_reference(sglang_layers, weights, policy):
    """drop and similar inside SGLang's layer: the fused kernel gets the reference's routing;
    similar reads the expert similarity the runtime computed from the weights as loaded."""
    from lynx_sglang.selection.similarity import expert_similarity

    runtime = runtime_for(weights, mode="lynx", budget=0.5, policy=policy)
    moe, topk = build(sglang_layers, weights, runtime)
    sim = None
    if policy == "similar":
        w13 = torch.cat([weights["w1"], weights["w3"]], dim=1)
        sim = expert_similarity(w13, weights["w2"], runtime.cfg.similar_threshold)
        torch.testing.assert_close(runtime.similarity[0].matrix, sim.matrix)
        assert torch.equal(runtime.similarity[0].critical, sim.critical)
    else:
        assert runtime.similarity is None
    x, logits = inputs(weights, 4)
    stock_out = topk.forward_native(x, logits)
    with activated(runtime), runtime.scope(runtime.decode_step(TOKENS)), kernel_calls(moe) as k:
        out = moe(x, topk.forward_native(x, logits))
    (selected,) = k
    ref = select_experts_ref(logits, stock_out.topk_ids, stock_out.topk_weights,
                             runtime.cfg.selection, TOKENS, None, sim)  # fmt: skip
    assert torch.equal(selected.topk_ids, ref.topk_ids)
    torch.testing.assert_close(selected.topk_weights, ref.topk_weights, atol=0, rtol=0)
    if policy == "drop":
        assert (ref.topk_weights == 0).any()
    torch.testing.assert_close(
        out, reference(weights, x, ref.topk_ids, ref.topk_weights), atol=1e-5, rtol=1e-5
    )


def test_miss_aware_reads_the_cache_step_by_step(sglang_layers, weights):
    """lynx+offload with miss-aware selection: each decode step keeps every needed resident
    expert (the cache as the previous step left it), the budget applied to the missing ones,
    and the output is exact for that routing."""
    runtime = runtime_for(weights, mode="lynx+offload", budget=0.9, slots=32, miss_budget=0.3)
    moe, topk = build(sglang_layers, weights, runtime)
    params = runtime.cfg.selection
    for seed in range(4):
        x, logits = inputs(weights, 10 + seed)
        stock_out = topk.forward_native(x, logits)
        resident = runtime.cache.resident_mask(0).clone()
        with activated(runtime), runtime.scope(runtime.decode_step(TOKENS)):
            out = moe(x, topk.forward_native(x, logits))
        ref = select_experts_ref(logits, stock_out.topk_ids, stock_out.topk_weights, params,
                                 TOKENS, resident)  # fmt: skip
        chosen = torch.zeros_like(resident).scatter(0, stock_out.topk_ids.flatten().long(), True)
        assert ref.keep[chosen & resident].all()
        torch.testing.assert_close(
            out, reference(weights, x, ref.topk_ids, ref.topk_weights), atol=2e-5, rtol=1e-4
        )
    assert resident.any()  # later steps did see residents


def test_defaults_and_a_layer_preset_offload_budgets_the_misses(sglang_layers, weights):
    """The defaults (from bench/quality.py's frontier, met on the bound on both models): every
    layer at budget 0.9 and, with the cache, miss-aware at 0.7; a preset's layer budget (here the
    first MoE layer keeping every expert) replaces both for its layer."""
    default = LynxConfig(mode="lynx+offload", slots=32).selection
    assert default.layer_budgets == "" and default.at_layer(0).budget == 0.9
    assert default.miss_aware and default.at_layer(3).miss_budget == 0.7
    cfg = LynxConfig(mode="lynx+offload", slots=32, layer_budgets="0:1.0")
    runtime = LynxRuntime(cfg, facts(weights), torch.device("cpu"), stats=True)
    later = cfg.selection.at_layer(1)
    assert cfg.selection.at_layer(0).budget == 1.0 and later.budget == 0.9
    assert later.miss_aware and later.miss_budget == 0.7
    moe, topk = build(sglang_layers, weights, runtime)
    x, logits = inputs(weights, 8)
    stock_out = topk.forward_native(x, logits)
    with activated(runtime), runtime.scope(runtime.decode_step(TOKENS)):
        out = moe(x, topk.forward_native(x, logits))
    torch.testing.assert_close(
        out, reference(weights, x, stock_out.topk_ids, stock_out.topk_weights), atol=2e-5, rtol=1e-4
    )
    stats = runtime.read_counters()["selection"]
    assert stats["distinct_after"] == stats["distinct_before"]  # layer 0: nothing removed


def test_forward_modes_map_to_steps(weights):
    """Only pure decode forwards are decode steps (real rows: one per request); a captured decode
    graph reads its row count from the device buffer that each decode forward writes."""
    from types import SimpleNamespace

    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    from lynx_sglang.sglang import hooks

    runtime = runtime_for(weights, mode="lynx")
    seen = []

    def forward(runner, batch):
        seen.append(runtime.step)

    runner = SimpleNamespace(is_draft_worker=False)
    with activated(runtime):
        for mode in ForwardMode:
            batch = SimpleNamespace(forward_mode=mode, batch_size=7)
            hooks.around_forward_raw(forward, runner, batch)
        graph = SimpleNamespace(
            model_runner=runner, capture_forward_mode=ForwardMode.DECODE, captured_req_width=1
        )
        hooks.around_capture_one_shape(lambda g, size: forward(None, None), graph, 16)
        verify = SimpleNamespace(
            **{**vars(graph), "capture_forward_mode": ForwardMode.TARGET_VERIFY}
        )
        hooks.around_capture_one_shape(lambda g, size: forward(None, None), verify, 16)
    by_mode = dict(zip(ForwardMode, seen))
    assert by_mode.pop(ForwardMode.DECODE) == (True, 7, None)
    assert all(step == NOT_DECODE for step in by_mode.values())
    captured, not_captured = seen[len(ForwardMode) :]
    assert captured.decode and captured.num_valid is runtime.graph_rows
    assert int(runtime.graph_rows) == 16 and not_captured == NOT_DECODE
    assert runtime.step == NOT_DECODE  # restored after every scope


@pytest.mark.parametrize("mode", ["offload", "lynx+offload"])
def test_captured_decode_steps_run_device_side_and_eager_steps_in_waves(
    sglang_layers, weights, stock, mode
):
    """The hybrid path through the real FusedMoE: a decode step captured at the cap (K // top_k
    tokens without selection, K tokens with it) is served by the device-side executor in one
    wave, never NaN; prefill and larger batches run host-planned, in waves; all exact."""
    moe_stock, topk = stock
    # the kept set bounded at K (--lynx-max-experts 16): graphs capture up to K tokens
    runtime = runtime_for(weights, mode=mode, budget=0.5, slots=16, prefetch="off", max_experts=16)
    moe, _ = build(sglang_layers, weights, runtime)
    cap = runtime.capture_cap
    assert cap == (16 if mode == "lynx+offload" else 16 // weights["top_k"])
    E = weights["gate"].shape[0]
    for seed in range(3):
        x, logits = inputs(weights, 10 + seed)
        routed = topk.forward_native(x[:cap], logits[:cap])
        with activated(runtime), runtime.scope(runtime.capture_step(cap)):
            out = moe(x[:cap], routed)
        assert not torch.isnan(out).any()
        if runtime.selection is None:
            torch.testing.assert_close(out, moe_stock(x[:cap], routed), atol=2e-5, rtol=1e-4)
        else:
            assert runtime.selection.max_experts == 16  # the kept set capped at K
            ref = select_experts_ref(logits[:cap], routed.topk_ids, routed.topk_weights,
                                     runtime.selection, num_valid=cap)  # fmt: skip
            assert int(distinct_experts(ref.topk_ids, E)) <= 16
            expected = reference(weights, x[:cap], ref.topk_ids, ref.topk_weights)
            torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-4)
        with activated(runtime), runtime.scope(NOT_DECODE):  # a prefill: host-planned waves
            prefill = topk.forward_native(x, logits)
            torch.testing.assert_close(moe(x, prefill), moe_stock(x, prefill), atol=2e-5, rtol=1e-4)
    counters = runtime.cache.counters()["total"]
    assert counters["overflow"] == 0 and counters["waves"] > counters["steps"]


def test_path_eviction_reads_each_rows_request_through_sglangs_forward(sglang_layers, weights, stock):
    """``--lynx-eviction path`` in the server: the forward hook hands each row's request row
    (SGLang's req_pool_idx, allocated by its real ReqToTokenPool) to the cache, eager and
    captured. A prefill seeds its requests' histories; a decode step (eager, or a captured
    graph reading the buffer each decode forward writes) runs on them; a request that left the
    batch stops counting; graph padding (request row 0) never counts. Outputs stay exact."""
    from types import SimpleNamespace

    from sglang.srt.mem_cache.memory_pool import ReqToTokenPool
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    from lynx_sglang.sglang import hooks

    moe_stock, topk = stock
    runtime = runtime_for(weights, mode="offload", slots=16, prefetch="off", eviction="path")
    moe, _ = build(sglang_layers, weights, runtime)
    pool = ReqToTokenPool(size=6, max_context_len=64, device="cpu", enable_memory_saver=False)
    rows = pool.alloc_rows(3)  # three requests' rows (never 0: SGLang's padding row)
    runner = SimpleNamespace(is_draft_worker=False, req_to_token_pool=pool)
    history = runtime.cache.requests
    prompt = 5
    x, logits = inputs(weights, 3, tokens=3 * prompt)
    routed = topk.forward_native(x, logits)

    def forward(runner, batch, x, routed):
        out = moe(x, routed)
        torch.testing.assert_close(out, moe_stock(x, routed), atol=2e-5, rtol=1e-4)

    req = torch.tensor(rows)
    prefill = SimpleNamespace(forward_mode=ForwardMode.EXTEND, batch_size=3, req_pool_indices=req,
                              extend_seq_lens=torch.full((3,), prompt),
                              extend_num_tokens=3 * prompt)  # fmt: skip
    with activated(runtime):
        hooks.around_forward_raw(forward, runner, prefill, x, routed)
    assert history.rows == pool.size + 1
    assert history.active[req].tolist() == [1.0] * 3 and history.active.sum() == 3
    for i, r in enumerate(rows):  # seeded with its prompt's choices per token (k in all)
        h = history.hist[r, 0] * (1 - history.decay)
        assert h.sum().item() == pytest.approx(weights["top_k"])
        own = torch.bincount(routed.topk_ids[i * prompt : (i + 1) * prompt].reshape(-1),
                             minlength=h.shape[0]).float() / prompt  # fmt: skip
        torch.testing.assert_close(h, own)

    # an eager decode step of two of them (the third finished)
    x2, logits2 = inputs(weights, 4, tokens=2)
    routed2 = topk.forward_native(x2, logits2)
    decode = SimpleNamespace(forward_mode=ForwardMode.DECODE, batch_size=2, req_pool_indices=req[:2])
    before = history.hist[rows[0], 0].clone()
    with activated(runtime):
        hooks.around_forward_raw(forward, runner, decode, x2, routed2)
    assert history.active[req].tolist() == [1.0, 1.0, 0.0]
    expected = before * history.decay
    expected[routed2.topk_ids[0].long()] += 1
    torch.testing.assert_close(history.hist[rows[0], 0], expected)
    policy = runtime.cache.executor.eager.eviction_policy
    assert policy.pred[0][routed.topk_ids[2 * prompt :].reshape(-1).unique()].max() < 1.0

    # a captured decode graph (cap rows), then replayed for one real request: the forward hook
    # arms the buffers, the captured step reads them
    cap = runtime.capture_cap
    with activated(runtime), runtime.scope(runtime.capture_step(cap)) as step:
        assert step.requests.data_ptr() == runtime.graph_requests.data_ptr()
    runtime.decode_step(1, req[1:2])
    assert runtime.graph_requests.tolist()[:cap] == [rows[1]] + [0] * (cap - 1)
    replay = Step(decode=True, num_valid=runtime.graph_rows, requests=runtime.graph_requests[:cap])
    x3, logits3 = inputs(weights, 5, tokens=cap)
    with activated(runtime), runtime.scope(replay):
        out = moe(x3, topk.forward_native(x3, logits3))
    real = topk.forward_native(x3[:1], logits3[:1])
    torch.testing.assert_close(out[:1], moe_stock(x3[:1], real), atol=2e-5, rtol=1e-4)
    assert history.active.sum() == 1 and history.active[rows[1]] == 1
    assert history.hist[0].abs().sum() == 0  # the padding row holds nothing


def test_a_learned_path_predictor_reads_sglangs_router_logits(sglang_layers, weights, stock, tmp_path):
    """``--lynx-path-predictor``: SGLang's TopK output carries the router logits, and its
    dispatch output the MoE input, through the wrapped quant method to the cache; the history's
    forecast of each running request is the predictor's map of that request's latest token (its
    p, softmax, choices, MoE input). Outputs stay exact."""
    from types import SimpleNamespace

    from sglang.srt.mem_cache.memory_pool import ReqToTokenPool
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    from lynx_sglang.offload.path import PathPredictor
    from lynx_sglang.sglang import hooks

    moe_stock, topk = stock
    E = weights["w1"].shape[0]
    g = torch.Generator().manual_seed(3)
    file = tmp_path / "path_predictor.pt"
    H = weights["gate"].shape[1]  # the predictor reads the MoE input too
    PathPredictor(0.3 * torch.randn(1, E, 3 * E + H, generator=g), torch.randn(1, E, generator=g),
                  0.95).save(file)  # fmt: skip
    runtime = runtime_for(weights, mode="offload", slots=16, prefetch="off", eviction="path",
                          path_predictor=str(file))  # fmt: skip
    moe, _ = build(sglang_layers, weights, runtime)
    pool = ReqToTokenPool(size=4, max_context_len=64, device="cpu", enable_memory_saver=False)
    rows = pool.alloc_rows(2)
    runner = SimpleNamespace(is_draft_worker=False, req_to_token_pool=pool)
    history = runtime.cache.requests
    pred = history.predictor
    assert f"eviction=path(predictor={file})" in hooks._describe(runtime.cfg, runtime)

    def forward(runner, batch, x, routed):
        torch.testing.assert_close(moe(x, routed), moe_stock(x, routed), atol=2e-5, rtol=1e-4)

    req = torch.tensor(rows)
    x, logits = inputs(weights, 7, tokens=6)
    routed = topk.forward_native(x, logits)
    prefill = SimpleNamespace(forward_mode=ForwardMode.EXTEND, batch_size=2, req_pool_indices=req,
                              extend_seq_lens=torch.full((2,), 3), extend_num_tokens=6)  # fmt: skip
    x2, logits2 = inputs(weights, 8, tokens=2)
    routed2 = topk.forward_native(x2, logits2)
    decode = SimpleNamespace(forward_mode=ForwardMode.DECODE, batch_size=2, req_pool_indices=req)
    with activated(runtime):
        hooks.around_forward_raw(forward, runner, prefill, x, routed)
        for i, r in enumerate(rows):  # the first decode token: from the prompt's last row
            last = 3 * i + 2
            chosen = torch.zeros(1, E).index_fill_(1, routed.topk_ids[last].long(), 1.0)
            want = pred(0, (1 - history.decay) * history.hist[r, 0][None],
                        torch.softmax(logits[last : last + 1], -1), chosen, x[last : last + 1])  # fmt: skip
            torch.testing.assert_close(history.next[r, 0], want[0])
        hooks.around_forward_raw(forward, runner, decode, x2, routed2)
    for i, r in enumerate(rows):
        chosen = torch.zeros(1, E).index_fill_(1, routed2.topk_ids[i].long(), 1.0)
        want = pred(0, (1 - history.decay) * history.hist[r, 0][None],
                    torch.softmax(logits2[i : i + 1], -1), chosen, x2[i : i + 1])  # fmt: skip
        torch.testing.assert_close(history.next[r, 0], want[0])
