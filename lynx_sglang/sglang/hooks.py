"""Every hook we place in SGLang: the table (``HOOKS``), its verification, and the functions.

Only what SGLang offers no other way to reach is hooked; each function is a thin adapter:
- ``after_check_server_args``  main process: validate settings vs the resolved server config.
- ``around_load_model``        scheduler: build the runtime (host store, cache) then the model.
- ``around_forward_raw``       every forward: decode or not, and the real row count.
- ``around_capture_one_shape`` decode CUDA-graph capture: row count read from a device buffer.
- ``around_fused_moe_init``    every FusedMoE gets ``LynxMoEMethod`` around its own method,
                               where the whole layer step runs (``lynx_sglang.step``).

Heavy modules are imported inside the functions: plugins load in every SGLang process.
"""

from __future__ import annotations

import inspect
import logging
import sys
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from sglang.srt.plugins.hook_registry import HookType

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
    if runtime.capture_cap is not None:  # K is known once the layers stated their format
        from sglang.srt.runtime_context import get_exec

        cap_decode_graphs(get_exec().graph.cuda_graph_config, runtime.capture_cap)
    return result


def _start_runtime(cfg: LynxConfig, runner: Any) -> rt_mod.LynxRuntime:
    from lynx_sglang.sglang import metrics

    model_config = runner.model_config
    model = rt_mod.ModelFacts.from_hf_config(model_config.hf_config, model_config.dtype)
    device = torch.device(f"cuda:{runner.gpu_id}" if runner.device == "cuda" else runner.device)
    reporter = metrics.Reporter.from_server(cfg)
    runtime = rt_mod.LynxRuntime(cfg, model, device, stats=reporter.enabled)
    runtime.reporter = reporter
    reporter.attach(runtime)
    return runtime


def cap_decode_graphs(graph_config: Any, cap: int) -> None:
    """Capture decode CUDA graphs only at batch sizes up to ``cap`` (every step of them fits the
    slots in one wave, served by the device-side executor inside the graph); larger batches run
    eager, host-planned, in waves. The cap itself is captured so smaller batches pad to it.
    ``graph_config`` is SGLang's resolved ``CudaGraphConfig`` (None: graphs not configured)."""
    decode = getattr(graph_config, "decode", None)
    if decode is None or not decode.bs:
        return
    top = min(cap, max(decode.bs))
    sizes = sorted({bs for bs in decode.bs if bs <= top} | {top})
    if sizes != list(decode.bs):
        logger.info("lynx-sglang: decode CUDA graphs captured at batch sizes %s", sizes)
    decode.bs = sizes  # rebound, never mutated in place (SGLang shares the list)
    decode.max_bs = top


def _finish_load(runtime: rt_mod.LynxRuntime, model: torch.nn.Module) -> None:
    """Every MoE layer runs on the triton runner through our method; routers are handed to
    the cache for cross-layer prefetch."""
    from sglang.srt.layers.moe.fused_moe_triton.layer import FusedMoE

    from lynx_sglang.sglang.checks import SUPPORTED, UnsupportedConfig
    from lynx_sglang.sglang.moe_method import LynxMoEMethod, routing_of

    layers = [m for m in model.modules() if isinstance(m, FusedMoE)]
    problems = []
    if not layers:
        problems.append("the model has no FusedMoE layer")
    for layer in layers:
        backend = layer.runner_backend
        if backend is None or not backend.is_triton():
            problems.append(f"layer {layer.layer_id} runs on the {backend} MoE runner")
        if not isinstance(layer.quant_method, LynxMoEMethod):
            problems.append(f"layer {layer.layer_id} was not wrapped by lynx-sglang")
    routers = {  # each FusedMoE's TopK: its sibling in the MoE block
        block.experts.layer_id: (block.topk, block.experts)
        for block in model.modules()
        if isinstance(getattr(block, "experts", None), FusedMoE) and hasattr(block, "topk")
    }
    for layer in layers:
        if layer.layer_id not in routers:
            problems.append(f"layer {layer.layer_id}'s router (its block's TopK) was not found")
    if problems:
        raise UnsupportedConfig(
            f"lynx-sglang --lynx-mode {runtime.cfg.mode}: "
            + "; ".join(problems[:3])
            + f". {SUPPORTED}."
        )
    for layer in layers:  # selection follows each layer's own routing rule
        runtime.routing[runtime.index(layer.layer_id)] = routing_of(*routers[layer.layer_id])
    if runtime.cache is not None:
        for block in model.modules():
            experts, gate = getattr(block, "experts", None), getattr(block, "gate", None)
            if isinstance(experts, FusedMoE) and isinstance(
                getattr(gate, "weight", None), torch.Tensor
            ):
                index = runtime.index(experts.layer_id)
                runtime.cache.set_router(index, gate.weight, runtime.routing[index])
    if runtime.admission is not None:
        runtime.profiler = _prompt_profiler(runtime, model)
    logger.info("lynx-sglang: %s on %s", _describe(runtime.cfg, runtime), runtime.device)


