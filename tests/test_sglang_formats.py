"""Quantised experts through the offload modes, with SGLang's real quant-method classes creating
the weights and its real loaders filling them: block FP8 (DeepSeek-V3's and Qwen's FP8
checkpoints), per-channel W8A8 FP8, W8A8 int8, SGLang's online FP8 of a bf16 checkpoint and
symmetric GPTQ int4 through moe_wna16.

What runs on CPU (``shared/SGLANG_CPU.md``): creating the weights, loading a checkpoint, the
post-load step; not the methods' fused kernels. So on CPU:
- the host store holds, per expert, exactly the checkpoint's rows (weights and scales), and a
  slot holds exactly its expert's rows after a step;
- with selection off and K >= top-k, a decode step through ``moe_layer_step`` and the cache,
  computed by a dequantising torch kernel on the slots, equals the same kernel on all experts
  resident (the stock layer's own parameters): the cache serves the right rows for every id.
GPU tests (``gpu``) run SGLang's own kernel on the slots against the resident layer.
"""

from __future__ import annotations

import pytest
import torch

from lynx_sglang.config import LynxConfig
from lynx_sglang.moe import fused_moe_ref
from lynx_sglang.offload.quantize import (
    dequantize_block_fp8,
    dequantize_channel,
    quantize_block_fp8,
    quantize_channel,
)

pytest.importorskip("sglang")

from lynx_sglang.sglang.checks import UnsupportedConfig  # noqa: E402
from lynx_sglang.sglang.moe_method import LynxMoEMethod  # noqa: E402
from lynx_sglang.sglang.runtime import LynxRuntime, ModelFacts, activated  # noqa: E402
from lynx_sglang.step import Step, moe_layer_step  # noqa: E402

E, H, INTER, TOP_K = 8, 256, 128, 2  # block FP8 needs I a multiple of 128
TOKENS = 6
PREFIX = "model.layers.0.mlp.experts"


def quant_config(fmt: str):
    from sglang.srt.layers.quantization.fp8 import Fp8Config
    from sglang.srt.layers.quantization.w8a8_fp8 import W8A8Fp8Config
    from sglang.srt.layers.quantization.w8a8_int8 import W8A8Int8Config

    return {
        "fp8-block": lambda: Fp8Config(
            is_checkpoint_fp8_serialized=True, weight_block_size=[128, 128]
        ),
        "w8a8-fp8": lambda: W8A8Fp8Config(is_checkpoint_fp8_serialized=True),
        "w8a8-int8": lambda: W8A8Int8Config({}),
        "fp8-online": lambda: Fp8Config(is_checkpoint_fp8_serialized=False),
    }[fmt]()


SCALE_NAME = {
    "fp8-block": "weight_scale_inv",
    "w8a8-fp8": "weight_scale",
    "w8a8-int8": "weight_scale",
}
FORMATS = list(SCALE_NAME)


def checkpoint(fmt: str, seed: int = 0) -> dict:
    """Per-expert checkpoint tensors {(expert, proj): (weight, scale)} in the format, from random
    bf16-range weights, quantised round-to-nearest."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for e in range(E):
        for proj, shape in (
            ("gate_proj", (INTER, H)),
            ("up_proj", (INTER, H)),
            ("down_proj", (H, INTER)),
        ):
            w = torch.randn(*shape, generator=g) * shape[1] ** -0.5
            if fmt == "fp8-block":
                out[e, proj] = quantize_block_fp8(w)
            else:
                out[e, proj] = quantize_channel(
                    w, torch.int8 if fmt == "w8a8-int8" else torch.float8_e4m3fn
                )
    return out


def load_checkpoint(moe, tensors, prefix: str = PREFIX) -> None:
    """Load a checkpoint the way SGLang's model loaders do: FusedMoE's expert mapping, each
    parameter's own weight_loader, then the post-load step. ``tensors(expert, proj)`` gives
    that shard's {suffix: tensor} (suffix: "weight", "weight_scale_inv", "qweight", ...)."""
    from sglang.srt.layers.moe.fused_moe_triton.layer import FusedMoE

    mapping = FusedMoE.make_expert_params_mapping(
        ckpt_gate_proj_name="gate_proj", ckpt_down_proj_name="down_proj",
        ckpt_up_proj_name="up_proj", num_experts=moe.num_experts,
    )  # fmt: skip
    params = dict(moe.named_parameters())
    for param_prefix, weight_prefix, expert, shard in mapping:
        for suffix, tensor in tensors(expert, weight_prefix.split(".")[-2]).items():
            name = param_prefix.removeprefix("experts.") + suffix
            params[name].weight_loader(params[name], tensor, f"{prefix}.{name}", shard_id=shard,
                                       expert_id=expert)  # fmt: skip
    moe.quant_method.process_weights_after_loading(moe)


def build(fmt: str, runtime: LynxRuntime | None, ckpt: dict):
    """A real FusedMoE with the format's quant config, loaded through SGLang's expert mapping
    and each parameter's own weight_loader, then its post-load step."""
    from sglang.srt.layers.moe.fused_moe_triton.layer import FusedMoE

    with activated(runtime):
        moe = FusedMoE(num_experts=E, hidden_size=H, intermediate_size=INTER, top_k=TOP_K,
                       layer_id=0, params_dtype=torch.bfloat16, quant_config=quant_config(fmt),
                       prefix=PREFIX)  # fmt: skip
    load_checkpoint(
        moe, lambda e, proj: {"weight": ckpt[e, proj][0], SCALE_NAME[fmt]: ckpt[e, proj][1]}
    )
    return moe


def runtime_for(fmt: str, slots: int, mode: str = "offload") -> LynxRuntime:
    facts = ModelFacts(E, TOP_K, H, INTER, (0,), torch.bfloat16, quantization=fmt)
    cfg = LynxConfig(mode=mode, slots=slots, layer_budgets="", miss_budget=0.0, prefetch="off")
    return LynxRuntime(cfg, facts, torch.device("cpu"))


