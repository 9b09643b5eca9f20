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
from lynx_sglang.offload.path import PathPredictor, RequestHistory, RequestPathPolicy


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


# ------------------------------------------------------------ the learned routing-path predictor
def identity_predictor(L: int, E: int, decay: float, probs_weight: float = 0.0) -> PathPredictor:
    """weight 1 on logit(p): the history's own estimate (plus ``probs_weight`` x the softmax)."""
    w = torch.zeros(L, E, 3 * E)
    w[:, :, :E] = torch.eye(E)
    w[:, :, E : 2 * E] = probs_weight * torch.eye(E)
    return PathPredictor(w, torch.zeros(L, E), decay)


def _steps(g: torch.Generator, E: int, k: int):
    """A prefill of requests 1, 2 (three rows each), then decode steps of both or one."""
    out = [(reqs(1, 1, 1, 2, 2, 2), False)] + [(reqs(1, 2), True)] * 3 + [(reqs(2), True)] * 2
    for rows, decode in out:
        topk = torch.stack([torch.randperm(E, generator=g)[:k] for _ in rows]).int()
        yield rows, topk, torch.randn(len(rows), E, generator=g), decode


def test_an_identity_predictor_is_the_history_and_a_learned_one_reads_the_router():
    """With weight 1 on logit(p) the predictor returns the history's estimate, so the values are
    path eviction's own; a weight on the router's softmax moves them (the router is read)."""
    g = torch.Generator().manual_seed(0)
    E, k, d = 10, 2, 0.8
    plain = RequestHistory(1, E, "cpu", d, rows=4)
    same = RequestHistory(1, E, "cpu", d, rows=4, predictor=identity_predictor(1, E, d))
    moved = RequestHistory(1, E, "cpu", d, rows=4, predictor=identity_predictor(1, E, d, 3.0))
    for rows, topk, logits, decode in _steps(g, E, k):
        want = plain.observe(0, rows, topk, decode)
        got = same.observe(0, rows, topk, decode, logits)
        torch.testing.assert_close(got, want, atol=2e-4, rtol=0)
        got = moved.observe(0, rows, topk, decode, logits)
        assert (got - want).abs().max() > 0.05
    # the forecast of request 2 (the last step's only row): the map of its latest token
    p = (1 - d) * plain.hist[2, 0]
    chosen = torch.zeros(E).index_fill_(0, topk[0].long(), 1.0)
    expect = moved.predictor(0, p[None], torch.softmax(logits, -1), chosen[None])[0]
    torch.testing.assert_close(moved.next[2, 0], expect)
    with pytest.raises(RuntimeError, match="router logits"):  # a step without them is refused
        moved.observe(0, rows, topk, True)
    # a predictor that reads the MoE input: the forecast is its map of x too, and x is required
    w = torch.zeros(1, E, 3 * E + 4)
    w[0, :, 3 * E :] = torch.randn(E, 4, generator=g)
    wide = RequestHistory(1, E, "cpu", d, rows=4, predictor=PathPredictor(w, torch.zeros(1, E), d))
    x = torch.randn(len(rows), 4, generator=g)
    wide.observe(0, rows, topk, True, logits, x)
    torch.testing.assert_close(wide.next[2, 0], torch.sigmoid(w[0, :, 3 * E :] @ x[0]))
    with pytest.raises(RuntimeError, match="MoE input"):
        wide.observe(0, rows, topk, True, logits)


def test_training_rows_are_what_the_server_history_holds():
    """bench.train_path_predictor's rows equal RequestHistory's state at each decode step of one
    request: the p it predicts from, the latest token's softmax and choices, the next choices."""
    from bench.train_path_predictor import request_features

    g = torch.Generator().manual_seed(1)
    E, k, d, P, n_out = 12, 3, 0.9, 5, 7
    ids_ = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(P + n_out - 1)])
    logits = torch.randn(P + n_out - 1, E, generator=g)
    hidden = torch.randn(P + n_out - 1, 5, generator=g)
    p, probs, chosen, x, target = request_features(ids_, logits, P, n_out, d, E, hidden=hidden)
    hist = RequestHistory(1, E, "cpu", d, rows=2)
    hist.observe(0, reqs(*[1] * P), ids_[:P], False)
    for j, t in enumerate(range(P, P + n_out - 1)):
        torch.testing.assert_close(p[j], (1 - d) * hist.hist[1, 0])
        torch.testing.assert_close(probs[j], torch.softmax(logits[t - 1], -1))
        torch.testing.assert_close(x[j], hidden[t - 1])
        assert chosen[j].nonzero().flatten().tolist() == sorted(ids_[t - 1].tolist())
        assert target[j].nonzero().flatten().tolist() == sorted(ids_[t].tolist())
        hist.observe(0, reqs(1), ids_[t : t + 1], True)