def _prompt_profiler(runtime: rt_mod.LynxRuntime, model: torch.nn.Module) -> Any:
    """--lynx-admission overlap's profiler: the model's token embeddings, and per MoE layer (in
    the cache's order) its decoder layer's pre-MoE RMSNorm and its router's weight."""
    from sglang.srt.layers.moe.fused_moe_triton.layer import FusedMoE

    from lynx_sglang.offload.admission import PromptProfiler
    from lynx_sglang.sglang.checks import UnsupportedConfig

    embed = getattr(getattr(model, "model", model), "embed_tokens", None)
    found = {}
    for block in model.modules():
        mlp, norm = getattr(block, "mlp", None), getattr(block, "post_attention_layernorm", None)
        experts, gate = getattr(mlp, "experts", None), getattr(mlp, "gate", None)
        if isinstance(experts, FusedMoE) and norm is not None and gate is not None:
            eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))
            found[runtime.index(experts.layer_id)] = ((norm.weight, float(eps)), gate.weight)
    if embed is None or sorted(found) != list(range(len(runtime.model.moe_layer_ids))):
        raise UnsupportedConfig(
            "lynx-sglang: --lynx-admission overlap reads the model's embed_tokens and each MoE "
            "layer's post_attention_layernorm and gate, which this model does not name so"
        )
    norms, routers = zip(*(found[i] for i in sorted(found)))
    return PromptProfiler(embed.weight, norms, routers, runtime.model.top_k)


def after_calc_priority(result: Any, policy: Any, waiting_queue: list, *args: Any, **kw: Any):
    """SGLang's scheduler ordered its waiting queue; with --lynx-admission overlap, reorder it
    by each request's estimated overlap with the resident experts (within the bound)."""
    runtime = rt_mod.active()
    if runtime is not None and runtime.admission is not None and len(waiting_queue) > 1:
        runtime.order_queue(waiting_queue)
    return result


def _format(runtime: rt_mod.LynxRuntime) -> str:
    dtype = str(runtime.model.dtype).removeprefix("torch.")
    if runtime.cfg.expert_format == "fp8":
        return f"block-fp8 (quantised at load from {dtype})"
    if runtime.cfg.expert_format == "int4":
        return f"int4 w4a16, group 64 (quantised at load from {dtype})"
    return runtime.model.quantization or dtype


