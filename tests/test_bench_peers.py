"""bench.peers: SGLang's paged-experts residency and Belady's MIN replayed on routing traces."""

from __future__ import annotations

import importlib.util
import inspect
import itertools
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("sglang")

from sglang.srt.layers.moe.paged_experts.residency import LRUPolicy, plan_waves  # noqa: E402

from bench.peers import COLUMNS, capture_cap, replay_belady, replay_sglang_paged  # noqa: E402

DISTINCT, HITS, MISSES, PREFETCHED, WAVES = range(len(COLUMNS))
SGLANG_PAGED = Path(importlib.util.find_spec("sglang").origin).parent / (
    "srt/layers/moe/paged_experts"
)


def one_per_step(experts: list[int]) -> torch.Tensor:
    """One layer, one token, top-1: expert ``experts[t]`` at step t. [N, 1, 1, 1]"""
    return torch.tensor(experts).view(-1, 1, 1, 1)


def steps_of(sets: list[list[int]], width: int) -> torch.Tensor:
    """One layer, one token whose ``width`` ids are each step's set, padded with -1. [N, 1, 1, w]"""
    rows = [s + [-1] * (width - len(s)) for s in sets]
    return torch.tensor(rows).view(len(sets), 1, 1, width)


def random_trace(seed: int, steps: int = 40, layers: int = 2, batch: int = 4, k: int = 4,
                 num_experts: int = 16) -> torch.Tensor:
    """Skewed routing, k distinct experts per token: [steps, layers, batch, k] int64."""
    g = torch.Generator().manual_seed(seed)
    popularity = torch.rand(layers, num_experts, generator=g) ** 3 + 0.02  # [L, E]
    ids = torch.empty(steps, layers, batch, k, dtype=torch.long)
    for layer in range(layers):
        w = popularity[layer].expand(steps * batch, -1)  # [steps*B, E]
        ids[:, layer] = torch.multinomial(w, k, generator=g).view(steps, batch, k)
    return ids


def optimal_misses(topk_ids: torch.Tensor, num_experts: int, slots: int) -> int:
    """Fewest misses of any residency, by exhaustive search over the resident sets (tiny E)."""
    best = {frozenset(range(slots)): 0}  # resident set -> fewest misses to reach it
    for layer_step in topk_ids[:, 0]:  # [B, k] each
        needed = {e for e in layer_step.flatten().tolist() if e >= 0}
        nxt: dict[frozenset, int] = {}
        for res, cost in best.items():
            cost += len(needed - res)
            pool = sorted(res | needed)
            forced = needed if len(needed) <= slots else set()  # all must be co-resident
            for keep in itertools.combinations(pool, min(slots, len(pool))):
                if forced <= set(keep):
                    key = frozenset(keep)
                    nxt[key] = min(nxt.get(key, cost), cost)
        best = nxt
    return min(best.values())


def test_sglang_residency_comes_from_the_installed_sglang():
    assert Path(inspect.getsourcefile(LRUPolicy)) == SGLANG_PAGED / "residency.py"
    assert inspect.getsourcefile(plan_waves) == inspect.getsourcefile(LRUPolicy)


def test_three_slots_lru_and_min_by_hand():
    # Slots start holding 0, 1, 2. LRU: 3 evicts 0, 0 evicts 1, 1 evicts 2, 2 evicts 3, hits on
    # 0 and 1, then 3 evicts 2. MIN: 3 evicts 2 (next use farthest), 2 evicts 3, 3 evicts 0
    # (0, 1, 2 never used again: the lowest id goes).
    ids = one_per_step([3, 0, 1, 2, 0, 1, 3])
    lru = replay_sglang_paged(ids, num_experts=4, slots=3)
    opt = replay_belady(ids, num_experts=4, slots=3)
    assert lru.shape == opt.shape == (7, 1, 5) and lru.dtype == opt.dtype == np.int64
    assert lru[:, 0, MISSES].tolist() == [1, 1, 1, 1, 0, 0, 1]
    assert lru[:, 0, HITS].tolist() == [0, 0, 0, 0, 1, 1, 0]
    assert opt[:, 0, MISSES].tolist() == [1, 0, 0, 1, 0, 0, 1]
    assert opt[:, 0, HITS].tolist() == [0, 1, 1, 0, 1, 1, 0]
    for out in (lru, opt):
        assert out[:, 0, DISTINCT].tolist() == [1] * 7
        assert out[:, 0, PREFETCHED].tolist() == [0] * 7
        assert out[:, 0, WAVES].tolist() == [1] * 7


