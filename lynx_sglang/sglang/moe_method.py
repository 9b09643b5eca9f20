"""The one quant method through which every lynx mode runs a ``FusedMoE`` layer.

``LynxMoEMethod`` wraps the layer's own fused-MoE method (its "base"), as SGLang's paged experts
does, and its ``apply`` runs ``lynx_sglang.step.moe_layer_step``: selection on the router logits
SGLang passes in the TopK output, then (with offload) the expert cache, then the base method's
fused kernel. The modes differ only in the base and in whether the cache is there:
- ``lynx``: the layer's own method, of any format on the triton runner (or SGLang's
  ``--enable-paged-experts`` method, whose own cache then serves the shrunken set), no cache of
  ours;
- ``offload`` / ``lynx+offload``: the method ``FusedMoE`` would choose (or block FP8 for
  ``--lynx-expert-format fp8``), chosen once the layer exists; its per-expert parameters
  (weights and scales) become the cache's K GPU slots, and its loaders end in ours, which write
  every expert into the pinned host store (SGLang's own per-expert loader on a one-expert view
  of the store, so the host keeps the GPU layout).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, Optional

import torch
from sglang.srt.layers.moe.token_dispatcher import StandardCombineInput
from sglang.srt.layers.moe.topk import StandardTopKOutput
from sglang.srt.layers.quantization.base_config import FusedMoEMethodBase

from lynx_sglang.offload.quantize import GROUP, pack_int4, quantize_block_fp8, quantize_group_int
from lynx_sglang.selection.routing import SCORINGS, Routing
from lynx_sglang.sglang.checks import UnsupportedConfig
from lynx_sglang.sglang.runtime import LynxRuntime
from lynx_sglang.step import moe_layer_step

# FusedMoE parameter -> host store tensor, where the core knows it by a short name (its
# benchmarks and kernels read "w13" and "w2"); every other per-expert tensor keeps its name.
PARAMS = {"w13_weight": "w13", "w2_weight": "w2"}
_EXPERT_PREFIXES = ("w13_", "w2_")
# --lynx-expert-format int4: SGLang's moe_wna16 method (its triton w4a16 kernel) over symmetric
# int4 experts, one scale per GROUP weights, as a symmetric GPTQ checkpoint would configure it.
INT4_CONFIG = {"quant_method": "gptq", "bits": 4, "group_size": GROUP, "sym": True,
               "desc_act": False, "lm_head": False}  # fmt: skip


def store_name(param: str) -> str:
    """The host store's name of a FusedMoE per-expert parameter."""
    return PARAMS.get(param, param)


def _param_name(key: str) -> str:
    return next((p for p, k in PARAMS.items() if k == key), key)


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """A tensor's bytes (float8 and friends compare bytewise, and NaN-free)."""
    return t.contiguous().view(torch.uint8)


def expert_params(layer: torch.nn.Module, num_experts: int) -> dict[str, torch.Tensor]:
    """The layer's per-expert parameters: its ``w13_*`` / ``w2_*`` tensors with one row per
    expert (weights, scales, zero points), by name, as the quant method created them."""
    return {
        name: p
        for name, p in layer.named_parameters(recurse=False)
        if name.startswith(_EXPERT_PREFIXES) and p.dim() >= 1 and p.shape[0] == num_experts
    }


