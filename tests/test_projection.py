"""bench/projection.py: the projected shapes match their configs, and shared experts only add."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from bench import compare_offload
from bench.projection import SHAPES, Hardware, Shape, layer_seconds

# (H, I, MoE layers, routed E, top-k, shared width) from the configs (sources: bench/SHAPES.md)
CONFIGS = {
    "deepseek-v3": (7168, 2048, 61 - 3, 256, 8, 1 * 2048),  # first_k_dense_replace=3, 1 shared
    "kimi-k2": (7168, 2048, 61 - 1, 384, 8, 1 * 2048),  # first_k_dense_replace=1, 1 shared
    "qwen3.5-397b-a17b": (4096, 1024, 60, 512, 10, 1024),  # every layer MoE
}
OLD = ["mixtral-8x7b", "qwen3-30b-a3b", "olmoe", "gpt-oss-20b"]


def old_layer_seconds(distinct, misses, prefetched, tokens, top_k, shape, hw, host_s=0.0):
    """The projection before shared experts, verbatim: the reference an unshared shape must hit."""
    eb = shape.expert_bytes
    pcie, hbm = hw.pcie_h2d_gbps * 1e9, hw.hbm_tbps * 1e12
    flops = 6.0 * shape.hidden * shape.inter * tokens * top_k
    fixed = hw.nonmoe_us_per_layer * 1e-6
    t_moe = np.maximum(distinct * eb / hbm, flops / (hw.bf16_tflops * 1e12))
    t_demand = misses * eb / pcie
    excess = np.maximum(0.0, prefetched * eb / pcie - (fixed + t_moe))
    return fixed + host_s + t_moe + t_demand + excess


def counters(seed: int, E: int = 64, n: int = 200) -> tuple[np.ndarray, ...]:
    """Random [N, L] layer-step counters of a cache of E experts: distinct, misses, prefetched."""
    g = np.random.default_rng(seed)
    distinct = g.integers(1, E + 1, size=(n, 4))
    misses = g.integers(0, distinct + 1)
    prefetched = g.integers(0, E // 2, size=(n, 4))
    return distinct, misses, prefetched


@pytest.mark.parametrize("name", CONFIGS)
def test_new_shapes_match_their_configs(name):
    H, inter, layers, E, k, shared = CONFIGS[name]
    sh = SHAPES[name]
    assert (sh.name, sh.hidden, sh.inter, sh.layers, sh.experts, sh.top_k, sh.shared_inter) == (
        name, H, inter, layers, E, k, shared)  # fmt: skip
    assert sh.expert_bytes == 3 * H * inter * 2  # bf16 w13 [2I, H] + w2 [H, I]
    assert sh.shared_bytes == 3 * H * shared * 2
    assert name == name.lower()
    assert compare_offload.parse_args(["--shape", name]).shape == name  # --shape accepts it


def test_config_bytes_per_expert():
    assert SHAPES["deepseek-v3"].expert_bytes == 88_080_384  # 88.1 MB, its shared expert too
    assert SHAPES["kimi-k2"].shared_bytes == 88_080_384
    assert SHAPES["qwen3.5-397b-a17b"].expert_bytes == 25_165_824  # 25.2 MB, its shared expert too


@pytest.mark.parametrize("name", OLD)
@pytest.mark.parametrize("tokens", [1, 16, 64])
def test_unshared_shapes_project_exactly_as_before(name, tokens):
    sh, hw = SHAPES[name], Hardware()
    assert sh.shared_inter == 0 and sh.shared_bytes == 0
    d, m, p = counters(tokens)
    new = layer_seconds(d, m, p, tokens, 8, sh, hw, host_s=2e-5)
    assert np.array_equal(new, old_layer_seconds(d, m, p, tokens, 8, sh, hw, host_s=2e-5))


def test_shared_experts_add_their_hbm_read_and_no_copies():
    """At batch 1 the layer is bound by reads: the shared experts add exactly B_s / HBM, and the
    copy terms do not see them (demand stalls equal with and without)."""
    hw, sh = Hardware(), SHAPES["deepseek-v3"]
    bare = replace(sh, shared_inter=0)
    d = np.array([[8, 8]])
    zero = np.zeros_like(d)
    with_shared = layer_seconds(d, zero, zero, 1, 8, sh, hw)
    without = layer_seconds(d, zero, zero, 1, 8, bare, hw)
    np.testing.assert_allclose(with_shared - without, sh.shared_bytes / (hw.hbm_tbps * 1e12))
    misses = np.array([[3, 5]])
    np.testing.assert_allclose(
        layer_seconds(d, misses, zero, 1, 8, sh, hw) - with_shared,
        layer_seconds(d, misses, zero, 1, 8, bare, hw) - without,
    )


def test_shared_flops_count_every_token():
    """Compute-bound (many tokens, one distinct expert): the shared width adds 6 H I_s T FLOPs."""
    hw = Hardware(hbm_tbps=1e6)  # reads free: the FLOP term decides
    sh = Shape("x", 1024, 512, 2, 64, 8, shared_inter=256)
    one = np.ones((1, 1))
    t = layer_seconds(one, 0 * one, 0 * one, 64, 8, sh, hw) - hw.nonmoe_us_per_layer * 1e-6
    np.testing.assert_allclose(t, 6.0 * 1024 * (512 * 8 + 256) * 64 / (hw.bf16_tflops * 1e12))


def test_fp8_shapes_take_their_bytes_from_the_format():
    from lynx_sglang.offload.quantize import bytes_per_expert

    q = SHAPES["qwen3-235b-a22b-fp8"]  # Qwen3-235B-A22B: H 4096, I 1536, 94 layers, 128 x top-8
    assert (q.hidden, q.inter, q.layers, q.experts, q.top_k, q.fmt) == (4096, 1536, 94, 128, 8, "fp8")
    assert q.expert_bytes == 3 * 4096 * 1536 + 4 * (24 * 32 + 32 * 12)  # a byte/weight + block scales
    assert q.layers * q.experts * q.expert_bytes > 141e9  # its experts do not fit one H200
    d = SHAPES["deepseek-v3-fp8"]
    v3 = SHAPES["deepseek-v3"]
    assert (d.hidden, d.inter, d.layers, d.shared_inter) == (v3.hidden, v3.inter, v3.layers, v3.shared_inter)
    assert d.expert_bytes == bytes_per_expert("fp8", 7168, 2048) < v3.expert_bytes / 1.99
    assert d.shared_bytes == bytes_per_expert("fp8", 7168, 2048)
    assert v3.with_format("int4").expert_bytes == bytes_per_expert("int4", 7168, 2048)
    assert v3.with_format("int4").shared_bytes == v3.shared_bytes  # shared experts stay as they were
    # the fraction of the real model's experts one device holds, per format
    assert abs(q.device_fraction("fp8") - 110e9 / (94 * 128 * q.expert_bytes)) < 1e-12
    assert q.device_fraction("int4") > q.device_fraction("fp8") > q.device_fraction("bf16")


def test_slots_follow_the_memory_budget_and_the_format():
    from bench.projection import slots_at_memory

    sh = SHAPES["qwen3-30b-a3b"]
    assert slots_at_memory(0.25, "bf16", sh, 64, 8) == 16
    assert slots_at_memory(0.25, "fp8", sh, 64, 8) == 31  # the block scales cost the 32nd slot
    assert slots_at_memory(0.25, "int4", sh, 64, 8) == 60  # 0.25 / 0.265625 of 64
    assert slots_at_memory(0.5, "int4", sh, 64, 8) == 64  # every expert fits: K = E
    assert slots_at_memory(0.1, "bf16", sh, 64, 8) == 0  # 6 < top-8: does not run


def test_a_smaller_format_projects_cheaper_copies_and_reads():
    hw = Hardware()
    distinct, misses, prefetched = counters(5)
    sh = SHAPES["qwen3-30b-a3b"]
    t = {f: layer_seconds(distinct, misses, prefetched, 16, 8, sh.with_format(f), hw)
         for f in ("bf16", "fp8", "int4")}  # fmt: skip
    assert (t["int4"] < t["fp8"]).all() and (t["fp8"] < t["bf16"]).all()