def test_multi_expert_steps_by_hand():
    # Slots 0, 1, 2. LRU: {0, 3} bumps 0 and 3 evicts 1; {0, 1} has 1 evict 2; {0, 2} has 2 evict
    # 3. MIN: 3 evicts 2 (next needed after 1), {0, 1} hits both, 2 evicts 1 (1 and 3 are never
    # needed again: the lower id goes).
    ids = steps_of([[0, 3], [0, 1], [0, 2]], width=2)
    lru = replay_sglang_paged(ids, num_experts=4, slots=3)[:, 0]
    opt = replay_belady(ids, num_experts=4, slots=3)[:, 0]
    assert lru[:, HITS].tolist() == [1, 1, 1] and lru[:, MISSES].tolist() == [1, 1, 1]
    assert opt[:, HITS].tolist() == [1, 2, 1] and opt[:, MISSES].tolist() == [1, 0, 1]
    assert lru[:, DISTINCT].tolist() == opt[:, DISTINCT].tolist() == [2, 2, 2]

    # MIN never evicts an expert the step needs, though 0 is never needed again: 2 evicts 1.
    ids = steps_of([[0, 2], [1]], width=2)
    opt = replay_belady(ids, num_experts=3, slots=2)[:, 0]
    assert opt[:, HITS].tolist() == [1, 0] and opt[:, MISSES].tolist() == [1, 1]


def test_padding_ids_are_ignored():
    ids = random_trace(seed=3, steps=12)  # [12, 2, 4, 4]
    pad = torch.full((12, 2, 2, 4), -1, dtype=ids.dtype)
    padded = torch.cat([pad[:, :, :1], ids, pad[:, :, 1:]], dim=2)  # [12, 2, 6, 4]
    empty = torch.full((1, 2, 6, 4), -1, dtype=ids.dtype)  # an all-padding step
    padded = torch.cat([padded[:5], empty, padded[5:]]).to(torch.int16)  # [13, 2, 6, 4]
    for replay in (replay_sglang_paged, replay_belady):
        plain = replay(ids, num_experts=16, slots=8)
        out = replay(padded, num_experts=16, slots=8)
        assert out[5].tolist() == [[0, 0, 0, 0, 1]] * 2  # nothing needed, still one (empty) wave
        assert np.array_equal(np.delete(out, 5, axis=0), plain)


