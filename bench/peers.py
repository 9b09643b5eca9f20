"""Exact replays of recorded MoE decode routing: SGLang's paged experts and Belady's MIN.

Why: a benchmark can then show SGLang's ``--enable-paged-experts`` as an exact peer with real
counters (SGLang's own residency code replays the trace; nothing of it is re-implemented here),
and every eviction policy beside the optimal offline limit (Belady's MIN, which sees the future).

Both replays take ``topk_ids`` [N, L, B, k]: N decode steps in order, L MoE layers, B tokens with
their top-k routed expert ids (negative ids, e.g. -1, are padding and ignored). Each layer has its
own residency of ``slots`` GPU slots (at most ``num_experts``, as SGLang clamps it) that starts as
SGLang's does, with experts 0..slots-1 resident, so both replays see the same cold start. They
return int64 [N, L, 5] with the columns ``COLUMNS``: distinct experts the layer-step needs, hits
(needed and resident at the start of the step), misses (needed and paged in during the step),
prefetched (always 0: neither pages ahead), waves (how many passes the step runs in).

SGLang's residency is ``sglang/srt/layers/moe/paged_experts/residency.py`` (pure Python), imported
from the installed SGLang by its dotted name when a replay first runs. That import runs
``paged_experts/__init__.py`` and with it much of SGLang's server stack (about 25 s on two cores,
once per process; it imports on CPU, with CUDA-only warnings).

Where SGLang is not installed (the GPU machine has torch and triton only), ``PeerCounts`` serves
the counters a run with SGLang recorded for the very same routing (keyed by a hash of the ids),
and nothing otherwise: a peer row is then absent, never estimated.
"""

from __future__ import annotations

import hashlib
import importlib.util
import time
from pathlib import Path
from types import ModuleType

import numpy as np
import torch

COLUMNS = ("distinct", "hits", "misses", "prefetched", "waves")
RECORDED = Path(__file__).parent / "results" / "sglang_paged_counts.npz"


def _residency() -> ModuleType:
    """SGLang's installed ``paged_experts.residency`` module (``LRUPolicy``, ``plan_waves``)."""
    from sglang.srt.layers.moe.paged_experts import residency

    return residency


def sglang_installed() -> bool:
    """Whether SGLang can be imported here (found, not imported: importing it takes ~25 s)."""
    try:
        return importlib.util.find_spec("sglang") is not None
    except (ImportError, ValueError):
        return False


def routing_key(topk_ids: torch.Tensor, num_experts: int, slots: int) -> str:
    """A name for one replay's input: the ids' shape and bytes, E and the slots."""
    ids = topk_ids.detach().to("cpu", torch.int64).contiguous()
    h = hashlib.sha1(f"{tuple(ids.shape)}|{num_experts}|{slots}|".encode())
    h.update(ids.numpy().tobytes())
    return h.hexdigest()[:20]


class PeerCounts:
    """SGLang's paged-experts counters: replayed through its own code where it is installed
    (and recorded), else read from a file a run with SGLang wrote for the same routing.

    ``get`` returns (counts [N, L, 5] int64, host planning µs per layer-step, source) or None.
    """

    def __init__(self, path: Path | str = RECORDED, write_to: Path | str | None = None) -> None:
        self.path = Path(path)
        self.write_to = Path(write_to) if write_to is not None else self.path
        self.live = sglang_installed()
        self.recorded: dict[str, np.ndarray] = {}
        for p in dict.fromkeys((self.path, self.write_to)):  # the record, then this output's
            if p.exists():
                with np.load(p) as f:
                    self.recorded.update({k: f[k] for k in f.files})
        self.new = 0

    def get(self, topk_ids: torch.Tensor, num_experts: int, slots: int):
        key = routing_key(topk_ids, num_experts, slots)
        if self.live:
            t0 = time.perf_counter_ns()
            counts = replay_sglang_paged(topk_ids, num_experts, slots)
            plan_us = (time.perf_counter_ns() - t0) / 1e3 / max(1, counts[:, :, 0].size)
            self.recorded[key] = counts.astype(np.int16)
            self.recorded[key + ":plan_us"] = np.array([plan_us])
            self.new += 1
            return counts, plan_us, "SGLang's own residency code (replayed here)"
        if key not in self.recorded:
            return None
        plan_us = float(self.recorded[key + ":plan_us"][0])
        return (self.recorded[key].astype(np.int64), plan_us,
                f"recorded by a run with SGLang on the same routing ({self.path.name}, {key})")  # fmt: skip

    def save(self) -> None:
        """Write what this run replayed (merged with what the files held) when it replayed any."""
        if self.new:
            self.write_to.parent.mkdir(parents=True, exist_ok=True)
            np.savez_compressed(self.write_to, **self.recorded)


