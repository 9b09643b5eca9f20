"""The expert cache on quantised rows, core only (no SGLang: this also runs on the bare GPU
machine of `make gpu-check`): block-FP8 rows (e4m3 weights, float32 scale_inv), per-tensor FP8
rows (SGLang's online FP8: one float32 per expert tensor) and int4 rows in SGLang's w4a16 layout
(uint8 nibbles, fp16 group scales) through every executor. Every step's
output, computed by a dequantising kernel on the slots, equals the same kernel with every expert
resident, bit for bit; every filled slot holds its expert's bytes; bytes moved are the format's.
On CUDA the store is pinned, copies run on the copy stream, and the graph executor gathers over
UVA."""

from __future__ import annotations

import pytest
import torch
from offload_helpers import one_thread  # noqa: F401 (autouse fixture)

from lynx_sglang.moe import fused_moe_ref
from lynx_sglang.offload import ExpertCache, HostExpertStore
from lynx_sglang.offload.quantize import dequantize_block_fp8, quantize_block_fp8
from lynx_sglang.step import Step, moe_layer_step

L, E, K, TOP_K, T = 2, 12, 6, 2, 3
H, INTER, GROUP = 128, 128, 64
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def fp8_experts(g):
    w13 = torch.randn(L, E, 2 * INTER, H, generator=g) / H**0.5
    w2 = torch.randn(L, E, H, INTER, generator=g) / INTER**0.5
    q13, s13 = quantize_block_fp8(w13)
    q2, s2 = quantize_block_fp8(w2)
    return {"w13": q13, "w13_weight_scale_inv": s13, "w2": q2, "w2_weight_scale_inv": s2}


def int4_experts(g):
    def one(N, K_):
        q = torch.randint(0, 256, (L, E, N, K_ // 2), dtype=torch.uint8, generator=g)
        s = (torch.rand(L, E, N, K_ // GROUP, generator=g) * 0.02).half()
        return q, s

    q13, s13 = one(2 * INTER, H)
    q2, s2 = one(H, INTER)
    return {"w13_qweight": q13, "w13_scales": s13, "w2_qweight": q2, "w2_scales": s2}


def fp8_tensor_experts(g):
    """SGLang's online-FP8 layout: e4m3 weights, one float32 scale per expert tensor ([E])."""
    w13 = torch.randn(L, E, 2 * INTER, H, generator=g) / H**0.5
    w2 = torch.randn(L, E, H, INTER, generator=g) / INTER**0.5
    out = {}
    for name, w in (("w13", w13), ("w2", w2)):
        scale = w.abs().amax((-2, -1)) / torch.finfo(torch.float8_e4m3fn).max  # [L, E]
        out[name] = (w / scale[..., None, None]).to(torch.float8_e4m3fn)
        out[f"{name}_weight_scale"] = scale
    return out


EXPERTS = {"fp8": fp8_experts, "int4": int4_experts, "fp8-tensor": fp8_tensor_experts}


def dequant(fmt: str, t: dict) -> tuple[torch.Tensor, torch.Tensor]:
    if fmt == "fp8-tensor":
        return tuple(t[w].float() * t[f"{w}_weight_scale"][:, None, None] for w in ("w13", "w2"))
    if fmt == "fp8":
        return (dequantize_block_fp8(t["w13"], t["w13_weight_scale_inv"]),
                dequantize_block_fp8(t["w2"], t["w2_weight_scale_inv"]))  # fmt: skip

    def one(q, s):
        nib = torch.stack([q & 0xF, q >> 4], -1).flatten(-2).float() - 8.0
        return nib * s.float().repeat_interleave(GROUP, -1)

    return one(t["w13_qweight"], t["w13_scales"]), one(t["w2_qweight"], t["w2_scales"])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("executor", ["eager", "graph", "hybrid"])
@pytest.mark.parametrize("fmt", list(EXPERTS))
def test_quantised_rows_through_every_executor(fmt, executor, device):
    g = torch.Generator().manual_seed(0)
    experts = EXPERTS[fmt](g)
    store = HostExpertStore(
        L, E, {n: tuple(t.shape[2:]) for n, t in experts.items()}, torch.bfloat16,
        pin=device == "cuda", headroom_gib=0, tensor_dtypes={n: t.dtype for n, t in experts.items()},
    )  # fmt: skip
    for layer in range(L):
        store.load_layer(layer, {n: t[layer] for n, t in experts.items()})
    cache = ExpertCache(store, K, device, TOP_K, executor=executor)
    resident = [
        {n: t[layer].to(device) for n, t in experts.items()} for layer in range(L)
    ]  # every expert on the device

    def kernel_for(layer):
        def kernel(x, ids, weights, slots):
            w13, w2 = dequant(fmt, slots if slots is not None else resident[layer])
            return fused_moe_ref(x, w13, w2, ids, weights)

        return kernel

    for _ in range(6):
        for layer in range(L):
            x = torch.randn(T, H, generator=g).to(device)
            ids = torch.stack([torch.randperm(E, generator=g)[:TOP_K] for _ in range(T)]).to(device)
            w = torch.rand(T, TOP_K, generator=g).to(device)
            logits = torch.zeros(T, E, device=device)
            # graph: the row count a device tensor (a captured step); the others eager
            rows = torch.tensor(T, dtype=torch.int32, device=device) if executor == "graph" else T
            out = moe_layer_step(layer, x, ids, w, logits, kernel_for(layer),
                                 step=Step(decode=True, num_valid=rows), cache=cache)  # fmt: skip
            want = kernel_for(layer)(x, ids, w, None)
            assert torch.equal(out, want.to(out.dtype))
        if device == "cuda":
            torch.cuda.synchronize()
        for pool, slot_row in enumerate(cache.slots.slot_expert):
            for slot, expert in enumerate(slot_row):
                layer = int(cache.slots.slot_layer[pool, slot])
                if expert < 0 or executor != "eager":
                    continue  # the device-side table is the truth for the other executors
                for seg in store.segments:
                    got = cache.slot_weights(layer)[seg.name][slot].cpu()
                    want = store.tensor(layer, seg.name)[expert]
                    assert torch.equal(got.reshape(-1).view(torch.uint8),
                                       want.reshape(-1).view(torch.uint8))  # fmt: skip
    counters = cache.counters()["total"]
    assert counters["bytes_h2d"] == counters["misses"] * store.nbytes_per_expert
    assert counters["overflow"] == 0
