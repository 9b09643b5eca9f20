"""The fused-MoE method that puts our expert cache under a ``FusedMoE`` layer.

It wraps the layer's own (unquantised) method, as SGLang's paged experts does:
- ``create_weights``: the layer's expert parameters become the cache's K GPU slots, and their
  loaders write every expert into the pinned host store instead (SGLang's own per-expert loader
  runs on a one-expert view of the store, so the host keeps exactly the GPU layout);
- ``apply``: the cache makes the step's experts resident and rewrites expert ids to slot ids,
  then the wrapped method runs its fused kernel on the slots (once per wave, summed).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from sglang.srt.layers.moe.token_dispatcher import StandardCombineInput
from sglang.srt.layers.quantization.base_config import FusedMoEMethodBase
from sglang.srt.layers.quantization.unquant import UnquantizedFusedMoEMethod

from lynx_sglang.sglang.runtime import LynxRuntime

# FusedMoE parameter -> host store tensor.
PARAMS = {"w13_weight": "w13", "w2_weight": "w2"}


class OffloadMoEMethod(FusedMoEMethodBase, torch.nn.Module):
    """A ``FusedMoE`` quant method serving the layer from K GPU slots over a host store."""

    def __init__(self, runtime: LynxRuntime, layer_id: int) -> None:
        torch.nn.Module.__init__(self)
        self.runtime = runtime
        self.cache = runtime.cache
        self.index = runtime.index(layer_id)  # dense MoE-layer index in the store and cache
        self.base_method = UnquantizedFusedMoEMethod()
        self.runner = None
        self._host_interleaved = False

    # ------------------------------------------------------------------ construction
    def create_weights(
        self,
        layer: torch.nn.Module,
        num_experts: int,
        hidden_size: int,
        intermediate_size_per_partition: int,
        params_dtype: torch.dtype,
        **extra: Any,
    ) -> None:
        """The base method's parameters at K rows, bound to the cache's slot tensors."""
        if extra.get("with_bias"):
            raise RuntimeError("lynx-sglang offload: MoE experts with biases are not supported")
        slots = self.cache.slot_weights(self.index)  # {"w13": [K, 2I, H], "w2": [K, H, I]}
        num_slots = next(iter(slots.values())).shape[0]
        with torch.device("meta"):  # shapes and loader tags only: the slots are the storage
            self.base_method.create_weights(
                layer=layer,
                num_experts=num_slots,
                hidden_size=hidden_size,
                intermediate_size_per_partition=intermediate_size_per_partition,
                params_dtype=params_dtype,
                **extra,
            )
        for name, key in PARAMS.items():
            meta = getattr(layer, name)
            gpu = slots[key]
            if tuple(gpu.shape) != tuple(meta.shape) or gpu.dtype != meta.dtype:
                raise RuntimeError(
                    f"lynx-sglang offload: layer {layer.layer_id} {name} is "
                    f"{tuple(meta.shape)} {meta.dtype}, the cache slots are "
                    f"{tuple(gpu.shape)} {gpu.dtype}"
                )
            param = torch.nn.Parameter(gpu, requires_grad=False)
            param.__dict__.update(meta.__dict__)  # loader tags set by the base method
            param.weight_loader = self._host_loader(layer, key)
            setattr(layer, name, param)
        # SGLang's loaders follow the wrapped method's weight layout.
        layer.weight_load_method = self.base_method
        layer._derived_weight_cache_error = (
            "Online weight updates are not supported with lynx-sglang offload: the GPU slots "
            "and the host expert store would disagree."
        )

    def _host_loader(self, layer: torch.nn.Module, key: str) -> Callable[..., None]:
        """A FusedMoE-style weight loader that writes into the host store."""
        host = self.cache.store.tensor(self.index, key)  # [E, *shape] view of the pinned store

        def weight_loader(
            param: torch.nn.Parameter,
            loaded_weight: torch.Tensor,
            weight_name: str,
            shard_id: str,
            expert_id: int | None = None,
        ) -> None:
            if expert_id is None:
                raise RuntimeError(
                    "lynx-sglang offload: checkpoints that stack all experts in one tensor are "
                    "not supported"
                )
            expert = layer._map_global_expert_id_to_local_expert_id(expert_id)
            if expert < 0:
                return
            row = torch.nn.Parameter(host[expert : expert + 1], requires_grad=False)
            row.__dict__.update(param.__dict__)
            layer._weight_loader_impl(
                param=row,
                loaded_weight=loaded_weight,
                weight_name=weight_name,
                shard_id=shard_id,
                expert_id=0,
            )

        return weight_loader

    def create_moe_runner(self, layer: torch.nn.Module, moe_runner_config: Any) -> None:
        """The base runner over K experts, out of place (a step may run in several waves)."""
        num_slots = layer.w13_weight.shape[0]
        self.base_method.create_moe_runner(
            layer,
            dataclasses.replace(
                moe_runner_config,
                num_experts=num_slots,
                num_local_experts=num_slots,
                inplace=False,
            ),
        )
        self.runner = self.base_method.runner

    def get_moe_runner_backend(self, layer: torch.nn.Module) -> Any:
        return self.base_method.get_moe_runner_backend(layer)

    def get_triton_quant_info(self, layer: torch.nn.Module) -> Any:
        return self.base_method.get_triton_quant_info(layer)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        """The base method's post-load step; a row permutation it applies to the slots is applied
        to the host store too, so copied-in experts have the layout the kernel expects."""
        self.base_method.process_weights_after_loading(layer)
        if (
            getattr(self.base_method, "w13_swiglu_interleaved", False)
            and not self._host_interleaved
        ):
            w13 = self.cache.store.tensor(self.index, "w13")  # [E, 2I, H]
            inter = w13.shape[1] // 2
            order = torch.stack([torch.arange(inter), torch.arange(inter, 2 * inter)], 1).view(-1)
            for e in range(w13.shape[0]):
                w13[e] = w13[e][order]
            self._host_interleaved = True

    # ------------------------------------------------------------------ forward
    def apply(self, layer: torch.nn.Module, dispatch_output: Any) -> StandardCombineInput:
        """Make the step's experts resident, then run the base kernel on slot ids per wave."""
        topk = dispatch_output.topk_output
        x = dispatch_output.hidden_states  # [T, H]
        ids = topk.topk_ids  # [T, k]
        step = self.runtime.step
        num_valid = step.num_valid if step.decode else None
        padded = isinstance(num_valid, torch.Tensor) or (
            isinstance(num_valid, int) and num_valid < ids.shape[0]
        )
        if padded:  # CUDA-graph padding rows need no expert
            rows = torch.arange(ids.shape[0], device=ids.device)[:, None]
            ids = torch.where(rows < num_valid, ids, -1)

        def compute(
            x: torch.Tensor,
            w13: torch.Tensor,
            w2: torch.Tensor,
            slot_ids: torch.Tensor,
            weights: torch.Tensor,
        ) -> torch.Tensor:
            if padded:  # padding keeps -1: point it at slot 0 with weight 0
                pad = slot_ids < 0
                slot_ids, weights = slot_ids.masked_fill(pad, 0), weights.masked_fill(pad, 0)
            if x.device.type == "cpu":  # SGLang's CPU path needs distinct ids within a row
                slot_ids = spread_unused(slot_ids, weights == 0, w13.shape[0])
            wave = dispatch_output._replace(
                hidden_states=x,
                topk_output=topk._replace(topk_ids=slot_ids, topk_weights=weights),
            )
            return self.base_method.apply(layer, wave).hidden_states

        out = self.cache.forward(self.index, x, ids, topk.topk_weights, compute)
        return StandardCombineInput(hidden_states=out)


def spread_unused(slot_ids: torch.Tensor, unused: torch.Tensor, num_slots: int) -> torch.Tensor:
    """Give each row's unused choices (weight 0: another wave's, or padding) distinct slots
    that the row does not use, so no row names a slot twice. slot_ids, unused: [T, k]."""
    rows = slot_ids.shape[0]
    taken = torch.zeros(rows, num_slots + 1, dtype=torch.bool, device=slot_ids.device)
    taken.scatter_(1, torch.where(unused, num_slots, slot_ids.long()), True)  # [T, K + 1]
    free_first = torch.sort(taken[:, :num_slots].to(torch.int8), dim=1, stable=True).indices
    nth = (unused.long().cumsum(1) - 1).clamp(min=0)  # [T, k] rank among the row's unused
    return torch.where(unused, free_first.gather(1, nth).to(slot_ids.dtype), slot_ids)
