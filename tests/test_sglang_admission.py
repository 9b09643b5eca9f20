"""--lynx-admission overlap through SGLang's own scheduler classes on CPU: its real
``SchedulePolicy`` orders a queue of real ``Req`` objects, and our hook after its
``calc_priority`` reorders them by each prompt's estimated routing overlap with the experts the
cache holds; the profiler is found in a model the way the server's is."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("sglang")

from lynx_sglang.config import LynxConfig  # noqa: E402
from lynx_sglang.offload.admission import PromptProfiler  # noqa: E402
from lynx_sglang.sglang.runtime import LynxRuntime, ModelFacts, activated  # noqa: E402

E, K, H, INTER = 8, 2, 16, 8


class _NoTreeCache:
    """The radix cache SchedulePolicy asks about, disabled (as --disable-radix-cache)."""

    disable = True

    def supports_fast_match_prefix(self) -> bool:
        return False

    def supports_prefix_sharing(self) -> bool:
        return False


def runtime_for(admission: str, max_passed: int = 32) -> LynxRuntime:
    cfg = LynxConfig(mode="offload", slots=4, prefetch="off", executor="eager",
                     admission=admission, admission_max_passed=max_passed)  # fmt: skip
    facts = ModelFacts(E, K, H, INTER, (0,), torch.float32)
    rt = LynxRuntime(cfg, facts, torch.device("cpu"))
    # token t's embedding points at expert t % E of the one MoE layer's router
    embed = torch.cat([torch.eye(E).repeat(4, 1), torch.zeros(4 * E, H - E)], 1)
    router = torch.cat([torch.eye(E), torch.zeros(E, H - E)], 1)
    rt.profiler = PromptProfiler(embed, [(torch.ones(H), 1e-6)], [router], top_k=1)
    rt.cache.prepare(0, torch.tensor([[0, 1]]), decode=True)  # experts 0 and 1 resident
    return rt


def queue(*prompts):
    from sglang.srt.managers.schedule_batch import Req
    from sglang.srt.sampling.sampling_params import SamplingParams

    return [Req(f"r{i}", "", list(p), SamplingParams(max_new_tokens=4))
            for i, p in enumerate(prompts)]  # fmt: skip


def policy():
    from sglang.srt.managers.schedule_policy import SchedulePolicy

    return SchedulePolicy("fcfs", _NoTreeCache(), False, False, False)


def test_the_hook_puts_the_resident_overlap_first(sglang_layers):
    cold, warm, half = [5, 6, 13], [0, 9, 8], [0, 6, 14]  # experts {5, 6}, {0, 1}, {0, 6}
    q = queue(cold, warm, half)
    with activated(runtime_for("overlap")):
        policy().calc_priority(q)
    assert [r.rid for r in q] == ["r1", "r2", "r0"]


def test_fcfs_leaves_sglangs_order(sglang_layers):
    q = queue([5, 6], [0, 1], [0, 6])
    with activated(runtime_for("fcfs")):
        policy().calc_priority(q)
    assert [r.rid for r in q] == ["r0", "r1", "r2"]
    with activated(None):  # the plugin off in this process
        policy().calc_priority(q)
    assert [r.rid for r in q] == ["r0", "r1", "r2"]


def test_a_request_passed_over_goes_first_at_the_bound(sglang_layers):
    rt = runtime_for("overlap", max_passed=1)
    q = queue([5, 6], [0, 1], [0, 9])
    with activated(rt):
        policy().calc_priority(q)
        assert [r.rid for r in q] == ["r1", "r2", "r0"]
        q.pop(0)  # SGLang's PrefillAdder admits the first
        policy().calc_priority(q)  # r0 stood before r1: passed over once, the bound
        assert [r.rid for r in q][0] == "r0"


def test_arrival_order_survives_our_reordering(sglang_layers):
    """SGLang's FCFS leaves the queue as the last call left it; ties go by arrival, not by our
    previous order, and a late arrival with the most overlap still goes first."""
    rt = runtime_for("overlap")
    q = queue([5, 6], [0, 9], [6, 5])  # r0 and r2 cold, r1 warm
    with activated(rt):
        policy().calc_priority(q)
        assert [r.rid for r in q] == ["r1", "r0", "r2"]
        q.reverse()  # whatever order the queue was left in
        q += queue([], [], [], [1, 8])[3:]  # a late warm arrival, "r3"
        policy().calc_priority(q)
    assert [r.rid for r in q] == ["r1", "r3", "r0", "r2"]


def test_overlap_admission_needs_offload_and_fcfs():
    from lynx_sglang.sglang.checks import ServingFacts, problems

    cfg = LynxConfig(mode="offload", admission="overlap")
    assert not problems(cfg, ServingFacts(schedule_policy="fcfs"))
    (lpm,) = problems(cfg, ServingFacts(schedule_policy="lpm"))
    assert "--schedule-policy lpm" in lpm and "\n" not in lpm
    assert problems(cfg, ServingFacts(schedule_policy="fcfs+priority"))
    (lynx,) = problems(LynxConfig(mode="lynx", admission="overlap"), ServingFacts())
    assert "needs --lynx-mode offload" in lynx


def test_the_profiler_is_found_in_the_model(sglang_layers):
    """The server's profiler: embed_tokens, each MoE layer's post_attention_layernorm (SGLang's
    RMSNorm) and gate, around a real FusedMoE."""
    from sglang.srt.layers.layernorm import RMSNorm
    from sglang.srt.layers.moe.fused_moe_triton.layer import FusedMoE

    from lynx_sglang.sglang.hooks import _prompt_profiler

    rt = runtime_for("overlap")
    with activated(rt):
        experts = FusedMoE(num_experts=E, hidden_size=H, intermediate_size=INTER, top_k=K,
                           layer_id=0, params_dtype=torch.float32, prefix="model.layers.0.mlp.experts")  # fmt: skip
    layer = torch.nn.Module()
    layer.post_attention_layernorm = RMSNorm(H, eps=1e-5)
    layer.mlp = torch.nn.Module()
    layer.mlp.experts, layer.mlp.gate = experts, torch.nn.Linear(H, E, bias=False)
    model = torch.nn.Module()
    model.model = torch.nn.Module()
    model.model.embed_tokens = torch.nn.Embedding(32, H)
    model.model.layers = torch.nn.ModuleList([layer])
    profiler = _prompt_profiler(rt, model)
    assert profiler.embed is model.model.embed_tokens.weight
    assert profiler.routers[0] is layer.mlp.gate.weight and profiler.norms[0][1] == 1e-5
    assert profiler([1, 2, 3]).shape == (1, E)
    del model.model.embed_tokens
    from lynx_sglang.sglang.checks import UnsupportedConfig

    with pytest.raises(UnsupportedConfig, match="embed_tokens") as err:
        _prompt_profiler(rt, model)
    assert "\n" not in str(err.value)
