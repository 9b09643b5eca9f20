"""Start-up validation: what is rejected (and why, in one line naming what is supported), what is
accepted, and the facts read from SGLang's real ServerArgs and Hugging Face configs."""

from __future__ import annotations

import pytest

from lynx_sglang.config import LynxConfig
from lynx_sglang.sglang.checks import (
    SUPPORTED,
    ServingFacts,
    UnsupportedConfig,
    check,
    moe_layer_ids,
    num_experts_of,
    problems,
)

# A supported single-GPU Qwen3-MoE server, graphs off.
GOOD = ServingFacts(
    tp_size=1, ep_size=1, dp_size=1, pp_size=1, quantization=None, moe_runner_backend="auto",
    moe_a2a_backend="none", load_format="auto", decode_graphs=False, prefill_graphs=False,
    torch_compile=False, speculative=False, paged_experts=False, ktransformers=False,
    eplb=False, architecture="Qwen3MoeForCausalLM", dtype="bfloat16", top_k=8, num_experts=64,
)  # fmt: skip


def facts(**changes) -> ServingFacts:
    from dataclasses import replace

    return replace(GOOD, **changes)


@pytest.mark.parametrize("mode", ["lynx", "offload", "lynx+offload"])
def test_supported_setups_pass(mode):
    check(LynxConfig(mode=mode, slots=16), GOOD)
    check(LynxConfig(mode=mode, slots=16), ServingFacts())  # nothing known yet: nothing judged


@pytest.mark.parametrize(
    "mode, changes, needle",
    [
        ("lynx", {"moe_runner_backend": "flashinfer_cutlass"}, "--moe-runner-backend flashinfer_cutlass"),
        ("offload", {"quantization": "gptq"}, "does not page gptq experts"),
        ("lynx+offload", {"quantization": "mxfp4"}, "does not page mxfp4 experts"),
        ("lynx", {"ep_size": 2}, "expert parallelism"),
        ("lynx", {"moe_a2a_backend": "deepep"}, "--moe-a2a-backend deepep"),
        ("lynx", {"dp_size": 2}, "data parallelism"),
        ("lynx", {"speculative": True}, "speculative decoding"),
        ("lynx", {"torch_compile": True}, "--enable-torch-compile"),
        ("lynx", {"architecture": "DeepseekV4ForCausalLM"}, "DeepSeek-V4 is not supported"),
        ("lynx", {"architecture": "GptOssForCausalLM"}, "GptOssForCausalLM"),
        ("lynx", {"dtype": "float8_e4m3fn"}, "dtype float8_e4m3fn"),
        ("offload", {"load_format": "dummy"}, "--load-format dummy"),
        ("offload", {"tp_size": 2}, "--tp-size 1"),
        ("offload", {"paged_experts": True}, "--enable-paged-experts"),
        ("lynx+offload", {"prefill_graphs": True}, "--disable-prefill-cuda-graph"),
        ("offload", {"top_k": 32}, "below the router's top-k (32)"),
    ],
)  # fmt: skip
def test_unsupported_setups_are_rejected_in_one_line(mode, changes, needle):
    with pytest.raises(UnsupportedConfig) as err:
        check(LynxConfig(mode=mode, slots=16), facts(**changes))
    message = str(err.value)
    assert needle in message and "\n" not in message
    assert message.endswith(SUPPORTED + ".")


def test_lynx_runs_on_sglang_paged_experts_and_graphs():
    """Selection alone is graph-safe and composes with --enable-paged-experts."""
    assert problems(LynxConfig(mode="lynx"), facts(paged_experts=True, decode_graphs=True)) == []


def test_graph_executor_needs_every_step_to_fit():
    cfg = LynxConfig(mode="offload", slots=16, executor="graph")
    assert "--lynx-executor graph" in " ".join(problems(cfg, facts(decode_graphs=True)))
    assert problems(cfg.replace(slots=0), facts(decode_graphs=True)) == []


def test_mode_off_accepts_anything():
    assert problems(LynxConfig(mode="off"), facts(ep_size=8, quantization="fp8")) == []