def _predictor_file(tmp_path, L: int, E: int, decay: float, favour: list[int]) -> str:
    """A predictor that forecasts ``favour`` for every request, whatever it routed to."""
    bias = torch.full((L, E), -8.0)
    bias[:, favour] = 8.0
    path = tmp_path / "path_predictor.pt"
    PathPredictor(torch.zeros(L, E, 3 * E), bias, decay).save(path)
    return str(path)


@pytest.mark.parametrize("executor", ["eager", "graph", "hybrid"])
def test_a_learned_predictor_decides_eviction_through_every_executor(tmp_path, executor):
    """Loaded from its file through the config: the experts it forecasts stay resident, the
    history's own choice would not keep them, and the outputs stay the resident layer's."""
    store, weights = make_store(num_layers=1, num_experts=12)
    steps = [(ids([6, 7]), reqs(1), False)] + [(ids(e), reqs(1), True) for e in ([0, 1], [2, 3], [4, 5])]
    g = torch.Generator().manual_seed(0)

    def serve(cache):
        cache.reserve_requests(3)
        for topk, rows, decode in steps:
            x, w = torch.randn(1, H, generator=g), torch.full(topk.shape, 0.5)
            logits = torch.randn(1, 12, generator=g)
            plan = cache.prepare(0, topk, None, None, executor == "graph" and decode, rows, decode,
                                 logits)  # fmt: skip
            out = sum(fused_moe_ref(x, *cache.slot_weights(0).values(), wave.slot_ids,
                                    wave.weights(w)) for wave in plan)  # fmt: skip
            assert torch.allclose(out, fused_moe_ref(x, *weights[0], topk, w), atol=1e-5)
            cache.end_step(0)
        return set(torch.nonzero(cache.resident_mask(0)).flatten().tolist())

    file = _predictor_file(tmp_path, 1, 12, 0.5, [6, 7])
    params = CacheParams(slots=4, eviction="path", executor=executor, prefetch="off",
                         path_decay=0.5, path_predictor=file)  # fmt: skip
    learned = ExpertCache.from_config(store, params, "cpu", 2)
    plain = ExpertCache(store, 4, "cpu", 2, eviction="path", executor=executor, path_decay=0.5)
    assert serve(learned) == {4, 5, 6, 7}  # the forecast 6, 7 outlive 0..3
    assert serve(plain) == {2, 3, 4, 5}  # the history: 6, 7 decayed to 0, 1's value, older


def test_a_path_predictor_is_refused_in_one_line_where_it_cannot_serve(tmp_path):
    file = _predictor_file(tmp_path, 2, 16, 0.95, [0])
    with pytest.raises(ConfigError, match="--lynx-eviction path only"):
        CacheParams(eviction="lru", path_predictor=file)
    with pytest.raises(ConfigError, match="no such file"):
        CacheParams(eviction="path", path_predictor=str(tmp_path / "missing.pt"))
    with pytest.raises(ValueError, match="trained for 2 MoE layers of 16 experts"):
        PathPredictor.load(file, 4, 16, 0.95)
    with pytest.raises(ValueError, match="pass --lynx-path-decay 0.95"):
        PathPredictor.load(file, 2, 16, 0.9)
    wide = tmp_path / "wide.pt"  # reads a hidden state of 24
    PathPredictor(torch.zeros(2, 16, 3 * 16 + 24), torch.zeros(2, 16), 0.95).save(wide)
    assert PathPredictor.load(wide, 2, 16, 0.95, hidden_size=24).hidden_size == 24
    with pytest.raises(ValueError, match="reads a hidden state of 24; this model's is 32"):
        PathPredictor.load(wide, 2, 16, 0.95, hidden_size=32)
    (tmp_path / "junk.pt").write_bytes(b"not a predictor")
    with pytest.raises(ValueError, match="cannot read"):
        PathPredictor.load(tmp_path / "junk.pt", 2, 16, 0.95)
    with pytest.raises(ValueError, match="--lynx-eviction path only"):
        ExpertCache(make_store(num_layers=2, num_experts=16)[0], 4, "cpu", 2,
                    path_predictor=PathPredictor.load(file, 2, 16, 0.95))  # fmt: skip