def _describe(cfg: LynxConfig, runtime: rt_mod.LynxRuntime) -> str:
    parts = [f"mode={cfg.mode}"]
    if cfg.selection_on:
        parts.append(f"policy={cfg.policy} budget={cfg.budget} max_experts={cfg.max_experts}")
        if cfg.layer_budgets:
            parts.append(f"layer_budgets={cfg.layer_budgets}")
        if runtime.cache is not None and cfg.selection.miss_aware:
            parts.append(f"miss_budget={cfg.miss_budget}")
    if runtime.cache is not None:
        store, cache = runtime.cache.store, runtime.cache
        slot_bytes = sum(t.numel() * t.element_size() for t in cache.slots.tensors.values())
        parts.append(
            f"slots={cache.num_slots}/{runtime.model.num_experts} pool={cfg.slot_pool} "
            f"eviction={cfg.eviction}"
            f"{f'(predictor={cfg.path_predictor})' if cfg.path_predictor else ''} "
            f"prefetch={cfg.prefetch} executor={cfg.executor} "
            f"admission={cfg.admission}"
            f"{f'(max_passed={cfg.admission_max_passed})' if cfg.admission != 'fcfs' else ''} "
            f"experts={_format(runtime)} "
            f"({store.nbytes_per_expert / 2**20:.2f} MiB each with scales) "
            f"host={store.buffer.numel() / 2**30:.2f} GiB gpu_slots={slot_bytes / 2**30:.2f} GiB"
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
    mode, requests = forward_batch.forward_mode, None
    if runtime.reads_requests:  # path eviction: each row's request row (no host read)
        runtime.reserve_requests(runner.req_to_token_pool.size + 1)
        requests = forward_batch.req_pool_indices  # decode: one token per request
    if mode.is_decode():
        step = runtime.decode_step(int(forward_batch.batch_size), requests)
    elif runtime.reads_requests and _is_prefill(mode):
        requests = torch.repeat_interleave(
            forward_batch.req_pool_indices,
            forward_batch.extend_seq_lens,
            output_size=int(forward_batch.extend_num_tokens),
        )
        step = runtime.prefill_step(requests)
    else:  # prefill, extend, mixed, idle, verify: untouched
        step = rt_mod.NOT_DECODE
    with runtime.scope(step):
        out = original(runner, forward_batch, *args, **kwargs)
    if runtime.reporter is not None:
        runtime.reporter.tick()
    return out


def _is_prefill(mode: Any) -> bool:
    """A pure prefill (extend) forward: every row a prompt token (not mixed with decode rows)."""
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    return mode == ForwardMode.EXTEND


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
    if runtime.reads_requests:
        runtime.reserve_requests(model_runner.req_to_token_pool.size + 1)
    with runtime.scope(runtime.capture_step(size * graph_runner.captured_req_width)):
        return original(graph_runner, size, *args, **kwargs)


def around_fused_moe_init(original: Callable, layer: Any, *args: Any, **kwargs: Any) -> None:
    """Give the layer ``LynxMoEMethod`` around its own quant method. With offload the method
    must be in place before the weights exist (they become K GPU slots), so it is passed in;
    otherwise the layer's own method (unquantised, or SGLang's paged experts) is wrapped."""
    runtime = rt_mod.active()
    if runtime is None:
        return original(layer, *args, **kwargs)
    from sglang.srt.layers.quantization.unquant import UnquantizedFusedMoEMethod

    from lynx_sglang.sglang.checks import UnsupportedConfig
    from lynx_sglang.sglang.moe_method import INT4_CONFIG, LynxMoEMethod

    bound = _fused_moe_signature().bind(layer, *args, **kwargs)
    bound.apply_defaults()
    given = bound.arguments
    if not runtime.cfg.offload_on:
        original(*bound.args, **bound.kwargs)
        layer.weight_load_method = layer.weight_load_method or layer.quant_method
        layer.quant_method = LynxMoEMethod(runtime, given["layer_id"], layer.quant_method)
        return None
    if given.get("quant_method") is not None:
        raise UnsupportedConfig(
            f"lynx-sglang offload: layer {given.get('layer_id')} comes with its own "
            f"{type(given['quant_method']).__name__}, which the expert cache does not page"
        )
    if given.get("num_fused_shared_experts"):
        raise UnsupportedConfig(
            "lynx-sglang offload: fused shared experts are not supported "
            "(add --disable-shared-experts-fusion)"
        )
    quant_config, prefix = given.get("quant_config"), given.get("prefix", "")

    def make_base(moe: Any) -> Any:
        """The method FusedMoE would choose itself (its quant config's, or unquantised), or
        with --lynx-expert-format fp8 SGLang's block-FP8 method, which the loaders below feed
        with the bf16 checkpoint quantised on the way into the host store."""
        if runtime.cfg.expert_format == "fp8" and quant_config is None:
            from sglang.srt.layers.quantization.fp8 import Fp8Config, Fp8MoEMethod

            block = Fp8Config(is_checkpoint_fp8_serialized=True, weight_block_size=[128, 128])
            return Fp8MoEMethod(block)
        if runtime.cfg.expert_format == "int4" and quant_config is None:
            from sglang.srt.layers.quantization.moe_wna16 import MoeWNA16Config, MoeWNA16Method

            return MoeWNA16Method(MoeWNA16Config.from_config(INT4_CONFIG))
        method = quant_config.get_quant_method(moe, prefix) if quant_config is not None else None
        return method if method is not None else UnquantizedFusedMoEMethod()

    given["quant_method"] = LynxMoEMethod(runtime, given["layer_id"], None, make_base)
    return original(*bound.args, **bound.kwargs)


def _fused_moe_signature() -> inspect.Signature:
    """The signature of the original ``FusedMoE.__init__`` (hook wrappers keep ``__wrapped__``)."""
    from sglang.srt.layers.moe.fused_moe_triton.layer import FusedMoE

    return inspect.signature(FusedMoE.__init__)


# ---------------------------------------------------------------------------------------------
# The table of hooks, and its verification
# ---------------------------------------------------------------------------------------------


class Hook(NamedTuple):
    """One hook: the SGLang function it wraps, our function, and how it wraps."""

    target: str
    fn: Callable
    kind: HookType


_RUNNER = "sglang.srt.model_executor.model_runner.ModelRunner"
_GRAPH = "sglang.srt.model_executor.runner.decode_cuda_graph_runner.DecodeCudaGraphRunner"

HOOKS: tuple[Hook, ...] = (
    # Main process: validate the lynx settings against the resolved server config.
    Hook(
        "sglang.srt.server_args.ServerArgs.check_server_args",
        after_check_server_args,
        HookType.AFTER,
    ),
    # Scheduler: build the runtime (store, cache) before the model is built; check after.
    Hook(f"{_RUNNER}.load_model", around_load_model, HookType.AROUND),
    # Every forward: is it a pure decode batch, and how many rows are real.
    Hook(f"{_RUNNER}._forward_raw", around_forward_raw, HookType.AROUND),
    Hook(f"{_GRAPH}.capture_one_shape", around_capture_one_shape, HookType.AROUND),
    # The scheduler's waiting queue, once SGLang's policy has ordered it (--lynx-admission).
    Hook(
        "sglang.srt.managers.schedule_policy.SchedulePolicy.calc_priority",
        after_calc_priority,
        HookType.AFTER,
    ),
    # Every MoE layer: our quant method around the layer's own, where the whole step runs.
    Hook(
        "sglang.srt.layers.moe.fused_moe_triton.layer.FusedMoE.__init__",
        around_fused_moe_init,
        HookType.AROUND,
    ),
)


class HooksMissing(RuntimeError):
    """A lynx mode was requested but some of our hooks are not installed (one line)."""


def times_installed(hook: Hook) -> int:
    """How many times ``hook.fn`` sits in the call chain of its target (0: not installed).

    Imports nothing: a target whose module was never imported cannot have been patched."""
    owner_path, attr = hook.target.rsplit(".", 1)
    owner = _imported(owner_path)
    if owner is None:
        return 0
    fn = owner.__dict__.get(attr) if isinstance(owner, type) else getattr(owner, attr, None)
    count = 0
    while fn is not None:
        cells = getattr(fn, "__closure__", None) or ()
        count += sum(1 for cell in cells if _cell(cell) is hook.fn)
        fn = getattr(fn, "__wrapped__", None)
    return count


def missing_hooks() -> list[str]:
    """Targets whose hook is not in the call chain."""
    return [hook.target for hook in HOOKS if times_installed(hook) == 0]


def verify_hooks(cfg: LynxConfig) -> None:
    """Raise ``HooksMissing`` when ``cfg`` asks for a mode and any hook is not installed."""
    if cfg.mode == "off":
        return
    missing = missing_hooks()
    if missing:
        raise HooksMissing(
            f"lynx-sglang --lynx-mode {cfg.mode}: the SGLang plugin hooks are not installed "
            f"({len(missing)} missing, e.g. {missing[0]}); check that the lynx_sglang plugin is "
            "installed (pip install -e .), not excluded by SGLANG_PLUGINS, and loaded without "
            "errors (see the SGLang log)"
        )


def _imported(path: str) -> object | None:
    """The object at dotted ``path`` if its module is already imported, else None."""
    parts = path.split(".")
    for i in range(len(parts), 0, -1):
        module = sys.modules.get(".".join(parts[:i]))
        if module is not None:
            obj: object = module
            for name in parts[i:]:
                obj = getattr(obj, name, None)
                if obj is None:
                    return None
            return obj
    return None


def _cell(cell: object) -> object:
    try:
        return cell.cell_contents  # type: ignore[attr-defined]
    except ValueError:  # an empty cell
        return None