def test_moe_layers_and_experts_from_hf_configs():
    transformers = pytest.importorskip("transformers")
    qwen = transformers.Qwen3MoeConfig(
        num_hidden_layers=6, num_experts=64, decoder_sparse_step=2, mlp_only_layers=[3]
    )
    assert moe_layer_ids(qwen) == (1, 5)
    assert num_experts_of(qwen) == 64
    mixtral = transformers.MixtralConfig(num_hidden_layers=3, num_local_experts=8)
    assert moe_layer_ids(mixtral) == (0, 1, 2)
    assert num_experts_of(mixtral) == 8

    import torch

    from lynx_sglang.sglang.runtime import ModelFacts

    facts = ModelFacts.from_hf_config(qwen, torch.bfloat16)
    assert (facts.num_experts, facts.top_k, facts.moe_layer_ids) == (
        64,
        qwen.num_experts_per_tok,
        (1, 5),
    )
    assert facts.intermediate_size == qwen.moe_intermediate_size  # not the dense MLP's
    facts = ModelFacts.from_hf_config(mixtral, torch.bfloat16)
    assert facts.intermediate_size == mixtral.intermediate_size


def test_similar_policy_needs_bf16_weights():
    with pytest.raises(UnsupportedConfig, match="--lynx-policy similar reads bf16"):
        check(LynxConfig(mode="lynx", policy="similar"), facts(quantization="fp8"))


def test_hf_config_facts_name_the_checkpoint_format():
    transformers = pytest.importorskip("transformers")
    from lynx_sglang.sglang.checks import with_hf_config

    hf = transformers.Qwen3MoeConfig(num_experts=64, num_experts_per_tok=8)
    hf.architectures = ["Qwen3MoeForCausalLM"]
    f = with_hf_config(ServingFacts(), hf)
    assert (f.architecture, f.top_k, f.num_experts, f.quantization) == (
        "Qwen3MoeForCausalLM", 8, 64, None
    )  # fmt: skip
    hf.quantization_config = {"quant_method": "fp8"}
    fp8 = with_hf_config(f, hf)
    assert fp8.quantization == "fp8"
    assert problems(LynxConfig(mode="lynx"), fp8) == []  # selection rewrites ids of any format
    assert problems(LynxConfig(mode="offload", slots=16), fp8) == []  # paged as it is
    hf.quantization_config = {"quant_method": "awq"}
    (line,) = problems(LynxConfig(mode="offload", slots=16), with_hf_config(f, hf))
    assert "does not page awq experts" in line and "--lynx-mode lynx" in line


def test_facts_from_real_server_args():
    pytest.importorskip("sglang")
    from sglang.srt.server_args import prepare_server_args

    from lynx_sglang.sglang.checks import facts_from_server_args

    raw = prepare_server_args(
        ["--model-path", "m", "--disable-cuda-graph", "--ep-size", "2", "--load-format", "dummy"]
    )
    f = facts_from_server_args(raw)
    assert (f.ep_size, f.load_format) == (2, "dummy")
    assert f.decode_graphs is False and f.prefill_graphs is False
    f = facts_from_server_args(prepare_server_args(["--model-path", "m"]))
    assert f.decode_graphs is None and f.prefill_graphs is None  # the default is decided later


def test_offload_runs_decode_graphs_with_the_hybrid_executor_only():
    """Hybrid (the default): captured decode steps device-side, so decode graphs are fine; the
    eager executor plans every step on the host and needs graphs off."""
    graphs = facts(decode_graphs=True)
    for mode in ("offload", "lynx+offload"):
        assert problems(LynxConfig(mode=mode, slots=16), graphs) == []
        eager = LynxConfig(mode=mode, slots=16, executor="eager")
        assert "--disable-cuda-graph" in " ".join(problems(eager, graphs))
        shared = LynxConfig(mode=mode, slots=16, slot_pool="shared")
        assert "--lynx-slot-pool layer" in " ".join(problems(shared, graphs))


def test_layer_budgets_name_real_layers():
    with pytest.raises(UnsupportedConfig, match="names MoE layer 4, but the model has 4"):
        check(LynxConfig(mode="lynx", layer_budgets="0:1.0,4:0.5"), facts(moe_layers=4))
    check(LynxConfig(mode="lynx", layer_budgets="0:1.0,3:0.5"), facts(moe_layers=4))


def test_hf_config_facts_count_the_moe_layers():
    from types import SimpleNamespace

    hf = SimpleNamespace(num_hidden_layers=6, mlp_only_layers=[0], decoder_sparse_step=1,
                         architectures=["Qwen3MoeForCausalLM"], num_experts=64,
                         num_experts_per_tok=8, torch_dtype="bfloat16")  # fmt: skip
    from lynx_sglang.sglang.checks import with_hf_config

    assert with_hf_config(ServingFacts(), hf).moe_layers == 5
