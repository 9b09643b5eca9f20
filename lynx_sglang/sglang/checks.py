"""Which serving configurations the plugin supports, checked before any weight is loaded.

``problems(cfg, facts)`` is a pure function over ``ServingFacts``, so the launcher (from the raw
flags, some facts still unknown) and the model-load hook (from the resolved server config and the
model's config) share one rule set. Unknown facts (None) are not judged.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

from lynx_sglang.config import LynxConfig

# Model architectures whose MoE blocks route through SGLang's TopK + FusedMoE, by routing family:
# softmax top-k (Qwen2-MoE's block, shared in Qwen3-Next and Qwen3.5, adds a gated shared expert
# outside the FusedMoE), and DeepSeek's sigmoid, bias-chosen grouped top-k (DeepseekV2MoE; GLM-4.5's
# block routes the same way), whose shared experts SGLang may fuse into the FusedMoE.
SUPPORTED_ARCHITECTURES = {
    "MixtralForCausalLM": "Mixtral",
    "Qwen3MoeForCausalLM": "Qwen3-MoE",
    "Qwen2MoeForCausalLM": "Qwen2-MoE",
    "Qwen3NextForCausalLM": "Qwen3-Next",
    "Qwen3_5MoeForConditionalGeneration": "Qwen3.5-MoE",
    "Qwen3_5MoeForCausalLM": "Qwen3.5-MoE (text)",
    "OlmoeForCausalLM": "OLMoE",
    "DeepseekV2ForCausalLM": "DeepSeek-V2",
    "DeepseekV3ForCausalLM": "DeepSeek-V3 / Kimi K2",
    "DeepseekV32ForCausalLM": "DeepSeek-V3.2",
    "Glm4MoeForCausalLM": "GLM-4.5",
}
# Architectures refused with their own reason (the generic one would not say what to do).
REFUSED_ARCHITECTURES = {
    "DeepseekV4ForCausalLM": (
        "DeepSeek-V4 is not supported: its hash-routed layers and sqrtsoftplus router are not "
        "served by lynx-sglang's selection"
    ),
}
SUPPORTED_DTYPES = ("bfloat16", "float16", "float32")
# Checkpoint formats whose experts the offload modes page: every per-expert tensor of the layer's
# own quant method (weights and scales) in the host store and the slots, its kernel on the slots.
# `lynx` alone serves any quant method whose layer runs on the triton MoE runner.
OFFLOAD_QUANTIZATIONS = ("fp8", "w8a8_fp8", "w8a8_int8", "moe_wna16")
OFFLOAD_FORMATS = (
    "bf16/fp16, FP8 checkpoints (block or per-channel: fp8, w8a8_fp8), SGLang's online FP8 of a "
    "bf16/fp16 checkpoint (--quantization fp8), W8A8 int8 (w8a8_int8) and symmetric GPTQ/AWQ "
    "int4/int8 through SGLang's triton w4a16 path (--quantization moe_wna16)"
)
SUPPORTED_RUNNERS = ("auto", "triton")

SUPPORTED = (
    "lynx-sglang supports MoE on the triton MoE runner "
    f"({', '.join(SUPPORTED_ARCHITECTURES.values())}), single data-parallel rank, "
    "no expert parallelism, no speculative decoding, no torch.compile; "
    f"offload also needs experts in {OFFLOAD_FORMATS}, --tp-size 1, real weights, "
    "top_k <= --lynx-slots <= experts, shared "
    "experts unfused (--disable-shared-experts-fusion), prefill CUDA graphs off "
    "(--disable-prefill-cuda-graph), and --disable-cuda-graph with --lynx-executor eager"
)


class UnsupportedConfig(RuntimeError):
    """The server or model configuration is outside what the plugin supports (one line)."""


@dataclass(frozen=True)
class ServingFacts:
    """What the checks need to know about the server and the model; None means not known yet."""

    tp_size: Optional[int] = None
    ep_size: Optional[int] = None
    dp_size: Optional[int] = None
    pp_size: Optional[int] = None
    quantization: Optional[str] = None
    moe_runner_backend: Optional[str] = None
    moe_a2a_backend: Optional[str] = None
    load_format: Optional[str] = None
    decode_graphs: Optional[bool] = None  # decode steps may run in a captured CUDA graph
    prefill_graphs: Optional[bool] = None  # prefill/extend steps may run in a CUDA graph
    torch_compile: Optional[bool] = None
    speculative: Optional[bool] = None
    paged_experts: Optional[bool] = None
    ktransformers: Optional[bool] = None
    eplb: Optional[bool] = None
    schedule_policy: Optional[str] = None  # --schedule-policy, "+priority" with priority scheduling
    architecture: Optional[str] = None
    dtype: Optional[str] = None
    top_k: Optional[int] = None
    num_experts: Optional[int] = None
    moe_layers: Optional[int] = None  # MoE layers (the index space of --lynx-layer-budgets)


def problems(cfg: LynxConfig, facts: ServingFacts) -> list[str]:
    """Every reason ``cfg`` cannot run under ``facts`` (empty when it can, or mode is off)."""
    if cfg.mode == "off":
        return []
    out: list[str] = []
    f = facts
    if f.architecture in REFUSED_ARCHITECTURES:
        out.append(REFUSED_ARCHITECTURES[f.architecture])
    elif f.architecture is not None and f.architecture not in SUPPORTED_ARCHITECTURES:
        out.append(f"model architecture {f.architecture} is not supported")
    quantized = f.quantization not in (None, "", "none")
    if quantized and cfg.offload_on and f.quantization not in OFFLOAD_QUANTIZATIONS:
        model = SUPPORTED_ARCHITECTURES.get(f.architecture or "", "the model")
        out.append(
            f"--lynx-mode {cfg.mode} does not page {f.quantization} experts ({model}'s "
            f"checkpoint; Marlin repacks after loading): it pages {OFFLOAD_FORMATS} "
            "(or use --lynx-mode lynx)"
        )
    if cfg.admission != "fcfs" and not cfg.offload_on:
        out.append(
            f"--lynx-admission {cfg.admission} orders the queue by what the expert cache holds: "
            "it needs --lynx-mode offload or lynx+offload"
        )
    elif cfg.admission != "fcfs" and f.schedule_policy not in (None, "fcfs"):
        out.append(
            f"--lynx-admission {cfg.admission} reorders SGLang's FCFS queue; this server runs "
            f"--schedule-policy {f.schedule_policy} (use --schedule-policy fcfs without "
            "--enable-priority-scheduling, or --lynx-admission fcfs)"
        )
    if cfg.expert_format != "checkpoint" and not cfg.offload_on:
        out.append(
            f"--lynx-expert-format {cfg.expert_format} is what the expert cache holds: it needs "
            "--lynx-mode offload or lynx+offload"
        )
    elif cfg.expert_format != "checkpoint" and quantized:
        out.append(
            f"--lynx-expert-format {cfg.expert_format} quantises a bf16/fp16 checkpoint; this one "
            f"is already {f.quantization} (leave --lynx-expert-format checkpoint)"
        )
    if (
        (quantized or cfg.expert_format != "checkpoint")
        and cfg.selection_on
        and cfg.policy == "similar"
    ):
        out.append(
            f"--lynx-policy similar reads bf16 expert weights, not {f.quantization or cfg.expert_format} ones "
            "(use --lynx-policy lynx)"
        )
    if f.dtype is not None and f.dtype not in SUPPORTED_DTYPES:
        out.append(f"dtype {f.dtype} is not supported")
    if f.moe_runner_backend is not None and f.moe_runner_backend not in SUPPORTED_RUNNERS:
        out.append(f"--moe-runner-backend {f.moe_runner_backend} is not supported (use triton)")
    if f.moe_a2a_backend not in (None, "none"):
        out.append(f"--moe-a2a-backend {f.moe_a2a_backend} is not supported")
    if (f.ep_size or 1) > 1:
        out.append("expert parallelism (--ep-size > 1) is not supported")
    if (f.dp_size or 1) > 1:
        out.append("data parallelism (--dp-size / --attn-dp-size > 1) is not supported")
    if (f.pp_size or 1) > 1:
        out.append("pipeline parallelism (--pp-size > 1) is not supported")
    if f.speculative:
        out.append("speculative decoding is not supported")
    if f.torch_compile:
        out.append("--enable-torch-compile is not supported")
    if f.eplb:
        out.append("--enable-eplb is not supported")
    if f.ktransformers:
        out.append("KTransformers expert offload (--kt-*) is not supported")
    if f.top_k is not None and f.top_k < 1:
        out.append(f"router top-k {f.top_k} is invalid")
    if cfg.selection_on:
        out.extend(_selection_problems(cfg, f))
    if cfg.offload_on:
        out.extend(_offload_problems(cfg, f))
    return out


def _selection_problems(cfg: LynxConfig, f: ServingFacts) -> list[str]:
    out: list[str] = []
    layers = cfg.selection.layer_budget_map
    if f.moe_layers is not None and layers and max(layers) >= f.moe_layers:
        out.append(
            f"--lynx-layer-budgets names MoE layer {max(layers)}, but the model has "
            f"{f.moe_layers} MoE layers (indices 0..{f.moe_layers - 1})"
        )
    return out


def _offload_problems(cfg: LynxConfig, f: ServingFacts) -> list[str]:
    out: list[str] = []
    if f.paged_experts:
        out.append(
            f"--lynx-mode {cfg.mode} cannot be combined with --enable-paged-experts "
            "(two expert caches); use --lynx-mode lynx on top of paged experts"
        )
    if (f.tp_size or 1) > 1:
        out.append("offload needs a single GPU (--tp-size 1)")
    if f.load_format == "dummy":
        out.append("--load-format dummy cannot be offloaded: the host store needs real weights")
    if f.top_k is not None and cfg.slots and cfg.slots < f.top_k:
        out.append(f"--lynx-slots {cfg.slots} is below the router's top-k ({f.top_k})")
    if cfg.executor == "eager" and (f.decode_graphs or f.prefill_graphs):
        out.append(
            "--lynx-executor eager plans expert copies on the host and cannot run inside a "
            "CUDA graph: add --disable-cuda-graph (or use --lynx-executor hybrid)"
        )
    elif f.prefill_graphs:
        out.append(
            "prefill steps are host-planned (in waves) and cannot run inside a prefill CUDA "
            "graph: add --disable-prefill-cuda-graph"
        )
    if cfg.executor == "hybrid" and cfg.slot_pool == "shared" and f.decode_graphs:
        out.append(
            "--lynx-slot-pool shared cannot guarantee captured steps their slots: use "
            "--lynx-slot-pool layer with CUDA graphs"
        )
    if cfg.executor == "graph" and f.num_experts is not None and 0 < cfg.slots < f.num_experts:
        out.append(
            "--lynx-executor graph serves only steps whose experts fit the free slots, which "
            "prefill batches do not: use --lynx-executor eager with --disable-cuda-graph "
            "(or --lynx-slots 0, all experts resident)"
        )
    return out


def check(cfg: LynxConfig, facts: ServingFacts) -> None:
    """Raise ``UnsupportedConfig`` naming every problem and what is supported."""
    found = problems(cfg, facts)
    if found:
        raise UnsupportedConfig(
            f"lynx-sglang --lynx-mode {cfg.mode}: " + "; ".join(found) + f". {SUPPORTED}."
        )


# ---------------------------------------------------------------------------------------------
# Facts from SGLang objects (duck-typed: only attribute reads, so these stay import-free).
# ---------------------------------------------------------------------------------------------


def facts_from_server_args(args: Any, resolved: bool = False) -> ServingFacts:
    """Facts from ``ServerArgs`` flags. Raw flags (``resolved=False``, the launcher) only say for
    sure that graphs are off; a resolved view (SGLang's ``resolving_view``) says either way."""
    graphs = getattr(args, "cuda_graph_config", None)
    if resolved and graphs is not None:
        decode_graphs: Optional[bool] = graphs.decode.backend != "disabled"
        prefill_graphs: Optional[bool] = graphs.prefill.backend != "disabled"
    else:
        decode_off = bool(
            args.disable_cuda_graph
            or args.disable_decode_cuda_graph
            or args.cuda_graph_backend_decode == "disabled"
        )
        prefill_off = bool(
            args.disable_cuda_graph
            or args.disable_prefill_cuda_graph
            or args.cuda_graph_backend_prefill == "disabled"
        )
        decode_graphs = False if decode_off and graphs is None else None
        prefill_graphs = False if prefill_off and graphs is None else None
    return ServingFacts(
        tp_size=args.tp_size,
        ep_size=args.ep_size,
        dp_size=max(args.dp_size or 1, getattr(args, "attn_dp_size", 1) or 1),
        pp_size=args.pp_size,
        quantization=args.quantization,
        moe_runner_backend=_plain(args.moe_runner_backend),
        moe_a2a_backend=_plain(args.moe_a2a_backend),
        load_format=_plain(args.load_format),
        decode_graphs=decode_graphs,
        prefill_graphs=prefill_graphs,
        torch_compile=args.enable_torch_compile,
        speculative=args.speculative_algorithm is not None,
        paged_experts=args.enable_paged_experts,
        ktransformers=args.kt_weight_path is not None,
        eplb=args.enable_eplb,
        schedule_policy=str(args.schedule_policy)
        + ("+priority" if getattr(args, "enable_priority_scheduling", False) else ""),
    )


def with_hf_config(facts: ServingFacts, hf_config: Any) -> ServingFacts:
    """``facts`` plus what the model's Hugging Face config says (architecture, experts, top-k,
    a checkpoint quantisation)."""
    architectures = getattr(hf_config, "architectures", None) or [None]
    text = text_config(hf_config)
    quant = checkpoint_quantization(hf_config)
    return dataclasses.replace(
        facts,
        architecture=architectures[0],
        top_k=getattr(text, "num_experts_per_tok", None),
        num_experts=num_experts_of(text),
        moe_layers=len(moe_layer_ids(hf_config)) if hasattr(text, "num_hidden_layers") else None,
        quantization=facts.quantization or quant,
    )


def checkpoint_quantization(hf_config: Any) -> Optional[str]:
    """The checkpoint's quantisation method (its ``quantization_config``), or None."""
    quant = getattr(hf_config, "quantization_config", None) or getattr(
        text_config(hf_config), "quantization_config", None
    )
    if quant is None:
        return None
    if isinstance(quant, dict):
        return quant.get("quant_method") or "quantised checkpoint"
    return getattr(quant, "quant_method", None) or "quantised checkpoint"


def text_config(hf_config: Any) -> Any:
    """The language model's config: a multimodal config's ``text_config`` (Qwen3.5), else itself."""
    text = getattr(hf_config, "text_config", None)
    return text if text is not None and hasattr(text, "num_hidden_layers") else hf_config


def moe_layer_ids(hf_config: Any) -> tuple[int, ...]:
    """Decoder layers with a routed-expert MLP, by each family's rule as SGLang builds them:
    DeepSeek / GLM-4.5 (``n_routed_experts``): layers from ``first_k_dense_replace`` on (DeepSeek:
    every ``moe_layer_freq``-th); Qwen: not in ``mlp_only_layers``, every ``decoder_sparse_step``-th."""
    text = text_config(hf_config)
    num_layers = text.num_hidden_layers
    if getattr(text, "n_routed_experts", None):
        first = getattr(text, "first_k_dense_replace", 0) or 0
        glm = any(a.startswith("Glm4Moe") for a in getattr(hf_config, "architectures", None) or ())
        freq = 1 if glm else getattr(text, "moe_layer_freq", 1) or 1
        return tuple(i for i in range(num_layers) if i >= first and i % freq == 0)
    dense = set(getattr(text, "mlp_only_layers", None) or ())
    step = getattr(text, "decoder_sparse_step", 1) or 1
    return tuple(i for i in range(num_layers) if i not in dense and (i + 1) % step == 0)


def num_experts_of(hf_config: Any) -> Optional[int]:
    """Routed experts per layer (Mixtral: num_local_experts; Qwen/OLMoE: num_experts;
    DeepSeek/GLM: n_routed_experts); shared experts are not counted."""
    text = text_config(hf_config)
    for name in ("num_local_experts", "num_experts", "n_routed_experts"):
        value = getattr(text, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def facts_from_model_runner(runner: Any) -> ServingFacts:
    """Facts from a ``ModelRunner`` about to load its model: the resolved server config (read
    through SGLang's runtime context) plus the model's Hugging Face config."""
    from sglang.srt.model_executor.cuda_graph_config import (
        Backend,
        Phase,
        check_cuda_graph_backend,
    )
    from sglang.srt.runtime_context import get_exec, get_model, get_parallel, get_spec

    par, moe, graph = get_parallel(), get_exec().moe, get_exec().graph
    model_config = runner.model_config
    published = graph.cuda_graph_config is not None
    facts = ServingFacts(
        tp_size=par.tp_size,
        ep_size=par.moe_ep_size,
        dp_size=max(par.dp_size, par.attn_dp_size),
        pp_size=par.pp_size,
        quantization=getattr(model_config, "quantization", None) or get_model().quantization,
        moe_runner_backend=_plain(moe.moe_runner_backend),
        moe_a2a_backend=_plain(moe.moe_a2a_backend),
        load_format=_plain(get_model().load_format),
        decode_graphs=(
            not check_cuda_graph_backend(Phase.DECODE, Backend.DISABLED) if published else None
        ),
        prefill_graphs=(
            not check_cuda_graph_backend(Phase.PREFILL, Backend.DISABLED) if published else None
        ),
        torch_compile=graph.enable_torch_compile,
        speculative=get_spec().speculative_algorithm is not None or runner.is_draft_worker,
        paged_experts=moe.enable_paged_experts,
        ktransformers=moe.kt_weight_path is not None,
        eplb=moe.enable_eplb,
        dtype=str(model_config.dtype).removeprefix("torch."),
    )
    return with_hf_config(facts, model_config.hf_config)


def _plain(value: Any) -> Optional[str]:
    """An enum's value or the string itself (SGLang stores some choices as enums)."""
    return None if value is None else str(getattr(value, "value", value))
