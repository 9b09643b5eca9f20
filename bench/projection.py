"""Projected decode time from exact cache counters: the stated model used where no GPU is present.

On a CPU-only machine the cache's counters are exact (real routing through the real cache), but
nothing there can time PCIe or HBM. This module turns the counters of one MoE layer's step into
seconds with a declared model, and every number it produces is labelled "projected":

    t_layer = nonmoe                                    attention, norms, router, launches
            + host                                      host planning the GPU waits for (eager
                                                        path: measured; captured graph: 0)
            + max((distinct * B_e + B_s) / HBM,         expert reads (roofline); the shared
                  6 H (I k + I_s) T / FLOPS)            experts' are read every layer step
            + misses * B_e / PCIe                       demand copies stall the layer
            + max(0, prefetched * B_e / PCIe - (nonmoe + t_moe))
                                                        prefetch copies overlap this layer's compute
                                                        and the next layer's attention; only the
                                                        excess delays the next layer
    t_step  = sum over traced layers of t_layer * (layers of the shape / traced layers)

B_e is one routed expert's bytes in the shape's expert format (w13 [2I, H] + w2 [H, I]; bf16 unless
the shape says otherwise, ``lynx_sglang.offload.quantize.bytes_per_expert``: FP8 and int4 halve and
quarter both the copy and the HBM read; FLOPs unchanged, a w4a16/w8a8 kernel still does 6 H I k T); T tokens in the decode batch,
top-k k. B_s is the bytes (``shared_fmt``) of the layer's shared experts (I_s their summed intermediate width):
always resident on the GPU (never offloaded, never counted among the routed experts), so they add
an HBM read and their FLOPs to every layer step and no copies. B_s = 0 for shapes without them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import numpy as np

from lynx_sglang.offload.quantize import bytes_per_expert


@dataclass(frozen=True)
class Hardware:
    """Declared constants: an H100 on a PCIe Gen5 host (stated, not measured here)."""

    pcie_h2d_gbps: float = 50.0  # pinned copy-engine host->device, GB/s
    hbm_tbps: float = 3.0  # effective HBM read bandwidth, TB/s
    bf16_tflops: float = 400.0  # effective dense bf16 tensor-core rate, TFLOP/s
    nonmoe_us_per_layer: float = 30.0  # attention + norms + router + launches of one layer

    def as_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        return (f"H2D {self.pcie_h2d_gbps:g} GB/s, HBM {self.hbm_tbps:g} TB/s, "
                f"{self.bf16_tflops:g} TFLOP/s, {self.nonmoe_us_per_layer:g} µs non-MoE per layer")  # fmt: skip


@dataclass(frozen=True)
class Shape:
    """The expert size and depth a projection (or a GPU run with random weights) uses. Only H, I,
    the MoE layers and the shared width enter the projection: the routing (which experts a step
    touches, E and k) is always the traced model's."""

    name: str
    hidden: int  # H
    inter: int  # I (per routed expert)
    layers: int  # MoE layers of the real model
    experts: int  # routed E of the real model (informational: the cache sees the routing's E)
    top_k: int  # k of the real model (informational: the routing's k enters the FLOPs)
    shared_inter: int = 0  # I_s: summed intermediate width of the always-resident shared experts
    fmt: str = "bf16"  # the routed experts' format (what is stored, copied and read)
    shared_fmt: str = "bf16"  # the shared experts' format (resident, read every step)
    # GPU memory left for routed experts on the device the shape is projected on (0: not stated)
    device_expert_bytes: int = 0

    @property
    def expert_bytes(self) -> int:
        """One routed expert in ``fmt``: w13 [2I, H] + w2 [H, I], scales included."""
        return bytes_per_expert(self.fmt, self.hidden, self.inter)

    @property
    def shared_bytes(self) -> int:
        """A layer's shared experts: w13 [2 I_s, H] + w2 [H, I_s] in ``shared_fmt`` (0 without)."""
        return bytes_per_expert(self.shared_fmt, self.hidden, self.shared_inter) if self.shared_inter else 0

    def with_format(self, fmt: str) -> Shape:
        """The same model with its routed experts in ``fmt`` (shared experts as they were)."""
        return replace(self, fmt=fmt)

    def device_fraction(self, fmt: str) -> float:
        """The fraction of the real model's routed experts (L x E) that ``device_expert_bytes``
        holds in ``fmt`` (0 when the shape states no device)."""
        total = self.layers * self.experts * bytes_per_expert(fmt, self.hidden, self.inter)
        return self.device_expert_bytes / total if self.device_expert_bytes else 0.0


