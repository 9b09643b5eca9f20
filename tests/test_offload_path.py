"""Path eviction (ExpertFlow's routing-path idea): the running requests' own routing decides
what leaves the slots. The history is torch on the step's device, updated without host reads."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from offload_helpers import H, forward, make_store, one_thread  # noqa: F401 (autouse fixture)

from lynx_sglang.config import CacheParams, ConfigError
from lynx_sglang.moe import fused_moe_ref
from lynx_sglang.offload import ExpertCache
from lynx_sglang.offload.path import RequestHistory, RequestPathPolicy


def ids(*rows: list[int]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.int32)


def reqs(*rows: int) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.int64)


def test_values_follow_the_running_requests():
    hist = RequestHistory(1, 8, "cpu", decay=0.5, rows=4)
    pol = RequestPathPolicy(hist, "numpy")
    # a prefill of requests 1 (routes to 0, 1 twice) and 2 (to 2, 3 once)
    pol.observe_requests(0, reqs(1, 1, 2), ids([0, 1], [0, 1], [2, 3]), False)
    p = pol.probabilities(0)
    assert p[[0, 1, 2, 3]].min() > p[4:].max() and p[0] == pytest.approx(1.0, abs=1e-5)
    # a decode step of request 1 alone: request 2 finished, its experts stop counting at once
    pol.observe_requests(0, reqs(1), ids([5, 6]), True)
    p = pol.probabilities(0)
    assert p[2] == 0 and p[3] == 0 and p[0] > 0 and p[5] > 0
    v = pol.value(np.zeros(8, dtype=int), np.arange(8))
    assert v[5] > v[7] and v[0] > v[7]


def test_graph_padding_rows_count_for_nothing():
    """A captured batch pads with request row 0 (SGLang's scratch row) and expert id -1."""
    a = RequestHistory(1, 8, "cpu", decay=0.8, rows=4)
    b = RequestHistory(1, 8, "cpu", decay=0.8, rows=4)
    real = a.observe(0, reqs(1, 3), ids([0, 1], [2, 3]), True)
    padded = b.observe(0, reqs(1, 3, 0, 0), ids([0, 1], [2, 3], [4, 5], [-1, -1]), True)
    assert torch.equal(real, padded)
    assert b.active[0] == 0 and torch.equal(a.hist, b.hist)


def test_device_and_host_policies_agree():
    """The graph executor's policy (torch values) and the eager one's (numpy) read one history
    the same way; over a run of steps they rank every expert alike."""
    g = torch.Generator().manual_seed(0)
    hist = RequestHistory(2, 16, "cpu", decay=0.9, rows=6)
    host, dev = RequestPathPolicy(hist, "numpy"), RequestPathPolicy(hist, "cpu")
    for step in range(12):
        decode = step % 4 != 0
        rows = reqs(*torch.randperm(5, generator=g)[:3].add(1).tolist())
        if not decode:
            rows = rows.repeat_interleave(2)
        topk = torch.stack([torch.randperm(16, generator=g)[:2] for _ in rows]).int()
        for layer in range(2):
            value = hist.observe(layer, rows, topk, decode)
            host.pred[layer] = value.numpy()
            dev.pred[layer].copy_(value)
    assert np.allclose(host.pred, dev.pred.numpy())


@pytest.mark.parametrize("executor", ["eager", "graph", "hybrid"])
def test_path_eviction_is_exact_and_keeps_the_running_requests_experts(executor):
    """Through every executor: outputs equal the resident layer's, and when a request has
    finished its experts leave first, where LRU evicts a running request's older ones."""
    store, weights = make_store(num_layers=1, num_experts=12)
    steps = [
        (ids([0, 1]), reqs(1), False),  # prefill of request 1
        (ids([2, 3]), reqs(2), False),  # prefill of request 2
        (ids([4, 5], [2, 3]), reqs(1, 2), True),  # both decode: 0, 1 leave (4 slots)
        (ids([0, 1]), reqs(1), True),  # request 2 finished; request 1 routes back to 0, 1
    ]
    g = torch.Generator().manual_seed(0)

    def serve(cache, with_requests):
        for topk, rows, decode in steps:
            x, w = torch.randn(topk.shape[0], H, generator=g), torch.full(topk.shape, 0.5)
            captured = executor == "graph" and decode
            r = rows if with_requests else None
            plan = cache.prepare(0, topk, None, None, captured, r, decode)
            out = sum(fused_moe_ref(x, *cache.slot_weights(0).values(), wave.slot_ids,
                                    wave.weights(w)) for wave in plan)  # fmt: skip
            assert torch.allclose(out, fused_moe_ref(x, *weights[0], topk, w), atol=1e-5)
            cache.end_step(0)
        return set(torch.nonzero(cache.resident_mask(0)).flatten().tolist())

    path = ExpertCache(store, 4, "cpu", 2, eviction="path", executor=executor, max_requests=3)
    lru = ExpertCache(store, 4, "cpu", 2, eviction="lru", executor=executor)
    assert serve(path, True) == {0, 1, 4, 5}  # request 2's 2, 3 made room
    assert serve(lru, False) == {0, 1, 2, 3}  # LRU: 4, 5 (same age as 2, 3) went


def test_requests_must_match_the_rows_and_be_reserved():
    store, _ = make_store(num_layers=1)
    cache = ExpertCache(store, 4, "cpu", 2, eviction="path")
    with pytest.raises(RuntimeError, match="reserve"):
        cache.prepare(0, ids([0, 1]), requests=reqs(1), decode=True)
    cache.reserve_requests(4)
    with pytest.raises(ValueError, match="request rows"):
        cache.prepare(0, ids([0, 1]), requests=reqs(1, 2), decode=True)
    cache.prepare(0, ids([0, 1]), requests=reqs(1), decode=True)


def test_path_decay_is_checked():
    with pytest.raises(ConfigError, match="--lynx-path-decay"):
        CacheParams(eviction="path", path_decay=1.0)
