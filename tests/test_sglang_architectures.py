"""The MoE blocks people serve now, through our method on CPU with SGLang's real classes:
DeepSeek-V3's ``DeepseekV2MoE`` (sigmoid scores, grouped top-k chosen by a non-zero
``e_score_correction_bias``, ``routed_scaling_factor`` != 1, a shared expert unfused and fused;
Kimi K2 and GLM-4.5 route the same way) and Qwen2-MoE's sparse block with its gated shared
expert (the block of Qwen3-Next and Qwen3.5), renormalising and not.

Tiny random configs: they prove the path is exact and follows each model's rule, not what
selection costs on the real model. Every expectation is computed here by hand from the config's
rule (sigmoid + bias to choose, unbiased scores to weigh, the scale after the experts)."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from sglang_helpers import kernel_calls

from lynx_sglang.config import LynxConfig
from lynx_sglang.moe import fused_moe_ref
from lynx_sglang.selection import distinct_experts, select_experts_ref

pytest.importorskip("sglang")

from lynx_sglang.sglang import hooks  # noqa: E402
from lynx_sglang.sglang.checks import UnsupportedConfig  # noqa: E402
from lynx_sglang.sglang.runtime import LynxRuntime, ModelFacts, activated  # noqa: E402

E, TOP_K, H, INTER = 16, 4, 64, 32  # routed experts, routed top-k, hidden, expert width
SHARED_INTER = 48  # Qwen's shared expert width
TOKENS = 16
DS_LAYER = 1  # DeepSeek: layer 0 is dense (first_k_dense_replace=1), MoE layer index 0
SCALE = 2.5  # routed_scaling_factor


def deepseek_config():
    from transformers import DeepseekV3Config

    return DeepseekV3Config(
        hidden_size=H, intermediate_size=128, moe_intermediate_size=INTER, n_routed_experts=E,
        num_experts_per_tok=TOP_K, n_group=4, topk_group=2, n_shared_experts=1,
        routed_scaling_factor=SCALE, topk_method="noaux_tc", scoring_func="sigmoid",
        norm_topk_prob=True, num_hidden_layers=3, first_k_dense_replace=1,
        architectures=["DeepseekV3ForCausalLM"],
    )  # fmt: skip


def glm_config():
    from transformers import Glm4MoeConfig

    return Glm4MoeConfig(
        hidden_size=H, intermediate_size=128, moe_intermediate_size=INTER, n_routed_experts=E,
        num_experts_per_tok=TOP_K, n_group=4, topk_group=2, n_shared_experts=1,
        routed_scaling_factor=SCALE, norm_topk_prob=True, num_hidden_layers=3,
        first_k_dense_replace=1, architectures=["Glm4MoeForCausalLM"],
    )  # fmt: skip


# The DeepSeek-routed blocks: (config, block class in SGLang). GLM-4.5's TopK keeps the default
# scoring_func "softmax", while SGLang's biased grouped top-k scores by sigmoid regardless.
DEEPSEEK_ROUTED = {
    "deepseek": (deepseek_config, "sglang.srt.models.deepseek_v2:DeepseekV2MoE"),
    "glm4.5": (glm_config, "sglang.srt.models.glm4_moe:Glm4MoeSparseMoeBlock"),
}


def qwen_config(norm: bool):
    from transformers import Qwen2MoeConfig

    return Qwen2MoeConfig(
        hidden_size=H, intermediate_size=128, moe_intermediate_size=INTER, num_experts=E,
        num_experts_per_tok=TOP_K, shared_expert_intermediate_size=SHARED_INTER,
        norm_topk_prob=norm, num_hidden_layers=2, decoder_sparse_step=1, mlp_only_layers=[],
        architectures=["Qwen2MoeForCausalLM"],
    )  # fmt: skip


def random_weights(seed: int, shared_inter: int) -> dict:
    """Router, bias, routed experts (w1/w3 [E, I, H], w2 [E, H, I]) and one shared expert."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale):
        return torch.randn(*shape, generator=g) * scale

    return {
        "gate": rnd(E, H, scale=0.3),
        "bias": rnd(E, scale=0.2),  # large enough to change which experts are chosen
        "w1": rnd(E, INTER, H, scale=H**-0.5),
        "w3": rnd(E, INTER, H, scale=H**-0.5),
        "w2": rnd(E, H, INTER, scale=INTER**-0.5),
        "s1": rnd(shared_inter, H, scale=H**-0.5),
        "s3": rnd(shared_inter, H, scale=H**-0.5),
        "s2": rnd(H, shared_inter, scale=shared_inter**-0.5),
        "sgate": rnd(1, H, scale=0.3),  # Qwen's shared-expert gate
    }