def check_offload_format(base: Any, layer_id: int) -> None:
    """Refuse, in one line, a quant method whose experts the cache cannot page: it must be one
    of the supported formats, keep its weights as loaded (no repack), and load through plain
    parameters."""
    from sglang.srt.layers.quantization.fp8 import Fp8MoEMethod
    from sglang.srt.layers.quantization.moe_wna16 import MoeWNA16Method
    from sglang.srt.layers.quantization.unquant import UnquantizedFusedMoEMethod
    from sglang.srt.layers.quantization.w8a8_fp8 import W8A8FP8MoEMethod
    from sglang.srt.layers.quantization.w8a8_int8 import W8A8Int8MoEMethod

    from lynx_sglang.sglang.checks import OFFLOAD_FORMATS

    ok = isinstance(base, (UnquantizedFusedMoEMethod, W8A8FP8MoEMethod, W8A8Int8MoEMethod))
    if isinstance(base, MoeWNA16Method):  # GPTQ/AWQ converted at load, no repack after it
        ok = not base.quant_config.has_zp  # its zero points bypass the per-expert loader
    if isinstance(base, Fp8MoEMethod):
        ok = (
            (base.quant_config.is_checkpoint_fp8_serialized or quantises_at_load(base))
            and not getattr(base, "use_mxfp8", False)
            and not getattr(base, "is_fp4_expert", False)
        )
    if not ok:
        raise UnsupportedConfig(
            f"lynx-sglang offload: layer {layer_id}'s experts use {type(base).__name__}"
            f"{_refusal_detail(base)}, which the expert cache does not page; it pages "
            f"{OFFLOAD_FORMATS}"
        )


def _refusal_detail(base: Any) -> str:
    """What about a known method keeps it off the cache (empty when its class is the reason)."""
    config = getattr(base, "quant_config", None)
    if getattr(config, "has_zp", False):
        return " with zero points (asymmetric GPTQ/AWQ), which it writes past the expert loader"
    return ""


def quantises_at_load(base: Any) -> bool:
    """SGLang's online FP8 (``--quantization fp8`` of a bf16/fp16 checkpoint): the experts load
    in the checkpoint's dtype and its post-load step quantises each expert's w13 and w2 to FP8
    with one scale per tensor. With offload the host store holds that post-load layout, each
    expert quantised by SGLang's own quantiser as soon as its shards are in."""
    from sglang.srt.layers.quantization.fp8 import Fp8MoEMethod

    return (
        isinstance(base, Fp8MoEMethod)
        and not base.quant_config.is_checkpoint_fp8_serialized
        and not base.block_quant
    )


def _post_load_layout(metas: dict[str, torch.Tensor]) -> dict[str, tuple[tuple, torch.dtype]]:
    """The store layout of an online-FP8 layer: its weights in FP8, one float32 scale each."""
    from sglang.srt.layers.quantization.fp8 import fp8_dtype

    layout = {store_name(n): (tuple(m.shape[1:]), m.dtype) for n, m in metas.items()}
    for key in ("w13", "w2"):
        layout[key] = (layout[key][0], fp8_dtype)
        layout[f"{_param_name(key)}_scale"] = ((), torch.float32)
    return layout