def test_overflow_step_runs_in_sglang_waves():
    # 4 slots (0..3). Step 0 needs 0..5: 4 hits, 2 misses, 2 waves; SGLang's second wave evicts
    # 0 and 1, while MIN keeps 0 (needed next). Step 1 needs 0. Step 2 needs 0..8: 3 waves.
    ids = steps_of([list(range(6)), [0], list(range(9))], width=9)
    lru = replay_sglang_paged(ids, num_experts=16, slots=4)[:, 0]
    opt = replay_belady(ids, num_experts=16, slots=4)[:, 0]
    assert lru[0].tolist() == [6, 4, 2, 0, 2]
    assert opt[0].tolist() == [6, 4, 2, 0, 2]
    assert lru[1].tolist() == [1, 0, 1, 0, 1] and opt[1].tolist() == [1, 1, 0, 0, 1]
    assert lru[2].tolist() == opt[2].tolist() == [9, 4, 5, 0, 3]

    # The replay's counters are those of SGLang's own plan_waves, driven step by step.
    trace = random_trace(seed=11, steps=20, layers=1)  # [20, 1, 4, 4]: up to 16 distinct
    out = replay_sglang_paged(trace, num_experts=16, slots=4)[:, 0]
    policy = LRUPolicy(4)
    for t in range(trace.shape[0]):
        distinct = sorted(set(trace[t, 0].flatten().tolist()))
        waves = plan_waves(policy, distinct)
        assert out[t, WAVES] == len(waves) == -(-len(distinct) // 4)
        assert out[t, MISSES] == sum(len(w.loads) for w in waves)
        assert sorted(e for w in waves for e in w.experts) == distinct
    assert (out[:, WAVES] > 1).any()


@pytest.mark.parametrize("slots", [4, 8])
def test_min_never_misses_more_than_sglang_lru(slots):
    lru_total = opt_total = 0
    for seed in range(4):
        ids = random_trace(seed)  # [40, 2, 4, 4]
        lru = replay_sglang_paged(ids, num_experts=16, slots=slots)
        opt = replay_belady(ids, num_experts=16, slots=slots)
        assert np.array_equal(lru[..., DISTINCT], opt[..., DISTINCT])
        assert np.array_equal(lru[..., WAVES], opt[..., WAVES])  # SGLang's waves meet the bound
        for out in (lru, opt):
            assert np.array_equal(out[..., HITS] + out[..., MISSES], out[..., DISTINCT])
        assert (opt[..., MISSES].sum(0) <= lru[..., MISSES].sum(0)).all()  # per layer
        lru_total += int(lru[..., MISSES].sum())
        opt_total += int(opt[..., MISSES].sum())
    assert opt_total < lru_total


@pytest.mark.parametrize("seed", range(3))
def test_min_is_optimal_on_tiny_traces(seed):
    ids = random_trace(seed, steps=8, layers=1, batch=2, k=2, num_experts=6)  # [8, 1, 2, 2]
    for slots in (2, 3):
        opt = replay_belady(ids, num_experts=6, slots=slots)
        assert int(opt[..., MISSES].sum()) == optimal_misses(ids, 6, slots)


def test_min_with_a_horizon_by_hand():
    # Slots 0, 1, 2; the same trace as above. Horizon 1, step 0 (needs 3): of the residents only
    # 0 is needed within a step, 1 and 2 tie as unused (the lower id goes): 1 is evicted. Step 2
    # (needs 1): 2 is needed next; 3 (used at step 0) is older than 0 (step 1): 3 goes.
    ids = one_per_step([3, 0, 1, 2, 0, 1, 3])
    one = replay_belady(ids, num_experts=4, slots=3, horizon=1)[:, 0]
    assert one[:, MISSES].tolist() == [1, 0, 1, 0, 0, 0, 1]
    # Horizon 0 sees nothing ahead: least recently used first, as SGLang's LRU on this trace.
    lru = replay_sglang_paged(ids, num_experts=4, slots=3)[:, 0]
    assert np.array_equal(replay_belady(ids, num_experts=4, slots=3, horizon=0)[:, 0], lru)
    with pytest.raises(ValueError):
        replay_belady(ids, num_experts=4, slots=3, horizon=-1)


@pytest.mark.parametrize("seed", range(3))
def test_min_with_a_horizon_spans_lru_to_min(seed):
    ids = random_trace(seed)  # [40, 2, 4, 4]
    opt = replay_belady(ids, num_experts=16, slots=8)
    assert np.array_equal(replay_belady(ids, num_experts=16, slots=8, horizon=40), opt)
    # one expert a step always fits: horizon 0 is exactly LRU
    single = ids[:, :, :1, :1]  # [40, 2, 1, 1]
    assert np.array_equal(
        replay_belady(single, num_experts=16, slots=4, horizon=0),
        replay_sglang_paged(single, num_experts=16, slots=4),
    )
    misses = [int(replay_belady(ids, num_experts=16, slots=8, horizon=h)[..., MISSES].sum())
              for h in (0, 1, 4, 40)]  # fmt: skip
    assert misses[-1] == int(opt[..., MISSES].sum()) and misses[0] > misses[-1]


def test_slots_are_clamped_to_the_experts():
    ids = random_trace(seed=5, steps=10)
    for replay in (replay_sglang_paged, replay_belady):
        out = replay(ids, num_experts=16, slots=40)
        assert out[..., MISSES].sum() == 0 and (out[..., WAVES] == 1).all()
        with pytest.raises(ValueError):
            replay(ids, num_experts=8, slots=4)  # ids up to 15


def test_capture_cap_is_sglangs_rule():
    assert capture_cap(32, 8) == 4
    assert capture_cap(90, 8) == 11
    assert capture_cap(8, 8) == 1
    assert capture_cap(16, 4) == 4
    for slots, k in [(32, 8), (90, 8), (8, 2), (63, 6)]:
        cap = capture_cap(slots, k)
        assert cap * k <= slots < (cap + 1) * k  # the largest batch whose entries fit the slots
    with pytest.raises(ValueError):
        capture_cap(7, 8)  # SGLang refuses fewer slots than the router's top-k
    method = (SGLANG_PAGED / "method.py").read_text()
    assert "max(1, num_resident // _router_top_k(layer))" in method
    assert "topk_ids.numel() <= self.num_resident" in method


def test_counters_recorded_with_sglang_are_served_where_it_is_absent(tmp_path):
    """The GPU machine has no SGLang: it gets the counters a run with SGLang recorded for the very
    same routing, labelled as recorded, and nothing (the row absent) for any other routing."""
    from bench.peers import PeerCounts

    trace, other = random_trace(seed=3), random_trace(seed=4)
    record = tmp_path / "counts.npz"
    live = PeerCounts(tmp_path / "none.npz", write_to=record)
    assert live.live
    counts, plan_us, source = live.get(trace, 16, 6)
    assert np.array_equal(counts, replay_sglang_paged(trace, 16, 6)) and plan_us > 0
    assert "own residency code" in source
    live.save()

    absent = PeerCounts(record)
    absent.live = False  # as on a machine where find_spec("sglang") is None
    got = absent.get(trace, 16, 6)
    assert got is not None and np.array_equal(got[0], counts) and got[0].dtype == np.int64
    assert got[1] == pytest.approx(plan_us) and got[2].startswith("recorded by a run with SGLang")
    assert absent.get(other, 16, 6) is None  # another routing: never estimated
    assert absent.get(trace, 16, 5) is None  # another slot count
    absent.save()  # replayed nothing: the record is left as it was
    assert set(np.load(record).files) == set(live.recorded)