def load_experts(moe, w: dict, fused_shared: bool) -> None:
    """Each expert's checkpoint tensors through the parameter's weight_loader (as SGLang's model
    loaders do); a fused shared expert is expert E."""
    w1, w3, w2 = w["w1"], w["w3"], w["w2"]
    if fused_shared:
        w1, w3, w2 = (
            torch.cat([a, b[None]]) for a, b in ((w1, w["s1"]), (w3, w["s3"]), (w2, w["s2"]))
        )
    for e in range(w1.shape[0]):
        for t, param, shard in ((w1, moe.w13_weight, "w1"), (w3, moe.w13_weight, "w3"),
                                (w2, moe.w2_weight, "w2")):  # fmt: skip
            pname = "w2_weight" if shard == "w2" else "w13_weight"
            param.weight_loader(param, t[e], f"experts.{pname}", shard_id=shard, expert_id=e)
    moe.quant_method.process_weights_after_loading(moe)


def facts(hf_config) -> ModelFacts:
    return ModelFacts.from_hf_config(hf_config, torch.float32)


def runtime_for(hf_config, device="cpu", **cfg) -> LynxRuntime:
    cfg = {"layer_budgets": "", "miss_budget": 0.0, "prefetch": "off", **cfg}
    return LynxRuntime(LynxConfig(**cfg), facts(hf_config), torch.device(device), stats=True)


def build_deepseek(
    w: dict, runtime: LynxRuntime | None, fused_shared: bool = False, device="cpu", kind="deepseek"
):
    """SGLang's DeepseekV2MoE (or another DeepSeek-routed block) at DS_LAYER, loaded, with the
    model-load hook's last step run (every layer wrapped, each router's rule read) when a
    runtime is given."""
    import importlib

    from sglang.srt.configs.shared_experts import SharedExpertsConfig
    from sglang.srt.runtime_context import get_model

    make_config, where = DEEPSEEK_ROUTED[kind]
    module, name = where.split(":")
    block_class = getattr(importlib.import_module(module), name)

    fused = SharedExpertsConfig(num_fused_shared_experts=1) if fused_shared else None
    ctx = get_model().override(shared_experts=fused) if fused else contextlib.nullcontext()
    with ctx, activated(runtime), torch.device(device):
        block = block_class(make_config(), layer_id=DS_LAYER, quant_config=None,
                            prefix=f"model.layers.{DS_LAYER}.mlp")  # fmt: skip
    assert block.experts.num_fused_shared_experts == int(fused_shared)
    with torch.no_grad():
        block.gate.weight.copy_(w["gate"])
        block.gate.e_score_correction_bias.copy_(w["bias"])
        if not fused_shared:
            block.shared_experts.gate_up_proj.weight.copy_(torch.cat([w["s1"], w["s3"]]))
            block.shared_experts.down_proj.weight.copy_(w["s2"])
    load_experts(block.experts, w, fused_shared)
    if runtime is not None:
        hooks._finish_load(runtime, block)
    return block


def build_qwen(w: dict, runtime: LynxRuntime | None, norm: bool):
    """SGLang's Qwen2MoeSparseMoeBlock (layer 0) with its shared expert, loaded."""
    from sglang.srt.models.qwen2_moe import Qwen2MoeSparseMoeBlock

    with activated(runtime):
        block = Qwen2MoeSparseMoeBlock(layer_id=0, config=qwen_config(norm), quant_config=None,
                                       prefix="model.layers.0.mlp")  # fmt: skip
    with torch.no_grad():
        block.gate.weight.copy_(w["gate"])
        block.shared_expert.gate_up_proj.weight.copy_(torch.cat([w["s1"], w["s3"]]))
        block.shared_expert.down_proj.weight.copy_(w["s2"])
        block.shared_expert_gate.weight.copy_(w["sgate"])
    load_experts(block.experts, w, fused_shared=False)
    if runtime is not None:
        hooks._finish_load(runtime, block)
    return block