class LynxMoEMethod(FusedMoEMethodBase, torch.nn.Module):
    """A ``FusedMoE`` quant method: the layer's step through ``moe_layer_step`` over ``base``."""

    def __init__(
        self,
        runtime: LynxRuntime,
        layer_id: int,
        base_method: Any,
        make_base: Optional[Callable[[torch.nn.Module], Any]] = None,
    ) -> None:
        """``base_method``: the layer's own method; with offload None and ``make_base`` (the
        layer -> its quant method, as ``FusedMoE`` would choose it), called once the layer
        exists and before any weight does."""
        torch.nn.Module.__init__(self)
        self.runtime = runtime
        self.index = runtime.index(layer_id)  # dense MoE-layer index in the store and cache
        self.base_method = base_method
        self._make_base = make_base
        self.runner = getattr(base_method, "runner", None)
        self._host_interleaved = False
        # Online FP8: each expert's shards in the checkpoint's dtype until all are in
        # ((key, expert) -> (row, shards loaded)), and experts 0..K-1 as loaded, for the post-load.
        self._checkpoint_rows: dict[str, tuple[tuple, torch.dtype]] = {}  # online FP8 only
        self._staged: dict[tuple[str, int], tuple[torch.Tensor, set]] = {}
        self._loaded_rows: dict[tuple[str, int], torch.Tensor] = {}

    @property
    def cache(self):
        """The runtime's expert cache (None: every expert resident, in the base's own weights);
        with offload it exists from the first MoE layer's ``create_weights`` on."""
        return self.runtime.cache

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
        """With offload, the base method's parameters at K rows, bound to the cache's slot
        tensors; without, the base method's own."""
        if not self.runtime.cfg.offload_on:
            self.base_method.create_weights(
                layer, num_experts, hidden_size, intermediate_size_per_partition, params_dtype,
                **extra,
            )  # fmt: skip
            return
        if extra.get("with_bias"):
            raise UnsupportedConfig(
                "lynx-sglang offload: MoE experts with biases are not supported"
            )
        if self.base_method is None:  # with offload the base is chosen once the layer exists
            self.base_method = self._make_base(layer)
        check_offload_format(self.base_method, layer.layer_id)
        if self.runtime.cfg.expert_format == "int4" and (
            hidden_size % GROUP or intermediate_size_per_partition % GROUP
        ):
            raise UnsupportedConfig(
                f"lynx-sglang: --lynx-expert-format int4 quantises in groups of {GROUP} weights, "
                f"which do not divide layer {layer.layer_id}'s hidden size {hidden_size} and "
                f"intermediate size {intermediate_size_per_partition} (use --lynx-expert-format fp8)"
            )
        E = self.runtime.model.num_experts
        # The base method's loaders (its own conversions, e.g. GPTQ/AWQ to its layout, included)
        # end in FusedMoE's per-expert loader: ours, which writes into the host store.
        extra = {**extra, "weight_loader": self._host_loader(layer)}
        with torch.device("meta"):  # shapes, dtypes and loader tags only: slots are the storage
            self.base_method.create_weights(
                layer=layer,
                num_experts=E,
                hidden_size=hidden_size,
                intermediate_size_per_partition=intermediate_size_per_partition,
                params_dtype=params_dtype,
                **extra,
            )
        metas = expert_params(layer, E)  # param name -> its meta tensor [E, *row]
        layout = {store_name(n): (tuple(m.shape[1:]), m.dtype) for n, m in metas.items()}
        if quantises_at_load(self.base_method):
            self._checkpoint_rows = {k: layout[k] for k in ("w13", "w2")}
            layout = _post_load_layout(metas)
        cache = self.runtime.cache_for(layout, layer.layer_id)  # built by the first layer
        slots = cache.slot_weights(self.index)  # {"w13": [K, 2I, H], "w2": [K, H, I], ...}
        for name, meta in metas.items():
            if type(meta) is not torch.nn.Parameter:  # e.g. vLLM-style parameter classes
                raise UnsupportedConfig(
                    f"lynx-sglang offload: {type(self.base_method).__name__} loads {name} "
                    f"through {type(meta).__name__}, which the host store does not take"
                )
            param = torch.nn.Parameter(slots[store_name(name)], requires_grad=False)
            param.__dict__.update(meta.__dict__)  # loader tags set by the base method
            param.lynx_store_name = store_name(name)
            setattr(layer, name, param)
        for name, t in layer.named_parameters(recurse=False):
            if t.is_meta and t.numel() == 0:  # placeholders a loader skips (e.g. GPTQ's g_idx)
                empty = torch.nn.Parameter(torch.empty(0, dtype=t.dtype, device=cache.device),
                                           requires_grad=False)  # fmt: skip
                empty.__dict__.update(t.__dict__)
                setattr(layer, name, empty)
        unpaged = [n for n, t in (*layer.named_parameters(recurse=False),
                                  *layer.named_buffers(recurse=False)) if t.is_meta]  # fmt: skip
        if unpaged:
            raise UnsupportedConfig(
                f"lynx-sglang offload: {type(self.base_method).__name__} creates {unpaged[0]}, "
                "which is not one row per expert, so the expert cache cannot page it"
            )
        if self.runtime.cfg.expert_format == "int4":
            self._int4_receivers(layer, params_dtype)
        # SGLang's loaders follow the wrapped method's weight layout.
        layer.weight_load_method = self.base_method
        layer._derived_weight_cache_error = (
            "Online weight updates are not supported with lynx-sglang offload: the GPU slots "
            "and the host expert store would disagree."
        )

    def _host_loader(self, layer: torch.nn.Module) -> Callable[..., None]:
        """FusedMoE's per-expert weight loader, writing into the host store row of the
        parameter's expert (SGLang's own loader on a one-row view, so the host keeps the GPU
        layout). With --lynx-expert-format fp8 a bf16/fp16 weight is quantised on the way in
        (block FP8, each shard on its own, as an FP8 checkpoint ships it) and its scales loaded
        beside it."""

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
            if expert < 0 or param.numel() == 0:
                return
            key = param.lynx_store_name
            store = self.cache.store
            if key in self._checkpoint_rows:  # online FP8: quantised once the expert is whole
                self._stage(layer, key, expert, param, loaded_weight, weight_name, shard_id)
                return
            loads = [(key, param, loaded_weight, weight_name)]
            if (
                self.runtime.cfg.expert_format == "fp8"
                and key in ("w13", "w2")
                and loaded_weight.dtype.is_floating_point
                and loaded_weight.element_size() > 1
            ):
                q, scale_inv = quantize_block_fp8(loaded_weight)
                scale_key = f"{_param_name(key)}_scale_inv"
                loads = [(key, param, q, weight_name),
                         (scale_key, getattr(layer, scale_key), scale_inv,
                          f"{weight_name}_scale_inv")]  # fmt: skip
            for rows_of, like, tensor, name in loads:
                host = store.tensor(self.index, rows_of)  # [E, *row] view of the pinned store
                row = torch.nn.Parameter(host[expert : expert + 1], requires_grad=False)
                row.__dict__.update(like.__dict__)
                layer._weight_loader_impl(
                    param=row,
                    loaded_weight=tensor,
                    weight_name=name,
                    shard_id=shard_id,
                    expert_id=0,
                )

        return weight_loader

    def _int4_receivers(self, layer: torch.nn.Module, dtype: torch.dtype) -> None:
        """--lynx-expert-format int4: the bf16/fp16 checkpoint names ``w13_weight`` and
        ``w2_weight``, which the int4 method does not have; empty parameters of those names take
        each shard, quantise it (symmetric int4, one scale in the checkpoint's dtype per GROUP
        weights along the input dim) and load the packed values and scales into the host store through SGLang's
        own loader, as a converted GPTQ checkpoint would arrive."""
        store_loader = self._host_loader(layer)

        def weight_loader(
            param: torch.nn.Parameter,
            loaded_weight: torch.Tensor,
            weight_name: str,
            shard_id: str,
            expert_id: int | None = None,
        ) -> None:
            w = "w2" if shard_id == "w2" else "w13"
            q, scale = quantize_group_int(loaded_weight, 4, GROUP, scale_dtype=dtype)
            stem = weight_name.removesuffix("weight")
            for suffix, tensor in (("qweight", pack_int4(q)), ("scales", scale)):
                target = getattr(layer, f"{w}_{suffix}")
                store_loader(target, tensor, stem + suffix, shard_id, expert_id)

        for name in ("w13_weight", "w2_weight"):
            receiver = torch.nn.Parameter(torch.empty(0, dtype=dtype), requires_grad=False)
            receiver.weight_loader = weight_loader
            setattr(layer, name, receiver)

    def _stage(
        self,
        layer: torch.nn.Module,
        key: str,
        expert: int,
        like: torch.nn.Parameter,
        loaded_weight: torch.Tensor,
        weight_name: str,
        shard_id: str,
    ) -> None:
        """Online FP8: one shard of an expert's w13 or w2 into its staging row (SGLang's own
        loader, so the GPU layout), and once every shard is in, the whole tensor quantised by
        SGLang's per-tensor quantiser (its post-load step's, on the cache's device) into the
        host store, its scale beside it. Rows of experts 0..K-1 are kept for the post-load."""
        from sglang.srt.layers.quantization import fp8 as sglang_fp8

        shape, dtype = self._checkpoint_rows[key]
        row, shards = self._staged.setdefault(
            (key, expert), (torch.zeros(1, *shape, dtype=dtype), set())
        )
        param = torch.nn.Parameter(row, requires_grad=False)
        param.__dict__.update(like.__dict__)
        layer._weight_loader_impl(param=param, loaded_weight=loaded_weight, weight_name=weight_name,
                                  shard_id=shard_id, expert_id=0)  # fmt: skip
        shards.add(shard_id)
        if key == "w2":
            whole = {"w2"}
        else:
            whole = {"w1", "w3"} if layer.moe_runner_config.is_gated else {"w1"}
        if shards != whole:
            return
        del self._staged[key, expert]
        q, scale = sglang_fp8.scaled_fp8_quant(row[0].to(self.cache.device))
        store = self.cache.store
        store.tensor(self.index, key)[expert].copy_(q.cpu())
        store.tensor(self.index, f"{_param_name(key)}_scale")[expert].copy_(scale.reshape(()))
        if expert < self.cache.num_slots:
            self._loaded_rows[key, expert] = row

    def _post_load_online_fp8(self, layer: torch.nn.Module, slots: dict, n: int) -> None:
        """SGLang's own online-FP8 post-load step, on experts 0..n-1 as loaded (a layer of n
        experts, as the slots are), must give the host store's rows byte for byte; its tensors
        then become the slots' contents and the slots stay the layer's parameters."""
        if self._staged:
            (key, expert), (_, shards) = next(iter(self._staged.items()))
            raise RuntimeError(
                f"lynx-sglang offload: layer {layer.layer_id} expert {expert}'s {_param_name(key)} "
                f"was loaded only in part ({', '.join(sorted(shards))}) before the post-load step"
            )
        device = next(iter(slots.values())).device
        num_local = layer.num_local_experts
        for key in ("w13", "w2"):
            rows = [self._loaded_rows.get((key, e)) for e in range(n)]
            if any(r is None for r in rows):
                raise RuntimeError(
                    f"lynx-sglang offload: layer {layer.layer_id}'s {_param_name(key)} was not "
                    "loaded for every expert"
                )
            loaded = torch.nn.Parameter(torch.cat(rows).to(device), requires_grad=False)
            loaded.__dict__.update(getattr(layer, _param_name(key)).__dict__)
            setattr(layer, _param_name(key), loaded)
        self._loaded_rows.clear()
        layer.num_local_experts = n  # the step loops over the layer's experts: the slots' n
        try:
            self.base_method.process_weights_after_loading(layer)
        finally:
            layer.num_local_experts = num_local
        for key, slot in slots.items():
            name = _param_name(key)
            made = getattr(layer, name)
            host = self.cache.store.tensor(self.index, key)[:n]
            same = made.shape == host.shape and torch.equal(
                _bytes(made.data), _bytes(host.to(device))
            )
            if not same:
                raise UnsupportedConfig(
                    f"lynx-sglang offload: {type(self.base_method).__name__}'s post-load step "
                    f"makes {name} other than the host store's quantisation of it"
                )
            slot[:n].copy_(made.data)
            param = torch.nn.Parameter(slot, requires_grad=False)
            param.__dict__.update(made.__dict__)
            setattr(layer, name, param)

    def create_moe_runner(self, layer: torch.nn.Module, moe_runner_config: Any) -> None:
        """The base runner; with offload over K experts, out of place (a step may run in
        several waves)."""
        if self.cache is None:
            self.base_method.create_moe_runner(layer, moe_runner_config)
            self.runner = getattr(self.base_method, "runner", None)
            return
        num_slots = next(iter(self.cache.slot_weights(self.index).values())).shape[0]
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
        """The base method's post-load step. With offload it runs on the slots holding the
        layer's first K experts, and must leave them as the host store holds them, so that any
        expert copied in later is what the kernel expects: a row permutation it applies (the
        triton runner's SwiGLU interleave) is applied to the host store too; any other change
        of the experts, or a parameter replaced or created, is refused in one line. The
        "similar" policy's expert similarity is computed first, from the weights as loaded."""
        if self.runtime.similarity is not None:  # the "similar" policy's (bf16 experts)
            self.runtime.note_expert_weights(self.index, *self._loaded_weights(layer))
        if self.cache is None:
            self.base_method.process_weights_after_loading(layer)
            return
        store, slots = self.cache.store, self.cache.slot_weights(self.index)
        K = next(iter(slots.values())).shape[0]
        n = min(K, store.num_experts)
        if self._checkpoint_rows:
            self._post_load_online_fp8(layer, slots, n)
            self._check_post_load(layer, slots, n)
            return
        for key, slot in slots.items():
            slot[:n].copy_(store.tensor(self.index, key)[:n])
        self.base_method.process_weights_after_loading(layer)
        if (
            getattr(self.base_method, "w13_swiglu_interleaved", False)
            and not self._host_interleaved
        ):
            w13 = store.tensor(self.index, "w13")  # [E, 2I, H]
            inter = w13.shape[1] // 2
            order = torch.stack([torch.arange(inter), torch.arange(inter, 2 * inter)], 1).view(-1)
            for e in range(w13.shape[0]):
                w13[e] = w13[e][order]
            self._host_interleaved = True
        self._check_post_load(layer, slots, n)

    def _check_post_load(self, layer: torch.nn.Module, slots: dict, n: int) -> None:
        """The slots are still the layer's expert parameters and hold the host store's rows."""
        method = type(self.base_method).__name__
        for name in expert_params(layer, next(iter(slots.values())).shape[0]):
            if store_name(name) not in slots:
                raise UnsupportedConfig(
                    f"lynx-sglang offload: {method} creates per-expert {name} after loading, "
                    "which the host store does not hold"
                )
        for key, slot in slots.items():
            param = getattr(layer, _param_name(key), None)
            if param is None or param.data_ptr() != slot.data_ptr():
                raise UnsupportedConfig(
                    f"lynx-sglang offload: {method} replaces {_param_name(key)} after loading "
                    "(a repack), which the K GPU slots cannot follow"
                )
            host = self.cache.store.tensor(self.index, key)[:n]
            if not torch.equal(_bytes(slot[:n]), _bytes(host.to(slot.device))):
                raise UnsupportedConfig(
                    f"lynx-sglang offload: {method} transforms {_param_name(key)} after loading, "
                    "which the host store does not replicate"
                )

    def _loaded_weights(self, layer: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's expert weights (w13 [E, 2I, H], w2 [E, H, I], in the checkpoint's
        format): the host store's with offload, else the layer's own."""
        if self.cache is not None:
            store = self.cache.store
            return store.tensor(self.index, "w13"), store.tensor(self.index, "w2")
        return layer.w13_weight, layer.w2_weight

    def __getattr__(self, name: str) -> Any:
        """Anything else SGLang asks of the method is the base method's."""
        try:
            return torch.nn.Module.__getattr__(self, name)
        except AttributeError:
            return getattr(torch.nn.Module.__getattr__(self, "base_method"), name)

    # ------------------------------------------------------------------ forward
    def apply(self, layer: torch.nn.Module, dispatch_output: Any) -> Any:
        """One step of the layer: ``moe_layer_step`` with the base method's kernel."""
        topk = dispatch_output.topk_output  # StandardTopKOutput(topk_weights, topk_ids, logits)
        if type(topk) is not StandardTopKOutput:  # other runners' formats: the checks refuse
            return self.base_method.apply(layer, dispatch_output)
        rt = self.runtime
        out = moe_layer_step(
            self.index,
            dispatch_output.hidden_states,  # [T, H]
            topk.topk_ids,  # [T, k]
            topk.topk_weights,  # [T, k]
            topk.router_logits,  # [T, E]
            self._kernel(layer, dispatch_output),
            step=rt.step,
            selection=rt.selection,
            cache=self.cache,
            stats=rt.stats,
            similarity=rt.similarity,
            routing=rt.routing[self.index],
        )
        return StandardCombineInput(hidden_states=out)

    def _kernel(self, layer: torch.nn.Module, dispatch_output: Any) -> Callable[..., torch.Tensor]:
        """The base method's fused kernel on given ids and weights (slot ids over the cache's
        slot tensors, which are the layer's parameters, or expert ids over the layer's own)."""
        topk = dispatch_output.topk_output

        def kernel(
            x: torch.Tensor,
            ids: torch.Tensor,
            weights: torch.Tensor,
            experts: Optional[Mapping[str, torch.Tensor]],
        ) -> torch.Tensor:
            if experts is not None and x.device.type == "cpu":
                # SGLang's CPU path needs distinct ids within a row
                ids = spread_unused(ids, weights == 0, next(iter(experts.values())).shape[0])
            call = dispatch_output._replace(
                hidden_states=x, topk_output=topk._replace(topk_ids=ids, topk_weights=weights)
            )
            return self.base_method.apply(layer, call).hidden_states

        return kernel