def _check(topk_ids: torch.Tensor, num_experts: int, slots: int) -> int:
    """Validate the inputs; return the slots per layer SGLang uses, min(slots, num_experts)."""
    if topk_ids.dim() != 4:
        raise ValueError(f"topk_ids must be [N, L, B, k], got shape {tuple(topk_ids.shape)}")
    if slots < 1:
        raise ValueError(f"slots must be at least 1, got {slots}")
    if topk_ids.numel() and int(topk_ids.max()) >= num_experts:
        raise ValueError(f"expert id {int(topk_ids.max())} >= num_experts {num_experts}")
    return min(slots, num_experts)  # method.make_for_layer: min(num_resident, num_experts)


def replay_sglang_paged(topk_ids: torch.Tensor, num_experts: int, slots: int) -> np.ndarray:
    """Replay ``topk_ids`` [N, L, B, k] through SGLang's paged-experts residency: [N, L, 5] int64.

    One ``LRUPolicy(slots)`` per layer, as each layer's ``PagedExpertsMoEMethod`` holds. Every
    layer-step is driven as ``EagerExecutor._run`` drives it: the step's distinct routed experts
    (``torch.unique``, ascending, negatives dropped) go to ``plan_waves(policy, distinct)``, which
    puts the resident ones first, cuts the list into waves of at most ``slots`` experts and has
    ``LRUPolicy.place`` page each wave in, evicting the least recently used experts outside it.
    Misses are the ``Wave.loads`` of the step, waves its ``len(plan_waves(...))`` (1 when it fits,
    and for an all-padding step).

    With CUDA graphs on, SGLang decides a step whose ``B * k <= slots`` on the GPU instead
    (``DeviceExecutor``, kernel ``paged_experts_decide``): the same LRU, except that experts last
    used in the same step are evicted lowest slot first rather than in ``place`` order. Larger
    steps go through ``EagerExecutor``, whose round trip through ``DeviceResidency`` keeps the LRU
    order, so a trace with every ``B * k > slots`` (e.g. B=16, top-8, slots=32) is exact either way.
    """
    K = _check(topk_ids, num_experts, slots)
    N, L = topk_ids.shape[:2]
    residency = _residency()
    policies = [residency.LRUPolicy(K) for _ in range(L)]
    out = np.zeros((N, L, len(COLUMNS)), dtype=np.int64)
    for t in range(N):
        for layer, policy in enumerate(policies):
            step_ids = topk_ids[t, layer]  # [B, k]
            distinct = [e for e in torch.unique(step_ids).tolist() if e >= 0]
            hits = sum(e in policy.resident for e in distinct)
            waves = residency.plan_waves(policy=policy, distinct=distinct)
            misses = sum(len(w.loads) for w in waves)
            out[t, layer] = (len(distinct), hits, misses, 0, len(waves))
    return out


def _needed(topk_ids: torch.Tensor, num_experts: int) -> np.ndarray:
    """[N, L, E] bool: the experts each layer-step routes to (negative ids ignored)."""
    N, L = topk_ids.shape[:2]
    ids = topk_ids.reshape(N, L, -1).long()  # [N, L, B*k]
    ids = torch.where(ids < 0, num_experts, ids)  # padding -> a spare column, dropped below
    mask = torch.zeros(N, L, num_experts + 1, dtype=torch.bool)
    mask.scatter_(2, ids, True)
    return mask[..., :num_experts].numpy()  # [N, L, E]


