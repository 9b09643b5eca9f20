"""The serving replay: admission, request lifetimes, exact loads, MIN, the path policy."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from bench import serve_replay as sr
from bench.projection import SHAPES, Hardware
from lynx_sglang import SHIPPED_MODEL
from lynx_sglang.model.qwen3_moe import MoEModel
from lynx_sglang.offload.path import PREDICTOR_FILE, PathPredictor


@pytest.fixture(scope="module")
def workload():
    model = MoEModel.from_pretrained(SHIPPED_MODEL)
    reqs = sr.make_requests(sr.task_tokens(SHIPPED_MODEL), 4, 0, 24, 10, 48, 24)
    return model, sr.route(model, reqs)


def _serve(W, system, cap=4, rate=4.0, policy=None):
    arrive = sr.arrivals(len(W.requests), rate, 0)
    run = sr.replay(W, arrive, system, cap, policy or sr.FCFS(), 16384, SHAPES["qwen3-30b-a3b"],
                    Hardware(), 130.0)  # fmt: skip
    return run, arrive


def test_requests_have_three_tasks_and_their_lengths(workload):
    _, W = workload
    assert {r.task for r in W.requests} == set(sr.TASKS)
    for r, ids in zip(W.requests, W.ids):
        assert len(r.tokens) == r.prompt + r.output
        assert ids.shape == (W.num_layers, len(r.tokens), W.top_k)


def test_admission_respects_the_cap_and_is_fcfs(workload):
    _, W = workload
    run, arrive = _serve(W, sr.Ours(W, W.num_experts // 2, "lru", None, 3), cap=3, rate=50.0)
    assert run.max_running <= 3
    assert max(run.batch[i] for i, k in enumerate(run.kind) if k == "decode") <= 3
    by_arrival = [r.rid for r in sorted(W.requests, key=lambda r: arrive[r.rid])]
    assert run.admission_order == by_arrival  # FCFS: admitted in arrival order
    assert any(run.admitted[r] > run.arrival[r] for r in run.arrival)  # some requests queued


def test_sglang_policy_orders_the_queue_as_fcfs_and_lof():
    policy = sr.sglang_policy("fcfs")
    reqs = [
        sr.Request(i, "code", torch.zeros(10, dtype=torch.long), 5, o)
        for i, o in enumerate((3, 9, 5))
    ]
    q = [sr._Waiting(r, float(i)) for i, r in enumerate(reqs)]
    policy.calc_priority(q)
    assert [w.rid for w in q] == [0, 1, 2]
    lof = sr.sglang_policy("lof")  # SGLang's longest-output-first reads max_new_tokens
    lof.calc_priority(q)
    assert [w.rid for w in q] == [1, 2, 0]


def test_every_request_finishes_with_its_tokens(workload):
    _, W = workload
    run, _ = _serve(W, sr.Ours(W, 16, "lru", None, 4))
    for r in W.requests:
        assert run.generated[r.rid] == r.output
        assert run.arrival[r.rid] <= run.admitted[r.rid] < run.first[r.rid] <= run.finish[r.rid]
    # each request's rows: its prompt once (prefill), then one decode row per later token
    rows = {}
    for step in run.schedule:
        for rid, pos in step:
            rows.setdefault(rid, []).append(pos)
    for r in W.requests:
        assert rows[r.rid] == list(range(r.prompt)) + list(r.decode_positions)


def test_loads_at_k_equal_e_are_an_independent_recount(workload):
    """Selection off, K = E: each expert of a layer loads once, when first needed; the distinct
    experts of every layer-step are those of the routing of the rows then running."""
    _, W = workload
    E = W.num_experts
    run, _ = _serve(W, sr.Ours(W, E, "lru", None, 4))
    counts = np.stack(run.counts)  # [N, L, 5]
    for layer in range(W.num_layers):
        used = set()
        for r, ids in zip(W.requests, W.ids):
            pos = list(range(r.prompt)) + list(r.decode_positions)
            used |= set(ids[layer, pos].reshape(-1).tolist())
        assert counts[:, layer, sr.MISSES].sum() == len(used)
    for n, step in enumerate(run.schedule):
        for layer in range(W.num_layers):
            want = {e for rid, p in step for e in W.ids[rid][layer, p].tolist()}
            assert counts[n, layer, sr.DISTINCT] == len(want)


def test_overlap_order_puts_the_most_resident_overlap_first(workload):
    """The replay's --admissions overlap: SGLang's order, then the library's OverlapAdmission
    on each request's profile; the embedding profile is the model's own routers on the prompt's
    embeddings; a full run admits every request."""
    model, W = workload
    oracle = sr.oracle_profiles(W)
    for prof in oracle.values():
        assert prof.shape == (W.num_layers, W.num_experts)
        assert torch.allclose(prof.sum(-1), torch.ones(W.num_layers))
    emb = sr.embedding_profiles(model, W)
    r = W.requests[0]
    x = model.embed_tokens(r.tokens[: r.prompt])
    for li, layer in enumerate(model.layers):
        top = layer.mlp.gate(layer.post_attention_layernorm(x)).topk(W.top_k, -1).indices
        want = torch.bincount(top.reshape(-1), minlength=W.num_experts) / top.numel()
        torch.testing.assert_close(emb[r.rid][li], want)
    system = sr.Ours(W, W.num_experts // 2, "lru", None, 4)
    for layer in range(W.num_layers):  # experts 0..2 of every layer resident
        system.cache.prepare(layer, torch.arange(3)[None, :], decode=True)
    best = max(oracle, key=lambda rid: float(oracle[rid][:, :3].sum()))
    q = [sr._Waiting(r, float(i)) for i, r in enumerate(W.requests)]
    sr.OverlapOrder(sr.FCFS(), oracle, system, max_passed=2).calc_priority(q)
    assert q[0].rid == best != W.requests[0].rid  # the most overlap first, whatever its arrival
    run, _ = _serve(W, sr.Ours(W, W.num_experts // 2, "lru", None, 3), cap=3, rate=50.0,
                    policy=sr.OverlapOrder(sr.FCFS(), emb, system, 2))  # fmt: skip
    assert sorted(run.admission_order) == sorted(r.rid for r in W.requests)


@pytest.mark.parametrize("eviction", ["lru", "lfu", "path", "learned"])
def test_min_is_a_lower_bound_of_every_policy(workload, eviction):
    model, W = workload
    K = W.num_experts // 4
    predictor = None
    if eviction == "learned":  # the shipped model's own, as the replay reads it
        c = model.config
        predictor = PathPredictor.load(Path(SHIPPED_MODEL) / PREDICTOR_FILE, c.num_hidden_layers,
                                       c.num_experts, 0.95)  # fmt: skip
    run, _ = _serve(W, sr.Ours(W, K, eviction, None, 4, predictor=predictor))
    run.slots = K
    row = sr.summarise(W, run, SHAPES["qwen3-30b-a3b"], W.num_layers)
    assert row["min_loads_total"] <= row["loads_total"]
    assert row["min_loads_per_decode_layer_step"] <= row["loads_per_decode_layer_step"] + 1e-9
    # MIN seeing h steps ahead: never below MIN, and MIN itself once h spans the trace
    ahead = row["horizon_decode_loads_over_min"]
    assert list(ahead) == [str(h) for h in sr.HORIZONS] and min(ahead.values()) >= 1.0
    trace = np.stack(run.needed)
    ids = torch.from_numpy(np.where(trace, np.arange(W.num_experts), -1))[:, :, None, :]
    whole = sr.peers.replay_belady(ids, W.num_experts, K, horizon=len(trace))
    assert np.array_equal(whole, sr.peers.replay_belady(ids, W.num_experts, K))
    if eviction in sr.PATHS:
        per = row["path_prediction_per_layer"]
        assert len(per) == W.num_layers and all(0 <= p["recall"] <= 1 for p in per)


def test_sglang_paged_matches_its_offline_replay(workload):
    """The live SGLang peer equals bench.peers' replay of the same trace."""
    from bench import peers

    _, W = workload
    K = W.num_experts // 4
    run, _ = _serve(W, sr.SGLangPaged(W, K))
    trace = np.stack(run.needed)
    ids = torch.from_numpy(np.where(trace, np.arange(W.num_experts), -1))[:, :, None, :]
    assert np.array_equal(np.stack(run.counts), peers.replay_sglang_paged(ids, W.num_experts, K))