def routing_of(topk: torch.nn.Module, experts: torch.nn.Module) -> Routing:
    """The routing rule of a MoE block: its SGLang ``TopK`` (how ids are chosen and weighed)
    and its ``FusedMoE`` (how many fused shared-expert columns end each row: DeepSeek's router
    writes them, Qwen's block appends them), or ``UnsupportedConfig`` naming what selection
    cannot follow."""
    from sglang.srt.layers.moe.topk import TopK, is_routed_scaling_factor_fused_in_topk

    layer = getattr(topk, "layer_id", "?")
    if type(topk) is not TopK:
        raise UnsupportedConfig(
            f"lynx-sglang: layer {layer} routes through {type(topk).__name__}, not SGLang's TopK "
            "(hash routing and custom routers are not supported)"
        )
    c = topk.topk_config
    if c.custom_routing_function is not None:
        raise UnsupportedConfig(f"lynx-sglang: layer {layer} has a custom routing function")
    # SGLang's biased grouped top-k scores by sigmoid whatever scoring_func says (GLM-4.5
    # leaves it at "softmax"); every other path honours scoring_func.
    biased_grouped = c.use_grouped_topk and c.correction_bias is not None
    scoring = "sigmoid" if biased_grouped else c.scoring_func
    if scoring not in SCORINGS:
        raise UnsupportedConfig(
            f"lynx-sglang: layer {layer} scores experts by {scoring}; selection follows "
            f"{' and '.join(SCORINGS)} routers"
        )
    if c.shared_experts.use_waterfill:
        raise UnsupportedConfig(f"lynx-sglang: layer {layer} appends shared experts by Waterfill")
    scale = c.routed_scaling_factor
    folded = bool(scale) and is_routed_scaling_factor_fused_in_topk(c)
    return Routing(
        scoring=scoring,
        renormalize=bool(c.renormalize),
        correction_bias=c.correction_bias,
        weight_scale=float(scale) if folded else 1.0,
        shared_columns=int(getattr(experts, "num_fused_shared_experts", 0) or 0),
    )


def spread_unused(slot_ids: torch.Tensor, unused: torch.Tensor, num_slots: int) -> torch.Tensor:
    """Give each row's unused choices (weight 0: another wave's, or padding) distinct slots
    that the row does not use, so no row names a slot twice. slot_ids, unused: [T, k]."""
    rows = slot_ids.shape[0]
    taken = torch.zeros(rows, num_slots + 1, dtype=torch.bool, device=slot_ids.device)
    taken.scatter_(1, torch.where(unused, num_slots, slot_ids.long()), True)  # [T, K + 1]
    free_first = torch.sort(taken[:, :num_slots].to(torch.int8), dim=1, stable=True).indices
    nth = (unused.long().cumsum(1) - 1).clamp(min=0)  # [T, k] rank among the row's unused
    return torch.where(unused, free_first.gather(1, nth).to(slot_ids.dtype), slot_ids)
