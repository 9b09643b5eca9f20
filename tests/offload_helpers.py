"""Shared builders for the offload tests (imported by test modules; pytest puts tests/ on the path)."""

import pytest
import torch

from lynx_sglang.moe import reference_kernel
from lynx_sglang.offload import HostExpertStore
from lynx_sglang.step import moe_layer_step

H, INTER = 16, 8  # hidden, intermediate


def make_store(num_layers: int = 3, num_experts: int = 12, seed: int = 0):
    """A float32 store with random experts; returns (store, [(w13 [E, 2I, H], w2 [E, H, I])] per layer)."""
    g = torch.Generator().manual_seed(seed)
    store = HostExpertStore(
        num_layers,
        num_experts,
        {"w13": (2 * INTER, H), "w2": (H, INTER)},
        torch.float32,
        headroom_gib=0,
    )
    weights = []
    for layer in range(num_layers):
        w13 = torch.randn(num_experts, 2 * INTER, H, generator=g) / H**0.5
        w2 = torch.randn(num_experts, H, INTER, generator=g) / INTER**0.5
        store.load_layer(layer, {"w13": w13, "w2": w2})
        weights.append((w13, w2))
    return store, weights


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one intra-op thread avoids spin contention on a shared 2-core machine.

    Autouse in every test module that imports it."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def forward(cache, layer, x, topk_ids, topk_w, scores=None, kernel=None):
    """The layer step through the cache: ``moe_layer_step`` with the reference kernel (or
    ``kernel``; selection off), or, with explicit ``scores`` for score-aware eviction, prepare
    and its waves."""
    kernel = kernel or reference_kernel(None, None)
    if scores is None:
        logits = torch.zeros(topk_ids.shape[0], cache.store.num_experts)
        return moe_layer_step(layer, x, topk_ids, topk_w, logits, kernel, cache=cache)
    plan, experts = cache.prepare(layer, topk_ids, scores), cache.slot_weights(layer)
    return sum(kernel(x, wave.slot_ids, wave.weights(topk_w), experts).float() for wave in plan)