def slots_at_memory(memory_fraction: float, fmt: str, shape: Shape, traced_experts: int,
                    top_k: int) -> int:  # fmt: skip
    """K per layer that a GPU expert budget buys in ``fmt``: the budget is ``memory_fraction`` of
    the layer's E experts in bf16, so K = floor(fraction x E x B_bf16 / B_fmt), at most E; 0 where
    fewer than top-k fit (the format cannot run at this budget)."""
    bf16 = bytes_per_expert("bf16", shape.hidden, shape.inter)
    K = min(traced_experts, math.floor(memory_fraction * traced_experts * bf16 / shape.with_format(fmt).expert_bytes + 1e-9))
    return K if K >= top_k else 0


# Real shapes (H, I, MoE layers and shared width from their configs; sources in bench/SHAPES.md).
# A projection at a shape is that model's expert size and depth driven by the traced model's
# routing (E=64/128 here), not that model's routing over its own 256, 384 or 512 experts.
SHAPES = {
    "mixtral-8x7b": Shape("mixtral-8x7b", 4096, 14336, 32, 8, 2),  # 352 MB / expert
    "qwen3-30b-a3b": Shape("qwen3-30b-a3b", 2048, 768, 48, 128, 8),  # 9.4 MB
    "olmoe": Shape("olmoe", 2048, 1024, 16, 64, 8),  # 12.6 MB
    "gpt-oss-20b": Shape("gpt-oss-20b", 2880, 2880, 24, 32, 4),  # 49.8 MB (bf16)
    # 61 layers, first_k_dense_replace=3; 1 shared expert of moe_intermediate_size (V3.1/V3.2 too)
    "deepseek-v3": Shape("deepseek-v3", 7168, 2048, 58, 256, 8, 2048),  # 88.1 MB + 88.1 MB shared
    # 61 layers, first_k_dense_replace=1; 1 shared expert of moe_intermediate_size
    "kimi-k2": Shape("kimi-k2", 7168, 2048, 60, 384, 8, 2048),  # 88.1 MB + 88.1 MB shared
    # 60 layers, all MoE (15 x (3 Gated DeltaNet + 1 full attention)); 25.2 MB + 25.2 MB shared;
    # the shared width 1024 is from third-party restatements, not read from its config.json
    "qwen3.5-397b-a17b": Shape("qwen3.5-397b-a17b", 4096, 1024, 60, 512, 10, 1024),
    # FP8 checkpoints (block 128 x 128 e4m3, fp32 scale_inv) on one H200: the GPU memory left for
    # routed experts is declared in H200_EXPERT_BYTES (bench/SHAPES.md: how it is derived)
    # 94 layers, all MoE, 128 experts, top-8: 18.9 MB / FP8 expert, 227 GB of routed experts
    "qwen3-235b-a22b-fp8": Shape("qwen3-235b-a22b-fp8", 4096, 1536, 94, 128, 8, fmt="fp8",
                                 device_expert_bytes=110 * 10**9),  # fmt: skip
    # deepseek-v3's shape as its published FP8 checkpoint: 44.1 MB / FP8 expert, 654 GB routed
    "deepseek-v3-fp8": Shape("deepseek-v3-fp8", 7168, 2048, 58, 256, 8, 2048, fmt="fp8",
                             shared_fmt="fp8", device_expert_bytes=100 * 10**9),  # fmt: skip
}


def layer_seconds(
    distinct: np.ndarray,
    misses: np.ndarray,
    prefetched: np.ndarray,
    tokens: int,
    top_k: int,
    shape: Shape,
    hw: Hardware,
    host_s: float = 0.0,
) -> np.ndarray:
    """Projected seconds of each MoE layer step; every input is [...] counts per layer step.
    ``host_s``: the host time per layer-step of the path the server takes (seconds). The shape's
    shared experts (``shared_bytes``, 0 for most) are read from HBM at every step, never copied."""
    eb, sb = shape.expert_bytes, shape.shared_bytes
    pcie, hbm = hw.pcie_h2d_gbps * 1e9, hw.hbm_tbps * 1e12
    # routed experts: k per token; shared experts: every token, resident (read, never copied)
    flops = 6.0 * shape.hidden * (shape.inter * top_k + shape.shared_inter) * tokens
    fixed = hw.nonmoe_us_per_layer * 1e-6
    t_moe = np.maximum((distinct * eb + sb) / hbm, flops / (hw.bf16_tflops * 1e12))
    t_demand = misses * eb / pcie
    excess = np.maximum(0.0, prefetched * eb / pcie - (fixed + t_moe))
    return fixed + host_s + t_moe + t_demand + excess


def step_seconds(per_layer: np.ndarray, shape: Shape) -> np.ndarray:
    """[N, L_traced] layer seconds -> [N] decode-step seconds at the shape's depth."""
    return per_layer.sum(-1) * shape.layers / per_layer.shape[-1]
