"""The functions we hook into SGLang (registered in ``plugin.HOOKS``); each is a thin adapter.

- ``after_check_server_args``  main process: validate settings vs the resolved server config.
- ``around_load_model``        scheduler: build the runtime (host store, cache) then the model.
- ``around_forward_raw``       every forward: decode or not, and the real row count.
- ``around_capture_one_shape`` decode CUDA-graph capture: row count read from a device buffer.
- ``after_topk``               selection on the TopK output (decode batches only).
- ``before_fused_moe_init``    offload: hand each FusedMoE our quant method.

Heavy modules are imported inside the functions: plugins load in every SGLang process.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from typing import Any, Optional

import torch

from lynx_sglang.config import LynxConfig
from lynx_sglang.sglang import runtime as rt_mod

logger = logging.getLogger("lynx_sglang")


def config_from_env() -> LynxConfig:
    """The settings of this process (the launcher exports them as ``LYNX_*``)."""
    return LynxConfig.from_env()


# ---------------------------------------------------------------------------------------------
# Start-up
# ---------------------------------------------------------------------------------------------


def after_check_server_args(result: Any, server_args: Any) -> None:
    """Fail the launch early (main process) on a bad setting, missing hooks, or an
    unsupported server configuration."""
    from sglang.srt.arg_groups.overrides import resolving_view
    from sglang.srt.utils.hf_transformers_utils import get_config

    from lynx_sglang.sglang.checks import check, facts_from_server_args, with_hf_config
    from lynx_sglang.sglang.plugin import verify_hooks

    cfg = config_from_env()
    if cfg.mode == "off":
        return None
    verify_hooks(cfg)
    resolved = bool(getattr(server_args, "_resolution_finished", False))
    view = resolving_view(server_args) if resolved else server_args
    facts = facts_from_server_args(view, resolved=resolved)
    if resolved:  # the same (cached) config SGLang's resolution read
        hf_config = get_config(
            view.model_path,
            trust_remote_code=view.trust_remote_code,
            revision=view.revision,
            model_config_parser=view.model_config_parser,
        )
        facts = with_hf_config(facts, hf_config)
    check(cfg, facts)
    return None


def around_load_model(original: Callable, runner: Any, *args: Any, **kwargs: Any) -> Any:
    """Check everything against the model's config, build the runtime, load, check the layers."""
    from lynx_sglang.sglang.checks import check, facts_from_model_runner
    from lynx_sglang.sglang.plugin import verify_hooks

    cfg = config_from_env()
    if cfg.mode == "off":
        rt_mod.activate(None)
        return original(runner, *args, **kwargs)
    verify_hooks(cfg)
    check(cfg, facts_from_model_runner(runner))
    runtime = _start_runtime(cfg, runner)
    rt_mod.activate(runtime)
    try:
        result = original(runner, *args, **kwargs)
        _finish_load(runtime, runner.model)
    except BaseException:
        rt_mod.activate(None)
        raise
    return result


def _start_runtime(cfg: LynxConfig, runner: Any) -> rt_mod.LynxRuntime:
    from lynx_sglang.sglang import metrics
    from lynx_sglang.sglang.routing import prefetch_selector

    model_config = runner.model_config
    model = rt_mod.ModelFacts.from_hf_config(model_config.hf_config, model_config.dtype)
    device = torch.device(f"cuda:{runner.gpu_id}" if runner.device == "cuda" else runner.device)
    reporter = metrics.Reporter.from_server(cfg)
    runtime = rt_mod.LynxRuntime(cfg, model, device, stats=reporter.enabled)
    runtime.reporter = reporter
    reporter.attach(runtime)
    if runtime.cache is not None and runtime.params is not None and cfg.prefetch_select:
        runtime.cache.set_prefetch_select(prefetch_selector(runtime))
    logger.info("lynx-sglang: %s on %s", _describe(cfg, runtime), device)
    return runtime


def _finish_load(runtime: rt_mod.LynxRuntime, model: torch.nn.Module) -> None:
    """Every MoE layer runs on the triton runner (and, with offload, through our method);
    routers are handed to the cache for cross-layer prefetch."""
    from sglang.srt.layers.moe.fused_moe_triton.layer import FusedMoE

    from lynx_sglang.sglang.checks import SUPPORTED, UnsupportedConfig
    from lynx_sglang.sglang.moe_method import OffloadMoEMethod

    layers = [m for m in model.modules() if isinstance(m, FusedMoE)]
    problems = []
    if not layers:
        problems.append("the model has no FusedMoE layer")
    for layer in layers:
        backend = layer.runner_backend
        if backend is None or not backend.is_triton():
            problems.append(f"layer {layer.layer_id} runs on the {backend} MoE runner")
        if runtime.cache is not None and not isinstance(layer.quant_method, OffloadMoEMethod):
            problems.append(f"layer {layer.layer_id} was not wrapped for offload")
    if problems:
        raise UnsupportedConfig(
            f"lynx-sglang --lynx-mode {runtime.cfg.mode}: "
            + "; ".join(problems[:3])
            + f". {SUPPORTED}."
        )
    if runtime.cache is not None:
        for block in model.modules():
            experts, gate = getattr(block, "experts", None), getattr(block, "gate", None)
            if isinstance(experts, FusedMoE) and isinstance(
                getattr(gate, "weight", None), torch.Tensor
            ):
                runtime.cache.set_router(runtime.index(experts.layer_id), gate.weight)


