"""Overlap-aware admission, core only: the prompt profiler against a hand-written reference, and
the queue order with its pass-over bound."""

from __future__ import annotations

import pytest
import torch

from lynx_sglang.offload.admission import OverlapAdmission, PromptProfiler

V, H, E, L, K = 50, 16, 8, 3, 2


def profiler(max_tokens: int = 1024) -> PromptProfiler:
    g = torch.Generator().manual_seed(0)
    embed = torch.randn(V, H, generator=g)
    norms = [(torch.rand(H, generator=g) + 0.5, 1e-6) for _ in range(L)]
    routers = [torch.randn(E, H, generator=g) for _ in range(L)]
    return PromptProfiler(embed, norms, routers, K, max_tokens)


def test_profile_is_each_layers_router_on_the_normed_embeddings():
    p = profiler()
    ids = [3, 7, 7, 41, 0]
    got = p(ids)
    assert got.shape == (L, E) and torch.allclose(got.sum(-1), torch.ones(L))
    x = p.embed[ids]
    for layer, ((w, eps), r) in enumerate(zip(p.norms, p.routers)):
        h = x / torch.sqrt((x**2).mean(-1, keepdim=True) + eps) * w
        counts = torch.zeros(E)
        for row in h @ r.T:
            for e in row.topk(K).indices:
                counts[e] += 1
        torch.testing.assert_close(got[layer], counts / (len(ids) * K))


def test_profile_reads_the_prompts_end_only():
    p = profiler(max_tokens=2)
    assert torch.equal(p([1, 2, 3, 4]), p([3, 4]))
    with pytest.raises(ValueError, match="one norm per router"):
        PromptProfiler(p.embed, p.norms[:1], p.routers, K)


def test_order_by_resident_mass_then_the_pass_over_bound():
    resident = torch.zeros(L, E, dtype=torch.bool)
    resident[:, :2] = True  # experts 0 and 1 of every layer
    on = torch.zeros(L, E)
    on[:, 0] = 1.0  # all its choices resident
    off = torch.zeros(L, E)
    off[:, 5] = 1.0  # none
    half = (on + off) / 2
    adm = OverlapAdmission(max_passed=2)
    assert adm.order(["a", "b", "c"], [off, half, on], resident) == [2, 1, 0]
    # "c" was admitted: "a" and "b" stood before it, each passed over once
    assert adm.order(["a", "b", "d"], [off, half, on], resident) == [2, 1, 0]
    assert adm.passed == {"a": 1, "b": 1}
    # "d" admitted: "a" and "b" passed over twice, so they go first, in queue order
    assert adm.order(["a", "b", "e"], [off, half, on], resident) == [0, 1, 2]
    assert adm.order(["b", "e"], [half, on], resident) == [0, 1]  # "a" admitted: nobody passed
    assert adm.passed == {"b": 2}  # a request gone is forgotten
    assert adm.order([], [], resident) == [] and adm.passed == {}


def test_a_bound_of_zero_is_the_base_order():
    adm = OverlapAdmission(max_passed=0)
    resident = torch.ones(L, E, dtype=torch.bool)
    profiles = [torch.full((L, E), v) for v in (0.1, 0.3, 0.2)]
    assert adm.order([1, 2, 3], profiles, resident) == [0, 1, 2]
    with pytest.raises(ValueError, match="max_passed"):
        OverlapAdmission(-1)