@pytest.fixture(autouse=True)
def torch_shared_gate(monkeypatch):
    """Qwen's block adds its gated shared expert with a Triton kernel that has no CPU driver:
    the torch equivalent, in place like the kernel (out += sigmoid(x . g) * shared)."""
    from sglang.srt.models import qwen2_moe

    def gate_mul_add(x, gate_w, shared, out):
        out += torch.sigmoid(x @ gate_w)[:, None] * shared

    monkeypatch.setattr(qwen2_moe, "fused_gate_sigmoid_mul_add", gate_mul_add)
    with torch.no_grad():  # SGLang's forwards run without autograd
        yield


def silu_mlp(x, w1, w3, w2):
    return (torch.nn.functional.silu(x @ w1.t()) * (x @ w3.t())) @ w2.t()


def routed_out(w: dict, x, ids, weights):
    w13 = torch.cat([w["w1"], w["w3"]], dim=1)  # [E, 2I, H]
    return fused_moe_ref(x, w13, w["w2"], ids, weights)


def deepseek_ref(w: dict, x, ids, weights):
    """DeepSeek's rule after routing: scale times the routed experts, plus the shared one."""
    return SCALE * routed_out(w, x, ids, weights) + silu_mlp(x, w["s1"], w["s3"], w["s2"])


def qwen_ref(w: dict, x, ids, weights):
    shared = torch.sigmoid(x @ w["sgate"].t()) * silu_mlp(x, w["s1"], w["s3"], w["s2"])
    return routed_out(w, x, ids, weights) + shared