def _describe(cfg: LynxConfig, runtime: rt_mod.LynxRuntime) -> str:
    parts = [f"mode={cfg.mode}"]
    if cfg.selection_on:
        parts.append(f"policy={cfg.policy} budget={cfg.budget} max_experts={cfg.max_experts}")
    if runtime.cache is not None:
        parts.append(
            f"slots={runtime.cache.num_slots}/{runtime.model.num_experts} pool={cfg.slot_pool} "
            f"eviction={cfg.eviction} prefetch={cfg.prefetch} executor={cfg.executor}"
        )
    return " ".join(parts)


# ---------------------------------------------------------------------------------------------
# Forward passes
# ---------------------------------------------------------------------------------------------


def around_forward_raw(
    original: Callable, runner: Any, forward_batch: Any, *args: Any, **kwargs: Any
) -> Any:
    """Scope the forward as a decode step (real rows = one token per request) or not."""
    runtime = rt_mod.active()
    if runtime is None or runner.is_draft_worker:
        return original(runner, forward_batch, *args, **kwargs)
    if forward_batch.forward_mode.is_decode():
        step = runtime.decode_step(int(forward_batch.batch_size))
    else:  # prefill, extend, mixed, idle, verify: untouched
        step = rt_mod.NOT_DECODE
    with runtime.scope(step):
        out = original(runner, forward_batch, *args, **kwargs)
    if runtime.reporter is not None:
        runtime.reporter.tick()
    return out


def around_capture_one_shape(
    original: Callable, graph_runner: Any, size: int, *args: Any, **kwargs: Any
) -> Any:
    """Capture a decode graph with the real row count read from a device buffer, which every
    decode forward writes before a replay."""
    runtime = rt_mod.active()
    model_runner = graph_runner.model_runner
    if (
        runtime is None
        or model_runner.is_draft_worker
        or not graph_runner.capture_forward_mode.is_decode()
    ):
        return original(graph_runner, size, *args, **kwargs)
    with runtime.scope(runtime.capture_step(size * graph_runner.captured_req_width)):
        return original(graph_runner, size, *args, **kwargs)


def after_topk(result: Any, topk: Any, *args: Any, **kwargs: Any) -> Any:
    """Lynx selection on a decode batch's TopK output (target model only)."""
    runtime = rt_mod.active()
    if runtime is None or runtime.params is None or topk.is_draft:
        return result
    from lynx_sglang.sglang.routing import select_topk_output

    return select_topk_output(runtime, topk.layer_id, result)


def before_fused_moe_init(layer: Any, *args: Any, **kwargs: Any) -> Optional[tuple]:
    """With offload on, construct the layer with our quant method (K slots over the host store)."""
    runtime = rt_mod.active()
    if runtime is None or runtime.cache is None:
        return None
    from lynx_sglang.sglang.checks import UnsupportedConfig
    from lynx_sglang.sglang.moe_method import OffloadMoEMethod

    bound = _fused_moe_signature().bind(layer, *args, **kwargs)
    given = bound.arguments
    if given.get("quant_config") is not None or given.get("quant_method") is not None:
        raise UnsupportedConfig(
            f"lynx-sglang offload: layer {given.get('layer_id')} is quantised; offload supports "
            "unquantised bf16/fp16 experts"
        )
    if given.get("num_fused_shared_experts"):
        raise UnsupportedConfig(
            "lynx-sglang offload: fused shared experts are not supported "
            "(add --disable-shared-experts-fusion)"
        )
    given["quant_method"] = OffloadMoEMethod(runtime, given["layer_id"])
    return bound.args, bound.kwargs


def _fused_moe_signature() -> inspect.Signature:
    """The signature of the original ``FusedMoE.__init__`` (hook wrappers keep ``__wrapped__``)."""
    from sglang.srt.layers.moe.fused_moe_triton.layer import FusedMoE

    return inspect.signature(FusedMoE.__init__)