def dequantized(fmt: str, tensors: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(w13 [N, 2I, H], w2 [N, H, I]) float32 from a layer's or the slots' tensors, in SGLang's
    names (``w13_weight``...) or the store's (``w13``...)."""

    def get(name):
        return tensors[name] if name in tensors else tensors[name.removesuffix("_weight")]

    scale = f"_{SCALE_NAME[fmt]}"
    out = []
    for w in ("w13", "w2"):
        q, s = get(f"{w}_weight"), tensors[f"{w}{scale}"]
        out.append(dequantize_block_fp8(q, s) if fmt == "fp8-block" else dequantize_channel(q, s))
    return out[0], out[1]


def dequant_kernel(fmt: str, resident: dict):
    """moe_layer_step's kernel: the experts (the slots, or ``resident`` when None) dequantised,
    then the fused-MoE reference."""

    def kernel(x, ids, weights, experts):
        w13, w2 = dequantized(fmt, experts if experts is not None else resident)
        return fused_moe_ref(x.float(), w13, w2, ids, weights).to(x.dtype)

    return kernel


def routing(seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(TOKENS, H, generator=g).to(torch.bfloat16)
    logits = torch.randn(TOKENS, E, generator=g)
    p = logits.softmax(-1)
    ids = p.topk(TOP_K, -1).indices
    w = p.gather(1, ids)
    return x, ids, w / w.sum(-1, keepdim=True), logits


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


def assert_slots_equal_resident(runtime, moe, stock, dtype=None) -> None:
    """GPU: decode steps of the layer on the slots give bit for bit the stock layer's output
    with every expert resident (same kernel, same config)."""
    from sglang.srt.layers.moe.topk import StandardTopKOutput

    for seed in range(3):
        x, ids, wts, logits = (t.cuda() for t in routing(seed))
        x = x if dtype is None else x.to(dtype)
        topk = StandardTopKOutput(wts, ids.int(), logits)
        want = stock(x, topk)
        with activated(runtime), runtime.scope(runtime.decode_step(TOKENS)):
            got = moe(x, topk)
        assert torch.equal(got, want)


# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_host_store_holds_the_checkpoints_rows(sglang_layers, fmt):
    """Every expert's weights and scales in the host store, byte for byte what the stock layer
    loaded; the GPU holds K slots of the same layout; bytes per expert count the scales."""
    ckpt = checkpoint(fmt)
    stock = build(fmt, None, ckpt)
    runtime = runtime_for(fmt, slots=4)
    moe = build(fmt, runtime, ckpt)
    assert isinstance(moe.quant_method, LynxMoEMethod)
    store = runtime.cache.store
    stock_params = dict(stock.named_parameters())
    names = {"w13": "w13_weight", "w2": "w2_weight"}
    assert {names.get(s.name, s.name) for s in store.segments} == set(stock_params)
    for seg in store.segments:
        host = store.tensor(0, seg.name)
        want = stock_params[names.get(seg.name, seg.name)].data
        assert host.dtype == want.dtype and torch.equal(as_bytes(host), as_bytes(want))
        assert getattr(moe, names.get(seg.name, seg.name)).shape == (4, *want.shape[1:])
    assert store.nbytes_per_expert == sum(
        p[0].numel() * p.element_size() for p in stock_params.values()
    )


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("slots", [TOP_K, 4, E])
def test_offload_serves_the_right_rows(sglang_layers, fmt, slots):
    """K >= top-k: each decode step through the cache equals all experts resident, also when a
    step needs more experts than K (waves); each slot holds its expert's bytes."""
    ckpt = checkpoint(fmt, 1)
    stock = build(fmt, None, ckpt)
    runtime = runtime_for(fmt, slots)
    build(fmt, runtime, ckpt)
    cache, store = runtime.cache, runtime.cache.store
    resident = dict(stock.named_parameters())
    for seed in range(4):
        x, ids, w, logits = routing(seed)
        step = Step(decode=True, num_valid=TOKENS)
        out = moe_layer_step(0, x, ids, w, logits, dequant_kernel(fmt, {}), step=step, cache=cache)
        want = dequant_kernel(fmt, resident)(x, ids, w, None)
        torch.testing.assert_close(out.float(), want.float(), atol=1e-2, rtol=1e-2)
        for slot, expert in enumerate(cache.slots.slot_expert[0]):
            if expert >= 0:
                for seg in store.segments:
                    got = cache.slot_weights(0)[seg.name][slot]
                    assert torch.equal(as_bytes(got), as_bytes(store.tensor(0, seg.name)[expert]))
    counters = cache.counters()["total"]
    assert counters["bytes_h2d"] == counters["misses"] * store.nbytes_per_expert


@pytest.mark.parametrize("fmt", FORMATS)
def test_captured_steps_gather_quantised_rows(sglang_layers, fmt):
    """Captured-style decode steps (the row count a device tensor, the device-side executor and
    its gather) on quantised rows: exact for the real rows, never NaN, within the capture cap."""
    ckpt = checkpoint(fmt, 3)
    stock = build(fmt, None, ckpt)
    runtime = runtime_for(fmt, slots=4)
    build(fmt, runtime, ckpt)
    cap = runtime.capture_cap
    assert cap == 4 // TOP_K
    resident = dict(stock.named_parameters())
    for seed in range(4):
        x, ids, w, logits = routing(10 + seed)
        x, ids, w, logits = x[:cap], ids[:cap], w[:cap], logits[:cap]
        step = runtime.capture_step(cap)
        runtime.graph_rows.fill_(cap - seed % 2)  # what a replay of that many requests writes
        out = moe_layer_step(0, x, ids, w, logits, dequant_kernel(fmt, {}), step=step,
                             cache=runtime.cache)  # fmt: skip
        real = cap - seed % 2
        assert not torch.isnan(out).any()
        want = dequant_kernel(fmt, resident)(x, ids, w, None)
        torch.testing.assert_close(out[:real].float(), want[:real].float(), atol=1e-2, rtol=1e-2)
    assert runtime.cache.counters()["total"]["overflow"] == 0


def test_lynx_mode_hands_the_selection_to_the_formats_own_kernel(sglang_layers):
    """lynx alone on a block-FP8 layer: our method wraps SGLang's Fp8MoEMethod and hands its
    apply the selected ids and weights; the experts stay the layer's own FP8 parameters. (The
    FP8 kernel has no CPU driver: its call is recorded here and answered by the dequantising
    reference; the gpu test below runs the kernel itself.)"""
    from lynx_sglang.selection import distinct_experts, select_experts_ref

    fmt, tokens = "fp8-block", 4
    ckpt = checkpoint(fmt, 4)
    facts = ModelFacts(E, TOP_K, H, INTER, (0,), torch.bfloat16, quantization="fp8")
    runtime = LynxRuntime(LynxConfig(mode="lynx", budget=0.5, layer_budgets=""), facts,
                          torch.device("cpu"))  # fmt: skip
    moe = build(fmt, runtime, ckpt)
    base = moe.quant_method.base_method
    assert type(base).__name__ == "Fp8MoEMethod" and moe.w13_weight.shape[0] == E
    calls = []

    def kernel(layer, dispatch_output):
        from sglang.srt.layers.moe.token_dispatcher import StandardCombineInput

        t = dispatch_output.topk_output
        calls.append(t)
        x = dispatch_output.hidden_states
        out = dequant_kernel(fmt, dict(layer.named_parameters()))(
            x, t.topk_ids, t.topk_weights, None
        )
        return StandardCombineInput(hidden_states=out)

    base.apply = kernel
    from sglang.srt.layers.moe.topk import StandardTopKOutput

    g = torch.Generator().manual_seed(9)
    x = torch.randn(tokens, H, generator=g).to(torch.bfloat16)
    logits = torch.randn(tokens, E, generator=g) * 2
    p = logits.softmax(-1)
    ids = p.topk(TOP_K, -1).indices
    w = p.gather(1, ids) / p.gather(1, ids).sum(-1, keepdim=True)
    with activated(runtime), runtime.scope(runtime.decode_step(tokens)):
        out = moe(x, StandardTopKOutput(w, ids, logits))
    (sel,) = calls
    ref = select_experts_ref(logits, ids, w, runtime.cfg.selection, num_valid=tokens)
    assert torch.equal(sel.topk_ids, ref.topk_ids)
    assert distinct_experts(ref.topk_ids, E) < distinct_experts(ids, E)
    want = dequant_kernel(fmt, dict(moe.named_parameters()))(
        x, ref.topk_ids, ref.topk_weights, None
    )
    torch.testing.assert_close(out, want)


def test_marlin_is_refused_in_one_line(sglang_layers):
    """GPTQ's Marlin repacks the experts after loading into a layout the host rows do not
    replicate: refused when its first layer is built, naming what the cache pages."""
    from sglang.srt.layers.moe.fused_moe_triton.layer import FusedMoE
    from sglang.srt.layers.quantization.gptq import GPTQMarlinConfig

    gptq = GPTQMarlinConfig(weight_bits=4, group_size=128, desc_act=False, is_sym=True,
                            lm_head_quantized=False, dynamic={}, full_config={})  # fmt: skip
    runtime = runtime_for("gptq_marlin", slots=4)
    with activated(runtime), pytest.raises(UnsupportedConfig, match="GPTQMarlinMoEMethod") as err:
        FusedMoE(num_experts=E, hidden_size=H, intermediate_size=INTER, top_k=TOP_K,
                 layer_id=0, params_dtype=torch.bfloat16, quant_config=gptq, prefix=PREFIX)  # fmt: skip
    assert "\n" not in str(err.value) and "pages bf16/fp16, FP8" in str(err.value)
    assert "online FP8" in str(err.value)  # the supported list names it


# ---------------------------------------------------------------------------------------------
# SGLang's online FP8 (--quantization fp8 of a bf16 checkpoint)
# ---------------------------------------------------------------------------------------------


def per_tensor_fp8(x: torch.Tensor, scale=None, **_):
    """SGLang's dynamic per-tensor FP8 quantiser (``scaled_fp8_quant``: absmax / 448, then
    x / scale in e4m3) in torch: its CUDA kernel has no CPU build."""
    from sglang.srt.layers.quantization.fp8 import fp8_dtype

    top = torch.finfo(fp8_dtype).max
    if scale is None:
        scale = (x.float().abs().max() / top).reshape(1)
    return (x.float() / scale).clamp(-top, top).to(fp8_dtype), scale


def build_online(runtime, w: dict, order=None):
    """A bf16 FusedMoE under SGLang's online FP8 config, loaded shard by shard from ``w`` (in
    ``order``, default the checkpoint's), then its post-load step."""
    from sglang.srt.layers.moe.fused_moe_triton.layer import FusedMoE

    with activated(runtime):
        moe = FusedMoE(num_experts=E, hidden_size=H, intermediate_size=INTER, top_k=TOP_K,
                       layer_id=0, params_dtype=torch.bfloat16,
                       quant_config=quant_config("fp8-online"), prefix=PREFIX)  # fmt: skip
    for e, shard in order or list(w):
        name = "w2_weight" if shard == "w2" else "w13_weight"
        param = getattr(moe, name)
        param.weight_loader(param, w[e, shard], f"{PREFIX}.{name}", shard_id=shard, expert_id=e)
    moe.quant_method.process_weights_after_loading(moe)
    return moe


def online_fp8(fmt_tensors: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(w13, w2) float32 of an online-FP8 layer's or store's tensors: q * its per-expert scale."""
    out = []
    for w in ("w13", "w2"):
        q = fmt_tensors.get(f"{w}_weight", fmt_tensors.get(w))
        out.append(q.float() * fmt_tensors[f"{w}_weight_scale"].float()[:, None, None])
    return out[0], out[1]


def online_kernel(resident: dict):
    def kernel(x, ids, weights, experts):
        w13, w2 = online_fp8(experts if experts is not None else resident)
        return fused_moe_ref(x.float(), w13, w2, ids, weights).to(x.dtype)

    return kernel


@pytest.mark.parametrize("slots", [TOP_K, 4])
def test_online_fp8_pages_what_sglangs_post_load_makes(sglang_layers, monkeypatch, slots):
    """--quantization fp8 of a bf16 checkpoint: the host store holds, per expert, the FP8
    weights and per-tensor scales SGLang's own post-load step makes on the stock layer, byte
    for byte, whatever order the shards arrive in (gate and up of one expert apart); the
    slots are the layer's parameters; steps through the cache equal all experts resident."""
    from sglang.srt.layers.quantization import fp8

    monkeypatch.setattr(fp8, "scaled_fp8_quant", per_tensor_fp8)
    w = bf16_experts(7)
    stock = build_online(None, w)
    stock_params = dict(stock.named_parameters())
    assert stock.w13_weight.dtype == fp8.fp8_dtype and stock.w13_weight_scale.shape == (E,)
    runtime = runtime_for("fp8", slots)
    order = sorted(w, key=lambda k: (k[1] != "w1", -k[0]))  # every gate first, experts reversed
    moe = build_online(runtime, w, order)
    store = runtime.cache.store
    names = {"w13": "w13_weight", "w2": "w2_weight"}
    assert {names.get(n, n) for n in store.names} == set(stock_params)
    for seg in store.segments:
        want = stock_params[names.get(seg.name, seg.name)].data
        assert torch.equal(as_bytes(store.tensor(0, seg.name)), as_bytes(want)), seg.name
        param = getattr(moe, names.get(seg.name, seg.name))
        assert param.shape == (slots, *want.shape[1:]) and param.dtype == want.dtype
        assert param.data_ptr() == runtime.cache.slot_weights(0)[seg.name].data_ptr()
    assert store.nbytes_per_expert == 3 * H * INTER + 2 * 4  # half of bf16, two scales
    resident = {n: p.data for n, p in stock_params.items()}
    for seed in range(4):
        x, ids, wts, logits = routing(seed)
        step = Step(decode=True, num_valid=TOKENS)
        out = moe_layer_step(0, x, ids, wts, logits, online_kernel({}), step=step,
                             cache=runtime.cache)  # fmt: skip
        want = online_kernel(resident)(x, ids, wts, None)
        torch.testing.assert_close(out.float(), want.float(), atol=1e-2, rtol=1e-2)


@pytest.mark.gpu
def test_online_fp8_kernel_on_slots_equals_resident(sglang_layers):
    """On the GPU, SGLang's own quantiser and FP8 kernel: the slots give bit for bit what the
    stock online-FP8 layer gives with every expert resident."""

    w = {k: t.cuda() for k, t in bf16_experts(9).items()}
    with torch.device("cuda"):
        stock = build_online(None, w)
        cfg = LynxConfig(mode="offload", slots=4, layer_budgets="", miss_budget=0.0,
                         prefetch="off", executor="eager")  # fmt: skip
        runtime = LynxRuntime(cfg, ModelFacts(E, TOP_K, H, INTER, (0,), torch.bfloat16, "fp8"),
                              torch.device("cuda"))  # fmt: skip
        moe = build_online(runtime, w)
    assert_slots_equal_resident(runtime, moe, stock)


def test_online_fp8_with_a_shard_missing_fails_at_load(sglang_layers, monkeypatch):
    """An expert whose up projection never arrived is not served half-quantised."""
    from sglang.srt.layers.quantization import fp8

    monkeypatch.setattr(fp8, "scaled_fp8_quant", per_tensor_fp8)
    w = bf16_experts(8)
    order = [k for k in w if k != (5, "w3")]
    with pytest.raises(RuntimeError, match="expert 5's w13_weight was loaded only in part"):
        build_online(runtime_for("fp8", 4), w, order)


def test_a_post_load_transform_is_refused(sglang_layers, monkeypatch):
    """A base method whose post-load step changes the experts (as a kernel-specific shuffle
    would) cannot be paged row by row: refused, not served wrong."""
    from sglang.srt.layers.quantization.w8a8_int8 import W8A8Int8MoEMethod

    original = W8A8Int8MoEMethod.process_weights_after_loading

    def shuffle(self, layer):
        original(self, layer)
        layer.w2_weight.data.copy_(layer.w2_weight.data.flip(-1))

    monkeypatch.setattr(W8A8Int8MoEMethod, "process_weights_after_loading", shuffle)
    with pytest.raises(UnsupportedConfig, match="transforms w2_weight after loading"):
        build("w8a8-int8", runtime_for("w8a8_int8", slots=4), checkpoint("w8a8-int8"))


# ---------------------------------------------------------------------------------------------
# GPU: SGLang's own kernels on the slots
# ---------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", FORMATS)
def test_sglangs_kernel_on_slots_equals_resident(sglang_layers, fmt):
    """The format's own fused kernel on K slots gives bit for bit what it gives on the layer
    with every expert resident (same kernel config)."""

    ckpt = checkpoint(fmt, 2)
    with torch.device("cuda"):
        stock = build(fmt, None, ckpt)
        facts = ModelFacts(E, TOP_K, H, INTER, (0,), torch.bfloat16, quantization=fmt)
        cfg = LynxConfig(mode="offload", slots=4, layer_budgets="", miss_budget=0.0,
                         prefetch="off", executor="eager")  # fmt: skip
        runtime = LynxRuntime(cfg, facts, torch.device("cuda"))
        moe = build(fmt, runtime, ckpt)
    assert_slots_equal_resident(runtime, moe, stock)


# ---------------------------------------------------------------------------------------------
# Slots sized by GPU memory
# ---------------------------------------------------------------------------------------------


def test_slot_memory_buys_more_slots_in_a_smaller_format(sglang_layers):
    """--lynx-slot-memory-gib: the same GiB buys about twice the slots in FP8 as in bf16 (the
    scales counted); K follows from the first layer's format, and so does the capture cap."""
    bf16_bytes = 3 * H * INTER * 2
    gib = 4 * bf16_bytes / 2**30  # four bf16 experts' worth, for one MoE layer
    dense = LynxRuntime(
        LynxConfig(mode="offload", slot_memory_gib=gib, prefetch="off"),
        ModelFacts(E, TOP_K, H, INTER, (0,), torch.bfloat16),
        torch.device("cpu"),
    )
    assert dense.slots == 4 and dense.cache.num_slots == 4 and dense.capture_cap == 4 // TOP_K
    fp8 = runtime_for("fp8", slots=0)
    runtime = LynxRuntime(fp8.cfg.replace(slot_memory_gib=gib), fp8.model, torch.device("cpu"))
    assert runtime.slots is None and runtime.cache is None  # the format decides
    moe = build("fp8-block", runtime, checkpoint("fp8-block"))
    per_expert = runtime.cache.store.nbytes_per_expert  # 1 B a weight plus the block scales
    assert per_expert == 3 * H * INTER + 4 * (2 * 2 + 2 * 1)
    assert runtime.slots == int(gib * 2**30 // per_expert) == 7  # not 8: the scales
    assert moe.w13_weight.shape[0] == 7 and runtime.capture_cap == 7 // TOP_K


def test_slot_memory_below_top_k_is_refused_in_one_line(sglang_layers):
    facts = ModelFacts(E, TOP_K, H, INTER, (0,), torch.bfloat16)
    with pytest.raises(UnsupportedConfig, match="buys 1 slots per MoE layer") as err:
        LynxRuntime(LynxConfig(mode="offload", slot_memory_gib=1.5 * 3 * H * INTER * 2 / 2**30),
                    facts, torch.device("cpu"))  # fmt: skip
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------------------------------------
# Transfer-time quantisation of a bf16 checkpoint
# ---------------------------------------------------------------------------------------------


def test_bf16_checkpoint_paged_as_block_fp8(sglang_layers):
    """--lynx-expert-format fp8: a bf16 checkpoint's experts are quantised once on the way into
    the host store, each shard as an FP8 checkpoint ships it (gate, up and down on their own),
    with SGLang's block-FP8 method over the slots; half the bytes per copy, scales included."""
    from sglang.srt.layers.quantization.fp8 import Fp8MoEMethod

    w = bf16_experts(5)
    runtime, moe = build_converted(w, "cpu")
    assert isinstance(moe.quant_method.base_method, Fp8MoEMethod)
    store = runtime.cache.store
    assert store.nbytes_per_expert == 3 * H * INTER + 4 * (2 * 2 + 2 * 1)  # vs 196,608 in bf16
    for e in range(E):
        q1, s1 = quantize_block_fp8(w[e, "w1"])
        q3, s3 = quantize_block_fp8(w[e, "w3"])
        q2, s2 = quantize_block_fp8(w[e, "w2"])
        assert torch.equal(as_bytes(store.tensor(0, "w13")[e]), as_bytes(torch.cat([q1, q3])))
        assert torch.equal(store.tensor(0, "w13_weight_scale_inv")[e], torch.cat([s1, s3]))
        assert torch.equal(as_bytes(store.tensor(0, "w2")[e]), as_bytes(q2))
        assert torch.equal(store.tensor(0, "w2_weight_scale_inv")[e], s2)
        back = dequantize_block_fp8(
            store.tensor(0, "w2")[e], store.tensor(0, "w2_weight_scale_inv")[e]
        )
        rel = (back - w[e, "w2"].float()).norm() / w[e, "w2"].float().norm()
        assert rel < 0.05  # e4m3 round to nearest
    host = {seg.name: store.tensor(0, seg.name) for seg in store.segments}
    for seed in range(3):
        x, ids, wts, logits = routing(seed)
        step = Step(decode=True, num_valid=TOKENS)
        out = moe_layer_step(0, x, ids, wts, logits, dequant_kernel("fp8-block", {}), step=step,
                             cache=runtime.cache)  # fmt: skip
        want = dequant_kernel("fp8-block", host)(x, ids, wts, None)
        torch.testing.assert_close(out.float(), want.float(), atol=1e-2, rtol=1e-2)


def bf16_experts(seed: int) -> dict:
    """{(expert, shard): bf16 weight}, shards w1 (gate), w3 (up), w2 (down)."""
    g = torch.Generator().manual_seed(seed)
    return {(e, proj): (torch.randn(*shape, generator=g) * shape[1] ** -0.5).to(torch.bfloat16)
            for e in range(E)
            for proj, shape in (("w1", (INTER, H)), ("w3", (INTER, H)), ("w2", (H, INTER)))}  # fmt: skip


def build_converted(w: dict, device: str, fmt: str = "fp8"):
    """A bf16 FusedMoE under offload with --lynx-expert-format ``fmt``, loaded from ``w``."""
    from sglang.srt.layers.moe.fused_moe_triton.layer import FusedMoE

    facts = ModelFacts(E, TOP_K, H, INTER, (0,), torch.bfloat16)
    cfg = LynxConfig(mode="offload", slots=4, expert_format=fmt, layer_budgets="",
                     miss_budget=0.0, prefetch="off", executor="eager")  # fmt: skip
    runtime = LynxRuntime(cfg, facts, torch.device(device))
    assert runtime.cache is None  # the layout is the format's, stated by the first layer
    with activated(runtime), torch.device(device):
        moe = FusedMoE(num_experts=E, hidden_size=H, intermediate_size=INTER, top_k=TOP_K,
                       layer_id=0, params_dtype=torch.bfloat16, prefix=PREFIX)  # fmt: skip
    for (e, shard), t in w.items():
        name = "w2_weight" if shard == "w2" else "w13_weight"
        param = getattr(moe, name)
        param.weight_loader(param, t, f"{PREFIX}.{name}", shard_id=shard, expert_id=e)
    moe.quant_method.process_weights_after_loading(moe)
    return runtime, moe


@pytest.mark.gpu
def test_converted_fp8_runs_sglangs_kernel_like_an_fp8_checkpoint(sglang_layers):
    """On the GPU: the bf16 checkpoint paged as FP8 computes bit for bit what SGLang's block-FP8
    layer computes on the same weights shipped as an FP8 checkpoint, all resident."""

    w = bf16_experts(6)
    names = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
    ckpt = {(e, names[shard]): quantize_block_fp8(t) for (e, shard), t in w.items()}
    with torch.device("cuda"):
        stock = build("fp8-block", None, ckpt)
    runtime, moe = build_converted(w, "cuda")
    assert_slots_equal_resident(runtime, moe, stock)


def test_expert_format_needs_offload_and_a_bf16_checkpoint():
    from lynx_sglang.sglang.checks import ServingFacts, check

    with pytest.raises(UnsupportedConfig, match="needs --lynx-mode offload or lynx\\+offload"):
        check(LynxConfig(mode="lynx", expert_format="fp8"), ServingFacts())
    with pytest.raises(UnsupportedConfig, match="this one is already fp8"):
        check(LynxConfig(mode="offload", expert_format="fp8"), ServingFacts(quantization="fp8"))


@pytest.mark.gpu
def test_lynx_mode_on_fp8_runs_sglangs_kernel_on_the_selection(sglang_layers):
    """On the GPU: lynx on a block-FP8 layer computes bit for bit what the stock FP8 layer
    computes on the reference policy's ids and weights."""
    from sglang.srt.layers.moe.topk import StandardTopKOutput

    from lynx_sglang.selection import select_experts_ref

    fmt, tokens = "fp8-block", 4
    ckpt = checkpoint(fmt, 4)
    facts = ModelFacts(E, TOP_K, H, INTER, (0,), torch.bfloat16, quantization="fp8")
    runtime = LynxRuntime(LynxConfig(mode="lynx", budget=0.5, layer_budgets=""), facts,
                          torch.device("cuda"))  # fmt: skip
    with torch.device("cuda"):
        stock = build(fmt, None, ckpt)
        moe = build(fmt, runtime, ckpt)
    g = torch.Generator().manual_seed(9)
    x = torch.randn(tokens, H, generator=g).to(torch.bfloat16).cuda()
    logits = (torch.randn(tokens, E, generator=g) * 2).cuda()
    p = logits.softmax(-1)
    ids = p.topk(TOP_K, -1).indices
    w = p.gather(1, ids) / p.gather(1, ids).sum(-1, keepdim=True)
    with activated(runtime), runtime.scope(runtime.decode_step(tokens)):
        out = moe(x, StandardTopKOutput(w, ids.int(), logits))
    ref = select_experts_ref(logits, ids, w, runtime.cfg.selection, num_valid=tokens)
    want = stock(x, StandardTopKOutput(ref.topk_weights, ref.topk_ids.int(), logits))
    assert torch.equal(out, want)


# ---------------------------------------------------------------------------------------------
# A block-FP8 copy of the shipped model (bench/quantize_model.py)
# ---------------------------------------------------------------------------------------------


def test_fp8_copy_of_the_shipped_model_pages_through_sglangs_fp8_loaders(sglang_layers, tmp_path):
    """The copy is an FP8 checkpoint as Qwen ships them (quantization_config with
    weight_block_size, weight_scale_inv beside each expert weight); SGLang's Fp8Config reads it,
    and its experts page through the FP8 MoE loaders into the host store, byte for byte."""
    import json

    from safetensors.torch import load_file
    from sglang.srt.layers.moe.fused_moe_triton.layer import FusedMoE
    from sglang.srt.layers.quantization.fp8 import Fp8Config

    from bench.quantize_model import quantize_model
    from lynx_sglang import SHIPPED_MODEL

    report = quantize_model(SHIPPED_MODEL, tmp_path)
    hf = json.loads((tmp_path / "config.json").read_text())
    qc = Fp8Config.from_config(hf["quantization_config"])
    assert qc.weight_block_size == [128, 128] and qc.is_checkpoint_fp8_serialized
    files = load_file(str(tmp_path / "model.safetensors"))
    original = load_file(str(SHIPPED_MODEL / "model.safetensors"))
    E, k, H, inter = (
        hf["num_experts"],
        hf["num_experts_per_tok"],
        hf["hidden_size"],
        hf["moe_intermediate_size"],
    )
    assert report["expert_tensors"] == 3 * E * hf["num_hidden_layers"]
    assert report["expert_bytes_after"] < 0.52 * report["expert_bytes_before"]
    facts = ModelFacts(E, k, H, inter, (0,), torch.bfloat16, quantization="fp8")
    cfg = LynxConfig(mode="offload", slots=16, layer_budgets="", miss_budget=0.0, prefetch="off")
    runtime = LynxRuntime(cfg, facts, torch.device("cpu"))
    prefix = "model.layers.0.mlp.experts"
    with activated(runtime):
        moe = FusedMoE(num_experts=E, hidden_size=H, intermediate_size=inter, top_k=k, layer_id=0,
                       params_dtype=torch.bfloat16, quant_config=qc, prefix=prefix)  # fmt: skip
    load_checkpoint(
        moe,
        lambda e, proj: {suffix: files[f"{prefix.removesuffix('experts')}experts.{e}.{proj}.{suffix}"]
                         for suffix in ("weight", "weight_scale_inv")},
        prefix,
    )  # fmt: skip
    store = runtime.cache.store
    for e in (0, E // 2, E - 1):
        ckpt = f"model.layers.0.mlp.experts.{e}."
        gate_up = torch.cat([files[ckpt + "gate_proj.weight"], files[ckpt + "up_proj.weight"]])
        assert torch.equal(as_bytes(store.tensor(0, "w13")[e]), as_bytes(gate_up))
        assert torch.equal(
            store.tensor(0, "w2_weight_scale_inv")[e], files[ckpt + "down_proj.weight_scale_inv"]
        )
        back = dequantize_block_fp8(
            store.tensor(0, "w2")[e], store.tensor(0, "w2_weight_scale_inv")[e]
        )
        want = original[ckpt + "down_proj.weight"].float()
        assert (back - want).norm() / want.norm() < 0.05


# ---------------------------------------------------------------------------------------------
# Symmetric GPTQ int4 through SGLang's triton w4a16 path (--quantization moe_wna16)
# ---------------------------------------------------------------------------------------------

GROUP = 64


def gptq_checkpoint(seed: int) -> dict:
    """{(expert, proj): {suffix: tensor}} in GPTQ's layout (qweight int32 [K/8, N], scales fp16
    [K/g, N], qzeros, g_idx), random 4-bit values and scales."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for e in range(E):
        for proj, (N, K) in (
            ("gate_proj", (INTER, H)),
            ("up_proj", (INTER, H)),
            ("down_proj", (H, INTER)),
        ):
            out[e, proj] = {
                "qweight": torch.randint(
                    -(2**31), 2**31 - 1, (K // 8, N), dtype=torch.int32, generator=g
                ),
                "scales": (torch.rand(K // GROUP, N, generator=g) * 0.02).half(),
                "qzeros": torch.full((K // GROUP, N // 8), 0x77777777, dtype=torch.int32),
                "g_idx": torch.arange(K, dtype=torch.int32) // GROUP,
            }
    return out


def build_wna16(runtime: LynxRuntime | None, ckpt: dict):
    from sglang.srt.layers.moe.fused_moe_triton.layer import FusedMoE
    from sglang.srt.layers.quantization.moe_wna16 import MoeWNA16Config
    from sglang.srt.runtime_context import get_parallel

    get_parallel().tp_group.device = torch.device("cpu")  # the test groups carry no device
    qc = MoeWNA16Config.from_config({"quant_method": "gptq", "bits": 4, "group_size": GROUP,
                                     "sym": True, "desc_act": False, "lm_head": False})  # fmt: skip
    with activated(runtime):
        moe = FusedMoE(num_experts=E, hidden_size=H, intermediate_size=INTER, top_k=TOP_K,
                       layer_id=0, params_dtype=torch.float16, quant_config=qc, prefix=PREFIX)  # fmt: skip
    load_checkpoint(moe, lambda e, proj: ckpt[e, proj])
    return moe


def wna16_dequant(tensors: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(w13, w2) float32 from moe_wna16's layout: qweight uint8 [N, K/2], the low nibble the
    even k, symmetric (value - 8) * scale of its group."""

    def one(q, s):
        nib = torch.stack([q & 0xF, q >> 4], -1).flatten(-2).float() - 8.0  # [.., N, K]
        return nib * s.float().repeat_interleave(GROUP, -1)

    def get(name):
        return (
            tensors[name]
            if name in tensors
            else tensors[{"w13_qweight": "w13", "w2_qweight": "w2"}.get(name, name)]
        )

    return one(get("w13_qweight"), get("w13_scales")), one(get("w2_qweight"), get("w2_scales"))


def test_symmetric_gptq_int4_pages_through_moe_wna16(sglang_layers):
    """A symmetric GPTQ int4 checkpoint under --quantization moe_wna16 (SGLang's triton w4a16
    path, converted to its layout by its own loader, nothing repacked after): the host store
    holds the stock layer's rows byte for byte (4 bits a weight plus fp16 group scales), and the
    cache serves the right rows."""
    ckpt = gptq_checkpoint(7)
    stock = build_wna16(None, ckpt)
    facts = ModelFacts(E, TOP_K, H, INTER, (0,), torch.float16, quantization="moe_wna16")
    cfg = LynxConfig(mode="offload", slots=4, layer_budgets="", miss_budget=0.0, prefetch="off")
    runtime = LynxRuntime(cfg, facts, torch.device("cpu"))
    moe = build_wna16(runtime, ckpt)
    store = runtime.cache.store
    assert {s.name for s in store.segments} == {
        "w13_qweight",
        "w2_qweight",
        "w13_scales",
        "w2_scales",
    }
    for seg in store.segments:
        assert torch.equal(store.tensor(0, seg.name), getattr(stock, seg.name).data)
    assert store.nbytes_per_expert == 3 * H * INTER // 2 + 2 * 3 * H * INTER // GROUP  # 0.27x bf16
    assert moe.w13_qweight.shape[0] == 4 and moe.w13_g_idx.numel() == 0
    resident = dict(stock.named_parameters())

    def kernel(x, ids, weights, experts):
        w13, w2 = wna16_dequant(experts if experts is not None else resident)
        return fused_moe_ref(x.float(), w13, w2, ids, weights).to(x.dtype)

    for seed in range(3):
        x, ids, w, logits = routing(seed)
        out = moe_layer_step(0, x, ids, w, logits, kernel, step=Step(decode=True, num_valid=TOKENS),
                             cache=runtime.cache)  # fmt: skip
        torch.testing.assert_close(
            out.float(), kernel(x, ids, w, None).float(), atol=1e-2, rtol=1e-2
        )


def test_asymmetric_gptq_is_refused_in_one_line(sglang_layers):
    from sglang.srt.layers.moe.fused_moe_triton.layer import FusedMoE
    from sglang.srt.layers.quantization.moe_wna16 import MoeWNA16Config

    qc = MoeWNA16Config.from_config({"quant_method": "gptq", "bits": 4, "group_size": GROUP,
                                     "sym": False, "desc_act": False, "lm_head": False})  # fmt: skip
    runtime = runtime_for("moe_wna16", slots=4)
    with activated(runtime), pytest.raises(UnsupportedConfig, match="zero points") as err:
        FusedMoE(num_experts=E, hidden_size=H, intermediate_size=INTER, top_k=TOP_K, layer_id=0,
                 params_dtype=torch.float16, quant_config=qc, prefix=PREFIX)  # fmt: skip
    assert "\n" not in str(err.value)


@pytest.mark.gpu
def test_moe_wna16_kernel_on_slots_equals_resident(sglang_layers):
    """On the GPU: SGLang's triton w4a16 kernel on K slots, bit for bit its output with every
    expert resident."""
    from sglang.srt.runtime_context import get_parallel

    ckpt = gptq_checkpoint(8)
    with torch.device("cuda"):
        stock = build_wna16(None, ckpt)
        facts = ModelFacts(E, TOP_K, H, INTER, (0,), torch.float16, quantization="moe_wna16")
        cfg = LynxConfig(mode="offload", slots=4, layer_budgets="", miss_budget=0.0,
                         prefetch="off", executor="eager")  # fmt: skip
        runtime = LynxRuntime(cfg, facts, torch.device("cuda"))
        moe = build_wna16(runtime, ckpt)
    get_parallel().tp_group.device = torch.device("cuda")
    assert_slots_equal_resident(runtime, moe, stock, torch.half)


# ---------------------------------------------------------------------------------------------
# --lynx-expert-format int4: a bf16 checkpoint through SGLang's triton w4a16 method
# ---------------------------------------------------------------------------------------------


def as_gptq(q: torch.Tensor, scale: torch.Tensor) -> dict:
    """int4 values q [N, K] in [-7, 7] and scales [N, K/g] as a symmetric GPTQ checkpoint ships
    them: qweight int32 [K/8, N] (value + 8, eight along K a word, the first lowest), scales
    [K/g, N]."""
    u = (q.long() + 8).T  # [K, N]
    word = sum(u[i::8] << (4 * i) for i in range(8))  # [K/8, N], 0 .. 2^32 - 1
    qweight = torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)
    K, N = u.shape
    return {"qweight": qweight, "scales": scale.T.contiguous(),
            "qzeros": torch.full((K // GROUP, N // 8), 0x77777777, dtype=torch.int32),
            "g_idx": torch.arange(K, dtype=torch.int32) // GROUP}  # fmt: skip


def test_bf16_checkpoint_paged_as_int4(sglang_layers):
    """--lynx-expert-format int4: each bf16 shard is quantised once on its way into the host
    store (symmetric int4, one bf16 scale per 64 weights, no clipping), and the rows are byte
    for byte what SGLang's stock moe_wna16 layer loads from the same values shipped as a
    symmetric GPTQ checkpoint; 0.27x the bf16 bytes; steps through the cache equal the
    dequantised experts all resident."""
    from sglang.srt.layers.moe.fused_moe_triton.layer import FusedMoE
    from sglang.srt.layers.quantization.moe_wna16 import MoeWNA16Config, MoeWNA16Method
    from sglang.srt.runtime_context import get_parallel

    from lynx_sglang.offload.quantize import bytes_per_expert, quantize_group_int
    from lynx_sglang.sglang.moe_method import INT4_CONFIG

    get_parallel().tp_group.device = torch.device("cpu")  # the test groups carry no device
    w = bf16_experts(11)
    runtime, moe = build_converted(w, "cpu", "int4")
    assert isinstance(moe.quant_method.base_method, MoeWNA16Method)
    store = runtime.cache.store
    assert set(store.names) == {"w13_qweight", "w2_qweight", "w13_scales", "w2_scales"}
    assert store.nbytes_per_expert == bytes_per_expert("int4", H, INTER)  # 0.266x bf16
    names = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
    quantised = {k: quantize_group_int(t, 4, GROUP, scale_dtype=torch.bfloat16)
                 for k, t in w.items()}  # fmt: skip
    ckpt = {(e, names[shard]): as_gptq(*qs) for (e, shard), qs in quantised.items()}
    with activated(None):
        stock = FusedMoE(num_experts=E, hidden_size=H, intermediate_size=INTER, top_k=TOP_K,
                         layer_id=0, params_dtype=torch.bfloat16,
                         quant_config=MoeWNA16Config.from_config(INT4_CONFIG), prefix=PREFIX)  # fmt: skip
    load_checkpoint(stock, lambda e, proj: ckpt[e, proj])
    for seg in store.segments:
        assert torch.equal(store.tensor(0, seg.name), getattr(stock, seg.name).data), seg.name
    w13, w2 = wna16_dequant({s.name: store.tensor(0, s.name) for s in store.segments})
    for e in range(E):
        full = torch.cat([w[e, "w1"], w[e, "w3"]]).float()
        step = store.tensor(0, "w13_scales")[e].float().repeat_interleave(GROUP, -1)
        assert ((w13[e] - full).abs() <= step / 2 + 1e-6).all()  # within half a step: no clip
        assert ((w2[e] - w[e, "w2"].float()).abs().max()) > 0  # quantised, not copied
    resident = {s.name: store.tensor(0, s.name) for s in store.segments}

    def kernel(x, ids, weights, experts):
        a, b = wna16_dequant(experts if experts is not None else resident)
        return fused_moe_ref(x.float(), a, b, ids, weights).to(x.dtype)

    for seed in range(3):
        x, ids, wts, logits = routing(seed)
        out = moe_layer_step(0, x, ids, wts, logits, kernel, step=Step(decode=True,
                             num_valid=TOKENS), cache=runtime.cache)  # fmt: skip
        want = kernel(x, ids, wts, None)
        torch.testing.assert_close(out.float(), want.float(), atol=1e-2, rtol=1e-2)


def test_int4_refuses_a_layer_its_groups_do_not_divide(sglang_layers):
    from sglang.srt.layers.moe.fused_moe_triton.layer import FusedMoE

    facts = ModelFacts(E, TOP_K, H, 96, (0,), torch.bfloat16)
    cfg = LynxConfig(mode="offload", slots=4, expert_format="int4", prefetch="off")
    runtime = LynxRuntime(cfg, facts, torch.device("cpu"))
    with activated(runtime), pytest.raises(UnsupportedConfig, match="groups of 64") as err:
        FusedMoE(num_experts=E, hidden_size=H, intermediate_size=96, top_k=TOP_K, layer_id=0,
                 params_dtype=torch.bfloat16, prefix=PREFIX)  # fmt: skip
    assert "\n" not in str(err.value)


@pytest.mark.gpu
def test_converted_int4_runs_sglangs_w4a16_kernel_like_a_gptq_checkpoint(sglang_layers):
    """On the GPU: the bf16 checkpoint paged as int4 computes bit for bit what SGLang's stock
    moe_wna16 layer computes on the same values shipped as a symmetric GPTQ checkpoint."""
    from sglang.srt.layers.moe.fused_moe_triton.layer import FusedMoE
    from sglang.srt.layers.quantization.moe_wna16 import MoeWNA16Config
    from sglang.srt.runtime_context import get_parallel

    from lynx_sglang.offload.quantize import quantize_group_int
    from lynx_sglang.sglang.moe_method import INT4_CONFIG

    get_parallel().tp_group.device = torch.device("cuda")
    w = bf16_experts(12)
    names = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
    ckpt = {(e, names[shard]): as_gptq(*quantize_group_int(t, 4, GROUP, scale_dtype=t.dtype))
            for (e, shard), t in w.items()}  # fmt: skip
    with activated(None), torch.device("cuda"):
        stock = FusedMoE(num_experts=E, hidden_size=H, intermediate_size=INTER, top_k=TOP_K,
                         layer_id=0, params_dtype=torch.bfloat16,
                         quant_config=MoeWNA16Config.from_config(INT4_CONFIG), prefix=PREFIX)  # fmt: skip
    load_checkpoint(stock, lambda e, proj: ckpt[e, proj])
    runtime, moe = build_converted(w, "cuda", "int4")
    assert_slots_equal_resident(runtime, moe, stock)