def deepseek_routing(w: dict, x):
    """The model's rule by hand: sigmoid scores; choose by score + bias in the best 2 of 4 groups
    (a group's score: its two best biased scores); weigh by unbiased scores, renormalised."""
    logits = x @ w["gate"].t()
    score = logits.sigmoid()
    biased = score + w["bias"]
    groups = biased.view(-1, 4, E // 4).topk(2, -1).values.sum(-1)  # [T, 4]
    allowed = torch.zeros_like(groups, dtype=torch.bool).scatter(
        1, groups.topk(2, -1).indices, True
    )
    masked = biased.masked_fill(~allowed.repeat_interleave(E // 4, 1), float("-inf"))
    ids = masked.topk(TOP_K, -1).indices
    chosen = score.gather(1, ids)
    return logits, ids, chosen / chosen.sum(-1, keepdim=True)


def decode_step(runtime, block, x):
    """One eager decode step of ``block`` on ``x`` with ``runtime`` active: its output and the
    one TopK output its fused kernel was asked to compute."""
    with (
        activated(runtime),
        runtime.scope(runtime.decode_step(x.shape[0])),
        kernel_calls(block.experts) as calls,
    ):
        out = block(x)
    (sel,) = calls
    return out, sel


def sort_rows(ids, weights):
    order = ids.argsort(-1)
    return ids.gather(-1, order), weights.gather(-1, order)


def inputs(seed: int, tokens: int = TOKENS):
    return torch.randn(tokens, H, generator=torch.Generator().manual_seed(100 + seed))


# ---------------------------------------------------------------------------------------------
# Stock, and exact with selection off
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", DEEPSEEK_ROUTED)
@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
def test_deepseek_stock_block_is_the_models_rule(sglang_layers, fused, kind):
    """The oracle first: SGLang's block (plugin off) equals the rule written by hand."""
    w = random_weights(0, INTER)
    block = build_deepseek(w, None, fused, kind=kind)
    x = inputs(0)
    logits, ids, weights = deepseek_routing(w, x)
    topk = block.topk.forward_native(x, logits)
    got_ids, got_w = sort_rows(topk.topk_ids[:, :TOP_K].long(), topk.topk_weights[:, :TOP_K])
    want_ids, want_w = sort_rows(ids, weights)
    assert torch.equal(got_ids, want_ids)
    torch.testing.assert_close(got_w, want_w, atol=1e-6, rtol=1e-6)
    if fused:
        assert (topk.topk_ids[:, TOP_K] == E).all()
    torch.testing.assert_close(block(x), deepseek_ref(w, x, ids, weights), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("slots", [TOP_K, 8, E])
def test_deepseek_offload_is_exact(sglang_layers, slots):
    """Offload (selection off), K >= top-k: the block's output is the stock block's, prefill and
    decode, while the shared expert stays a resident MLP outside the K slots."""
    w = random_weights(1, INTER)
    stock = build_deepseek(w, None)
    runtime = runtime_for(deepseek_config(), mode="offload", slots=slots)
    assert runtime.index(DS_LAYER) == 0  # MoE layers, not decoder layers
    block = build_deepseek(w, runtime)
    assert block.experts.w13_weight.shape[0] == slots
    assert (
        runtime.routing[0].scoring == "sigmoid" and runtime.routing[0].correction_bias is not None
    )
    for seed in range(3):
        x = inputs(seed)
        with activated(runtime), runtime.scope(runtime.decode_step(TOKENS)):
            out = block(x)
        torch.testing.assert_close(out, stock(x), atol=2e-5, rtol=1e-4)
    assert runtime.cache.counters()["total"]["misses"] > 0


@pytest.mark.parametrize("norm", [True, False], ids=["renormalised", "not-renormalised"])
def test_qwen_offload_is_exact(sglang_layers, norm):
    w = random_weights(2, SHARED_INTER)
    stock = build_qwen(w, None, norm)
    runtime = runtime_for(qwen_config(norm), mode="offload", slots=8)
    block = build_qwen(w, runtime, norm)
    x = inputs(3)
    logits = x @ w["gate"].t()
    p = logits.softmax(-1)
    ids = p.topk(TOP_K, -1).indices
    weights = p.gather(1, ids)
    if norm:
        weights = weights / weights.sum(-1, keepdim=True)
    torch.testing.assert_close(stock(x), qwen_ref(w, x, ids, weights), atol=2e-5, rtol=1e-4)
    with activated(runtime), runtime.scope(runtime.decode_step(TOKENS)):
        torch.testing.assert_close(block(x), stock(x), atol=2e-5, rtol=1e-4)


def test_fused_shared_experts_with_offload_are_refused(sglang_layers):
    runtime = runtime_for(deepseek_config(), mode="offload", slots=8)
    with pytest.raises(UnsupportedConfig, match="--disable-shared-experts-fusion"):
        build_deepseek(random_weights(0, INTER), runtime, fused_shared=True)


# ---------------------------------------------------------------------------------------------
# Selection follows each model's rule
# ---------------------------------------------------------------------------------------------


def check_selection(logits, stock_ids, stock_w, got_ids, got_w, budget, own_weights):
    """What selection must do on any routing: k kept, rows distinct, the model's top choice
    protected, the kept set within the budget, moved choices weighed by ``own_weights``,
    unchanged rows bit for bit. ``logits`` are the model's choice logits (its order)."""
    assert got_ids.shape == stock_ids.shape
    assert all(len(set(row.tolist())) == TOP_K for row in got_ids)
    assert (got_ids < E).all()
    top1 = stock_ids.gather(1, logits.gather(1, stock_ids).argmax(1, keepdim=True))
    assert (got_ids == top1).any(1).all()
    before = int(distinct_experts(stock_ids, E))
    after = int(distinct_experts(got_ids, E))
    assert after < before
    assert after <= max(math.ceil(budget * before), TOP_K, len(top1.unique()))
    changed = (got_ids != stock_ids).any(1)
    assert changed.any()
    assert torch.equal(got_w[~changed], stock_w[~changed])
    torch.testing.assert_close(got_w[changed], own_weights(got_ids)[changed], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("kind", DEEPSEEK_ROUTED)
@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
def test_deepseek_selection_follows_its_routing(sglang_layers, fused, kind):
    """lynx on DeepSeek: scores and the kept set from the biased sigmoid scores that chose the
    experts; a moved choice weighed by its unbiased score renormalised over the row; the shared
    column (fused) untouched and never counted; the output the model's rule on those choices."""
    budget = 0.5
    w = random_weights(4, INTER)
    runtime = runtime_for(DEEPSEEK_ROUTED[kind][0](), mode="lynx", budget=budget)
    block = build_deepseek(w, runtime, fused, kind=kind)
    assert runtime.routing[0].shared_columns == int(fused)
    assert runtime.routing[0].scoring == "sigmoid"
    x = inputs(4)
    logits = x @ w["gate"].t()
    stock = block.topk.forward_native(x, logits)
    out, sel = decode_step(runtime, block, x)
    ids, wts = sel.topk_ids[:, :TOP_K].long(), sel.topk_weights[:, :TOP_K]
    if fused:
        assert torch.equal(sel.topk_ids[:, TOP_K:], stock.topk_ids[:, TOP_K:])
        assert torch.equal(sel.topk_weights[:, TOP_K:], stock.topk_weights[:, TOP_K:])
    stock_ids, stock_w = stock.topk_ids[:, :TOP_K].long(), stock.topk_weights[:, :TOP_K]
    biased = logits.sigmoid() + w["bias"]
    score = logits.sigmoid()

    def own(new_ids):
        s = score.gather(1, new_ids)
        return s / s.sum(-1, keepdim=True)

    check_selection(biased, stock_ids, stock_w, ids, wts, budget, own)
    # the kept set is the reference policy on the biased scores' logits
    ref = select_experts_ref(
        choice_logits(biased), stock_ids, stock_w, runtime.cfg.selection, TOKENS
    )
    assert torch.equal(ids, ref.topk_ids)
    torch.testing.assert_close(out, deepseek_ref(w, x, ids, wts), atol=2e-5, rtol=1e-4)
    stats = runtime.read_counters()["selection"]
    assert stats["distinct_before"] == int(distinct_experts(stock_ids, E))  # shared not counted


@pytest.mark.parametrize("norm", [True, False], ids=["renormalised", "not-renormalised"])
def test_qwen_selection_follows_its_routing(sglang_layers, norm):
    """lynx on Qwen2-MoE's block: softmax choices; a moved choice weighs its probability,
    renormalised only where the model renormalises; the gated shared expert untouched."""
    budget = 0.5
    w = random_weights(5, SHARED_INTER)
    runtime = runtime_for(qwen_config(norm), mode="lynx", budget=budget)
    block = build_qwen(w, runtime, norm)
    x = inputs(5)
    logits = x @ w["gate"].t()
    stock = block.topk.forward_native(x, logits)
    out, sel = decode_step(runtime, block, x)
    p = logits.softmax(-1)

    def own(new_ids):
        q = p.gather(1, new_ids)
        return q / q.sum(-1, keepdim=True) if norm else q

    ids, wts = sel.topk_ids.long(), sel.topk_weights
    check_selection(logits, stock.topk_ids.long(), stock.topk_weights, ids, wts, budget, own)
    torch.testing.assert_close(out, qwen_ref(w, x, ids, wts), atol=2e-5, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
def test_deepseek_cuda_router_and_selection(sglang_layers, fused):
    """On CUDA the block routes through SGLang's fused grouped top-k kernel (the CPU tests use
    its torch-native path): the same choices as the rule by hand, and selection (its Triton
    kernels) follows the model's rule there too."""
    budget = 0.5
    w = random_weights(7, INTER)
    runtime = runtime_for(deepseek_config(), "cuda", mode="lynx", budget=budget)
    block = build_deepseek(w, runtime, fused, device="cuda")
    x = inputs(7).cuda()
    logits = x @ w["gate"].cuda().t()
    _, ids, weights = deepseek_routing(w, x.cpu())
    stock = block.topk(x, logits)
    got_ids, got_w = sort_rows(
        stock.topk_ids[:, :TOP_K].long().cpu(), stock.topk_weights[:, :TOP_K].cpu()
    )
    want_ids, want_w = sort_rows(ids, weights)
    assert torch.equal(got_ids, want_ids)
    torch.testing.assert_close(got_w, want_w, atol=1e-5, rtol=1e-5)
    out, sel = decode_step(runtime, block, x)
    sel_ids, sel_w = sel.topk_ids[:, :TOP_K].long().cpu(), sel.topk_weights[:, :TOP_K].cpu()
    lg = logits.cpu()
    score = lg.sigmoid()

    def own(new_ids):
        s = score.gather(1, new_ids)
        return s / s.sum(-1, keepdim=True)

    check_selection(score + w["bias"], stock.topk_ids[:, :TOP_K].long().cpu(),
                    stock.topk_weights[:, :TOP_K].cpu(), sel_ids, sel_w, budget, own)  # fmt: skip
    expected = deepseek_ref(w, x.cpu(), sel_ids, sel_w)
    torch.testing.assert_close(out.float().cpu(), expected, atol=1e-3, rtol=1e-3)


# ---------------------------------------------------------------------------------------------
# Captured-style steps: the row count on the device, the capture rule
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["offload", "lynx+offload"])
def test_deepseek_captured_steps_are_exact(sglang_layers, mode):
    """A decode step captured at the capture rule's cap, replayed for fewer real rows (the count
    a device tensor): never NaN, exact for the routing it ran; the shared expert, a resident MLP,
    costs no slot (the cap counts routed experts only)."""
    slots = 8
    w = random_weights(6, INTER)
    stock = build_deepseek(w, None)
    runtime = runtime_for(deepseek_config(), mode=mode, budget=0.5, slots=slots, max_experts=slots)
    block = build_deepseek(w, runtime)
    cap = runtime.capture_cap
    assert cap == (slots if mode == "lynx+offload" else slots // TOP_K)
    for seed in range(3):
        x = inputs(20 + seed, cap)
        real = max(1, cap - seed)
        with (
            activated(runtime),
            runtime.scope(runtime.capture_step(cap)),
            kernel_calls(block.experts) as k,
        ):
            runtime.graph_rows.fill_(real)  # what a replay of `real` requests writes
            out = block(x)
        assert not torch.isnan(out).any()
        if runtime.selection is None:
            torch.testing.assert_close(out[:real], stock(x)[:real], atol=2e-5, rtol=1e-4)
            continue
        # the routing the kernel computed, in expert ids: the reference on the biased scores
        logits = x @ w["gate"].t()
        topk = block.topk.forward_native(x, logits)
        biased = logits.sigmoid() + w["bias"]
        ref = select_experts_ref(choice_logits(biased), topk.topk_ids.long(), topk.topk_weights,
                                 runtime.selection, num_valid=torch.tensor(real))  # fmt: skip
        assert int(distinct_experts(ref.topk_ids[:real], E)) <= slots
        assert len(k) == 1  # one wave, device-side
        want_w = torch.where((ref.topk_ids != topk.topk_ids).any(1, keepdim=True),
                             _own_sigmoid(logits, ref.topk_ids),
                             topk.topk_weights)  # fmt: skip
        expected = deepseek_ref(w, x, ref.topk_ids, want_w)
        torch.testing.assert_close(out[:real], expected[:real], atol=2e-5, rtol=1e-4)
    assert runtime.cache.counters()["total"]["overflow"] == 0


def _own_sigmoid(logits, ids):
    s = logits.sigmoid().gather(1, ids.long())
    return s / s.sum(-1, keepdim=True)


# ---------------------------------------------------------------------------------------------
# Start-up facts and checks
# ---------------------------------------------------------------------------------------------


def test_facts_follow_each_family():
    """MoE layers, routed experts and top-k from each family's config fields."""
    from transformers import Qwen3_5MoeConfig, Qwen3NextConfig

    from lynx_sglang.sglang.checks import ServingFacts, problems, with_hf_config

    ds = with_hf_config(ServingFacts(), deepseek_config())
    assert (ds.architecture, ds.num_experts, ds.top_k, ds.moe_layers) == (
        "DeepseekV3ForCausalLM", E, TOP_K, 2)  # fmt: skip
    assert facts(deepseek_config()).moe_layer_ids == (1, 2)
    nxt = Qwen3NextConfig(num_experts=E, num_experts_per_tok=TOP_K, num_hidden_layers=4,
                          architectures=["Qwen3NextForCausalLM"])  # fmt: skip
    assert with_hf_config(ServingFacts(), nxt).moe_layers == 4
    q35 = Qwen3_5MoeConfig(architectures=["Qwen3_5MoeForConditionalGeneration"])
    q35.text_config.num_experts, q35.text_config.num_experts_per_tok = E, TOP_K
    f35 = with_hf_config(ServingFacts(), q35)
    assert (f35.num_experts, f35.top_k) == (E, TOP_K)
    assert f35.moe_layers == q35.text_config.num_hidden_layers
    assert facts(q35).hidden_size == q35.text_config.hidden_size
    cfg = LynxConfig(mode="lynx")
    for fact in (ds, f35, with_hf_config(ServingFacts(), nxt)):
        assert problems(cfg, fact) == []


def test_deepseek_v4_and_unpaged_formats_are_refused_in_one_line():
    from lynx_sglang.sglang.checks import ServingFacts, check

    with pytest.raises(UnsupportedConfig, match="DeepSeek-V4 is not supported"):
        check(LynxConfig(mode="lynx"), ServingFacts(architecture="DeepseekV4ForCausalLM"))
    fp8 = ServingFacts(architecture="DeepseekV3ForCausalLM", quantization="fp8")
    check(LynxConfig(mode="lynx+offload", slots=16), fp8)  # DeepSeek-V3's FP8 release: paged
    int4 = ServingFacts(architecture="DeepseekV3ForCausalLM", quantization="compressed-tensors")
    with pytest.raises(UnsupportedConfig, match=r"compressed-tensors experts \(DeepSeek-V3") as e:
        check(LynxConfig(mode="offload", slots=16), int4)
    assert "\n" not in str(e.value)


def choice_logits(biased):
    """The policy's logits for biased scores: their log, floored just above 0."""
    return biased.clamp(min=torch.finfo(torch.float32).tiny).log()
