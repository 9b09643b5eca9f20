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

B_e is one routed expert's bf16 bytes (w13 [2I, H] + w2 [H, I]); T tokens in the decode batch,
top-k k. B_s is the bf16 bytes of the layer's shared experts (I_s their summed intermediate width):
always resident on the GPU (never offloaded, never counted among the routed experts), so they add
an HBM read and their FLOPs to every layer step and no copies. B_s = 0 for shapes without them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


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

    @property
    def expert_bytes(self) -> int:
        """One routed bf16 expert: w13 [2I, H] + w2 [H, I]."""
        return 3 * self.hidden * self.inter * 2

    @property
    def shared_bytes(self) -> int:
        """A layer's bf16 shared experts: w13 [2 I_s, H] + w2 [H, I_s] (0 without them)."""
        return 3 * self.hidden * self.shared_inter * 2


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