def replay_belady(topk_ids: torch.Tensor, num_experts: int, slots: int,
                  horizon: int | None = None) -> np.ndarray:  # fmt: skip
    """Replay ``topk_ids`` [N, L, B, k] under Belady's MIN, per layer: [N, L, 5] int64.

    When a step must page in an expert and no slot is free, MIN evicts the resident expert, not
    needed by this step, whose next use in this layer is farthest (never again: infinity; ties:
    the lower expert id). A step needing more distinct experts than slots counts them all (hits
    for the resident, misses for the rest), and afterwards keeps the ``slots`` experts of
    (resident before | needed) with the nearest next use. Its waves are reported as
    ``ceil(distinct / slots)``: a lower bound for any plan, as a wave serves at most ``slots``.
    Cold start and slot clamping as in ``replay_sglang_paged``, so the two compare exactly.

    ``horizon`` h: MIN that sees only the next h steps (an exact forecast of h steps). A next
    use more than h steps ahead is unknown; unknown experts rank after every known one, the
    most recently used kept first (least recently used evicted first, as LRU). None: all of it.
    """
    K = _check(topk_ids, num_experts, slots)
    need = _needed(topk_ids, num_experts)  # [N, L, E]
    N, L, E = need.shape
    if horizon is not None and horizon < 0:
        raise ValueError(f"horizon must be >= 0 steps, got {horizon}")
    next_use = np.empty((N, L, E), dtype=np.int64)  # first step after t needing e; N: never
    upcoming = np.full((L, E), N, dtype=np.int64)  # [L, E]
    for t in range(N - 1, -1, -1):
        next_use[t] = upcoming
        upcoming = np.where(need[t], t, upcoming)
    resident = np.zeros((L, E), dtype=bool)  # [L, E]
    resident[:, :K] = True
    last_use = np.full((L, E), -1, dtype=np.int64)  # [L, E] the latest step needing e
    out = np.zeros((N, L, len(COLUMNS)), dtype=np.int64)
    for t in range(N):
        for layer in range(L):
            needed, res = need[t, layer], resident[layer]  # [E] each; res is a view
            last_use[layer, needed] = t
            distinct = int(needed.sum())
            hits = int((needed & res).sum())
            pool = np.flatnonzero(needed | res)  # [P] experts that may stay after the step
            if pool.size > K:
                # Keep order: this step's experts when they fit, then nearest next use, then
                # higher id (so the farthest, lower-id experts are the ones evicted).
                rank = next_use[t, layer, pool]  # [P]
                if horizon is not None:  # beyond the horizon: by recency, after the known
                    unknown = rank > t + horizon
                    rank = np.where(unknown, t + horizon + 1 + t - last_use[layer, pool], rank)
                if distinct <= K:
                    rank = np.where(needed[pool], -1, rank)
                keep = pool[np.lexsort((-pool, rank))[:K]]
                res[:] = False
                res[keep] = True
            else:
                res[pool] = True
            out[t, layer] = (distinct, hits, distinct - hits, 0, max(1, -(-distinct // K)))
    return out


def capture_cap(slots: int, top_k: int) -> int:
    """The largest decode batch SGLang's paged experts captures in a CUDA graph: slots // top_k.

    SGLang 0.5.23, ``sglang/srt/layers/moe/paged_experts/method.py``: with full decode graphs,
    ``make_for_layer`` calls ``_cap_decode_capture_batch_sizes(max(1, num_resident //
    _router_top_k(layer)))``, which keeps the configured capture sizes up to that cap and adds the
    cap itself (never above the configured largest size, which can lower it further). The cap is
    what ``PagedExpertsMoEMethod.apply`` serves on the GPU, steps with ``topk_ids.numel() <=
    num_resident``; larger batches run without a graph. ``check_paged_experts_compat`` refuses
    ``num_resident < top_k``, so the ``max(1, ...)`` never applies to an accepted setting.
    """
    if top_k < 1 or slots < top_k:
        raise ValueError(f"SGLang needs --paged-experts-num-resident ({slots}) >= top-k ({top_k})")
    return slots // top_k