def test_selection_off_quality_is_exact_and_on_is_measured(workload):
    model, W = workload
    base, logp = sr.decoded_quality(model, W)
    run, _ = _serve(W, sr.Ours(W, 32, "lru", None, 4))
    same, _ = sr.decoded_quality(model, W, None, logp)
    assert np.allclose(same[:, :2], base[:, :2])
    assert np.abs(same[:, 2]).max() < 1e-3 * same[:, 3].max()  # the base's bf16 log-probs: ~0
    system = sr.Ours(W, 32, "lru", sr.quality.DEFAULT, 4)
    run, _ = _serve(W, system)
    per, _ = sr.decoded_quality(model, W, sr.ScheduleHook(run, system, W.offset), logp)
    assert not np.allclose(per[:, 0], base[:, 0])  # the selection moved choices: NLL changed
    assert per[:, 2].sum() > np.abs(same[:, 2]).sum()  # and the KL is above the bf16 noise
    q = sr.quality_row(per, base, [r.task for r in W.requests])
    assert q["all"]["verdict"] in ("met", "failed", "unresolved")
    assert q["all"]["tokens"] == sum(r.output - 1 for r in W.requests)


def test_quick_main_writes_a_compact_last_line(tmp_path, capsys):
    out = sr.main(["--quick", "--out-dir", str(tmp_path), "--no-plot", "--extra-waves", "1,3"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert len(last.encode()) <= 2048
    head = json.loads(last)
    assert head["bench"] == "serve_replay" and head["time_source"] == "projected"
    systems = {r["system"] for r in out["rows"]}
    assert {"offload (ours)", "sglang paged experts", "lynx+offload"} <= systems
    assert all(r["min_loads_total"] <= r["loads_total"] for r in out["rows"])
    # each valued eviction runs at every --extra-waves value, LRU (no planned end) at the first
    ours = [r for r in out["rows"] if r["system"] == "offload (ours)"]
    waves = {(r["eviction"], r["extra_waves"]) for r in ours}
    assert ("path", 3) in waves and ("path", 1) in waves and ("lru", 3) not in waves
    # the last line names the other values' rows only through each setting's best
    for setting in head["decode_loads_over_min"].values():
        assert not any("waves3" in name for name in setting if name != "best")
        label, ratio = setting["best"]
        assert ratio == min(v for k, v in setting.items() if k != "best") or "waves3" in label
    assert (tmp_path / "serve_replay_quick.json").exists()


def test_quality_pass_selects_what_the_replay_served(workload):
    """MoE layer 0 sees the unmodified model's routing in both: the quality pass's selection of
    every decode step there equals the experts the replay's cache served (miss-aware masks too)."""
    _, W = workload
    system = sr.Ours(W, 32, "lru", sr.quality.DEFAULT, 4)
    run, _ = _serve(W, system)
    hook = sr.ScheduleHook(run, system, W.offset)
    ids, _ = hook(0, W.flat[0][0][None], W.flat[1][0][None], W.flat[2][0][None])
    ids = ids[0]
    decode = [i for i, k in enumerate(run.kind) if k == "decode"]
    assert decode and not torch.equal(ids, W.flat[1][0])  # selection moved some choices
    for i in decode:
        served = np.zeros(W.num_experts, dtype=bool)
        for rid, pos in run.schedule[i]:
            served[ids[W.offset[rid] + pos].numpy()] = True
        assert np.array_equal(served, run.needed[i][0])


def test_flat_forward_equals_the_model(workload):
    """Bucketed attention + flat MoE rows give the model's own logits and routing."""
    model, W = workload
    reqs = W.requests[:5]
    hidden = sr.forward_flat(model, reqs)
    with torch.no_grad():
        out = model(sr.padded(reqs))
    for i, r in enumerate(reqs):
        S = len(r.tokens)
        assert torch.allclose(sr.lm_logits(model, hidden[i]), out.logits[i, :S], atol=1e-4)
        assert torch.equal(W.ids[i][0], out.topk_ids[0][i, :S].long())


def test_task_profiles_learn_each_tasks_experts_and_rank_the_running_mix():
    prof = sr.TaskProfiles(sr.TASKS, 2, 8, every=4)
    ids = torch.tensor([[1, 2], [1, 3], [5, 6]])
    prof.learn(0, ids, ["code", "code", "prose"])
    assert prof.hist["code"][0].tolist() == [0, 2, 1, 1, 0, 0, 0, 0]
    assert prof.hist["prose"][0][[5, 6]].tolist() == [1, 1] and prof.hist["docs"].sum() == 0
    assert prof.ranked(0, ["code"])[0] == 1
    assert set(prof.ranked(0, ["prose"])[:2].tolist()) == {5, 6}
    prof.learn(0, torch.tensor([[7, 7]]), ["code"])  # the old counts decay
    assert prof.hist["code"][0][7] == 2 and prof.hist["code"][0][1] == pytest.approx(2 * 0.98)
    assert prof.ranked(0, ["code"])[0] == 7
    with pytest.raises(ValueError, match="re-warm every"):
        sr.TaskProfiles(sr.TASKS, 2, 8, every=0)


def test_rewarm_copies_are_loads_and_min_stays_below(workload):
    """eMoE's periodic re-warm: every N decode steps the cache prefetches the running tasks'
    experts; those copies are counted as loads (bytes), and MIN is still a lower bound."""
    _, W = workload
    K = W.num_experts // 2
    system = sr.Ours(W, K, "lru", None, 4, rewarm=2)
    run, _ = _serve(W, system)
    run.slots = K
    counts = np.stack(run.counts)
    dec = np.array([k == "decode" for k in run.kind])
    assert counts[~dec][..., sr.PREFETCHED].sum() == 0  # only decode steps re-warm
    assert counts[dec][..., sr.PREFETCHED].sum() > 0
    row = sr.summarise(W, run, SHAPES["qwen3-30b-a3b"], W.num_layers)
    assert row["rewarm_loads_total"] == counts[..., sr.PREFETCHED].sum()
    assert row["loads_total"] == counts[..., sr.MISSES].sum() + row["rewarm_loads_total"]
    assert row["min_loads_total"] <= row["loads_total"]
    assert 0 <= row["decode_steps_single_task"] <= 1
    assert set(row["decode_steps_without_task"]) == set(sr.TASKS)
    for r in W.requests:  # the re-warm changes residency, never what is served
        assert run.generated[r.rid] == r.output


def test_cross_layer_prediction_is_the_next_router_on_the_moe_input(workload):
    """W.cross[l]: layer l's router on layer l-1's MoE input (the server's cross-layer
    prediction), checked on the model's own forward; a forecast equal to the routing scores 1."""
    model, W = workload
    r = W.requests[1]
    seen = []
    handle = model.layers[0].mlp.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    with torch.no_grad():
        model(r.tokens[None])
    handle.remove()
    want = (seen[0][0].float() @ model.layers[1].mlp.gate.weight.float().t()).topk(W.top_k).indices
    got = W.cross[1][W.offset[r.rid] : W.offset[r.rid] + len(r.tokens)]
    assert (got.sort(-1).values == want.sort(-1).values).float().mean() > 0.99  # fp ties aside
    assert (W.cross[0] == -1).all()
    run, _ = _serve(W, sr.Ours(W, 16, "lru", None, 4))
    scores = sr.predictor_scores(W, run)
    assert scores["cross_layer"][0] is None  # nothing predicts the first layer across layers
    for p in scores["cross_layer"][1:] + scores["previous_step"]:
        assert 0 < p["precision"] <= 1 and 0 < p["recall"] <= 1
    exact = sr.Workload(**{**W.__dict__, "cross": W.flat[1]})  # a perfect forecast
    assert all(p == {"precision": 1.0, "recall": 1.0}
               for p in sr.predictor_scores(exact, run)["cross_layer"])  # fmt: skip


def test_the_predictor_script_writes_what_the_cache_loads_and_beats_the_history(tmp_path):
    """bench.train_path_predictor on a small training-split sample: its file loads for the
    model (the server's check), and on its own held-out requests it forecasts the next token's
    experts better than the history it starts from."""
    from bench import train_path_predictor as tp

    out = tmp_path / "p.pt"
    res = tp.main(["--requests", "60", "--steps", "60", "--lr", "1e-2", "--out", str(out)])
    c = MoEModel.from_pretrained(SHIPPED_MODEL).config
    pred = PathPredictor.load(out, c.num_hidden_layers, c.num_experts, 0.95)
    assert pred.meta["split"].startswith("stdlib training split")
    assert np.mean(res["recall_learned"]) > np.mean(res["recall_path"])
    import sysconfig

    from lynx_sglang.model.corpus import split_corpus

    # the replay's docs task (pydoc_data's topics) is in the model's training split, not here
    topics = Path(sysconfig.get_paths()["stdlib"], "pydoc_data", "topics.py").read_text()[-2000:]
    assert topics in split_corpus()[0] and topics not in tp.training_text()
