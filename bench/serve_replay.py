"""A serving replay: continuous batching of requests of three tasks through the real step and cache.

    python -m bench.serve_replay [--quick] [--model PATH] [--caps 16,32] [--k-fractions 0.25,0.5]
                                 [--rates 0.5,1,4] [--requests-per-task 32]

Fixed windows of B sequences (bench/compare_offload.py) are not what a server sees. Here:
  requests   --requests-per-task of each kind of text, each with its task label: held-out code
             (the model's heldout.txt), English prose (data/prose_ood.txt, never trained on) and
             the Python reference manual's topics (pydoc_data.topics of this Python: docs; its
             file was in the training split, as a Python string). Each takes its own stretch of
             its text; prompt and output lengths are log-normal, clipped.
  arrivals   Poisson at each --rates (requests/s, projected time), the same requests at every rate;
             the highest rate makes requests queue.
  admission  SGLang's rule: its own SchedulePolicy (sglang/srt/managers/schedule_policy.py,
             imported; FCFS by default) orders the waiting queue; requests are admitted in that
             order while the running requests stay under the cap (--max-running-requests) and the
             prefill's tokens under --max-prefill-tokens (PrefillAdder's rem_input_tokens; its
             memory accounting needs SGLang's KV pools and is not run: no KV limit binds here). A
             step is a prefill of the admitted requests when any is admitted (SGLang prefers it),
             else one decode step of every running request; requests join and finish mid-run.
  steps      every layer-step, prefill and decode, runs the model's own routing of the tokens then
             running through ``lynx_sglang.step.moe_layer_step`` and ``ExpertCache`` (eager
             executor; selection on decode steps only), exact like compare_offload. SGLang's
             paged experts runs the same steps through its own residency code (bench/peers.py's
             LRUPolicy / plan_waves, live), Belady's MIN replays each run's own trace offline.
  decoding   teacher-forced: a request's next token is its text's next token (bench/quality.py
             does the same), so the routing of every token is the unmodified model's, computed
             once per request; selection's quality cost is measured after the run on the decoded
             tokens by propagating the selected routing through the model in the same schedule.
  time       projected (bench/projection.py, declared H100 constants, at --shape's expert size and
             depth) from each step's exact counters; eager steps (prefill, and decode batches over
             the CUDA-graph capture cap) are charged --host-us per layer-step and --wave-us per
             wave after its first. Arrivals, queueing,
             TTFT and TPOT run on that projected clock, so each system serves its own schedule.

Eviction policies (--evictions): lru, lfu, path (each running request's decayed routing
histogram, --lynx-eviction path) and learned (path reading the learned routing-path predictor,
--lynx-path-predictor; bench/train_path_predictor.py trains it on the training split, which none
of the replay's requests come from).

Mechanisms measured on it besides eviction: --admissions overlap (ExpertFlow's regrouping across
batches, the server's --lynx-admission) and --rewarm N (eMoE's task-aware periodic profiles:
TaskProfiles re-warms the cache every N decode steps; replay only, it does not pay).

Outputs: a table, ``bench/results/<name>.json`` (every row), a PNG beside it, and a compact last
stdout line of JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from collections import deque
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from bench import peers, quality
from bench.figures import save_png
from bench.projection import SHAPES, Hardware, Shape, layer_seconds, step_seconds
from lynx_sglang import SHIPPED_MODEL
from lynx_sglang.config import SelectionParams
from lynx_sglang.model.qwen3_moe import MoEModel, rope_cos_sin
from lynx_sglang.offload import ExpertCache, HostExpertStore
from lynx_sglang.offload.admission import OverlapAdmission, PromptProfiler
from lynx_sglang.offload.path import PREDICTOR_FILE, PathPredictor
from lynx_sglang.selection.policy import select_experts
from lynx_sglang.step import Step, decode_capture_cap, moe_layer_step

RESULTS = Path(__file__).parent / "results"
TASKS = ("code", "prose", "docs")
PATHS = ("path", "learned")  # path eviction, from the history alone or the learned predictor
HORIZONS = (1, 4, 16, 64)  # MIN seeing only this many steps ahead: what an exact forecast buys
DISTINCT, HITS, MISSES, PREFETCHED, WAVES = range(5)  # counts columns (as compare_offload)
QUICK = dict(requests_per_task=6, caps="8", k_fractions="0.5", rates="1,8", prompt_median=32,
             output_median=16, prompt_max=64, output_max=32, evictions="lru,path,learned")  # fmt: skip
# SGLang's server defaults this replay mirrors (0.5.23 ServerArgs): schedule_policy "fcfs",
# max_prefill_tokens 16384
SGLANG_DEFAULTS = {"schedule_policy": "fcfs", "max_prefill_tokens": 16384}


# ---------------------------------------------------------------------------------------------
# Requests and their routing
# ---------------------------------------------------------------------------------------------


@dataclass
class Request:
    """One request: its task, its tokens (prompt then the true continuation) and lengths."""

    rid: int
    task: str
    tokens: torch.Tensor  # [P + O] int64: the prompt, then the output it is teacher-forced to
    prompt: int  # P
    output: int  # O tokens generated: 1 by the prefill, O - 1 by decode steps

    @property
    def decode_positions(self) -> range:
        """Positions the decode steps process: P .. P + O - 2 (each predicts the next token)."""
        return range(self.prompt, self.prompt + self.output - 1)


@dataclass
class Workload:
    """The requests and the unmodified model's routing of every one of their tokens."""

    requests: list[Request]
    logits: list[torch.Tensor]  # per request [L, S, E] router logits
    ids: list[torch.Tensor]  # per request [L, S, k] int64
    weights: list[torch.Tensor]  # per request [L, S, k] float32
    num_experts: int
    top_k: int
    num_layers: int
    flat: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # [L, N, .] all tokens
    offset: np.ndarray | None = None  # [R] each request's first row in ``flat``
    # [L, N, k] the cross-layer prediction of layer l's experts (layer l's router on layer l-1's
    # MoE input, as the server's --lynx-prefetch cross-layer predicts); row 0: -1
    cross: torch.Tensor | None = None
    hidden: torch.Tensor | None = None  # [L, N, H] each layer's MoE input (the learned predictor's)

    def rows(self, layer: int, index: torch.Tensor):
        """(logits [T, E], ids [T, k], weights [T, k]) of the flat rows ``index`` at ``layer``."""
        return tuple(t[layer].index_select(0, index) for t in self.flat)


def docs_text() -> str:
    """The Python reference manual's topics as shipped with this Python (``pydoc_data``)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def task_tokens(model_dir: Path) -> dict[str, torch.Tensor]:
    """Token ids of each task's text."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    out = {"code": quality.load_heldout_ids(model_dir, "code"),
           "prose": quality.load_heldout_ids(model_dir, "prose")}  # fmt: skip
    out["docs"] = torch.tensor(tok.encode(docs_text()).ids, dtype=torch.long)
    return out


def lognormal_lengths(rng: np.random.Generator, n: int, median: int, lo: int, hi: int,
                      sigma: float = 0.6) -> np.ndarray:  # fmt: skip
    """n lengths, log-normal around ``median``, clipped to [lo, hi]."""
    return np.clip(np.round(median * np.exp(sigma * rng.standard_normal(n))), lo, hi).astype(int)


def make_requests(texts: dict[str, torch.Tensor], per_task: int, seed: int, prompt_median: int,
                  output_median: int, prompt_max: int, output_max: int) -> list[Request]:  # fmt: skip
    """``per_task`` requests of each task, interleaved at random; each its own stretch of text."""
    rng = np.random.default_rng(seed)
    reqs: list[Request] = []
    for task in TASKS:
        ids = texts[task]
        P = lognormal_lengths(rng, per_task, prompt_median, 8, prompt_max)
        out = lognormal_lengths(rng, per_task, output_median, 2, output_max)
        need = int((P + out).sum())
        if need > ids.numel():
            raise SystemExit(f"{task}: {ids.numel()} tokens, {need} needed; fewer requests")
        stride = ids.numel() // per_task  # spread the requests over the whole text
        for i in range(per_task):
            start = i * stride
            reqs.append(
                Request(0, task, ids[start : start + P[i] + out[i]].clone(), int(P[i]), int(out[i]))
            )
    order = rng.permutation(len(reqs))
    reqs = [reqs[i] for i in order]
    for rid, r in enumerate(reqs):
        r.rid = rid
    return reqs


class _Record:
    """Routing hook that keeps every layer's logits, ids and weights of the flat tokens."""

    def __init__(self, L: int) -> None:
        self.out = [None] * L

    def __call__(self, layer, logits, ids, weights):  # [1, N, .]
        self.out[layer] = (logits[0].float(), ids[0].long(), weights[0].float())
        return ids, weights


def padded(requests: list[Request]) -> torch.Tensor:
    """[R, S_max] token ids, right-padded (causal attention: real positions never see padding)."""
    S = max(len(r.tokens) for r in requests)
    x = torch.zeros(len(requests), S, dtype=torch.long)
    for i, r in enumerate(requests):
        x[i, : len(r.tokens)] = r.tokens
    return x


def forward_flat(model: MoEModel, requests: list[Request], hook=None, bucket: int = 16,
                 moe_inputs: list | None = None):  # fmt: skip
    """The model over every request's tokens, the MoE of each layer on all of them at once.

    Attention runs per request (right-padded buckets of similar length: causal, so padding is
    never seen); each MoE layer runs on the flat rows of every real token, requests in order
    (request i's position p is row offset[i] + p), and ``hook(layer, logits, ids, weights)``
    sees them as [1, N, .]: a schedule's steps can be selected across requests, as a server
    batches them; ``moe_inputs`` (a list) receives each MoE layer's input [N, H]. Returns per
    request the last hidden states [S, H] (after the final norm)."""
    c = model.config
    lengths = [len(r.tokens) for r in requests]
    offset = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    order = sorted(range(len(requests)), key=lambda i: lengths[i])
    buckets = [order[i : i + bucket] for i in range(0, len(order), bucket)]
    xs, rope = [], []
    for b in buckets:
        x = padded([requests[i] for i in b])
        xs.append(model.embed_tokens(x))  # [b, S_b, H]
        rope.append(rope_cos_sin(x.shape[1], c.head_dim, c.rope_theta, x.device, xs[-1].dtype))
    # flat row of each (bucket, row, position): gather/scatter between buckets and flat rows
    where = [torch.cat([torch.arange(lengths[i]) + int(offset[i]) for i in b]) for b in buckets]
    masks = [torch.arange(x.shape[1])[None, :] < torch.tensor([lengths[i] for i in b])[:, None]
             for b, x in zip(buckets, xs)]  # fmt: skip
    N = int(sum(lengths))
    with torch.no_grad():
        for li, layer in enumerate(model.layers):
            flat = xs[0].new_zeros(N, c.hidden_size)
            for j, (x, (cos, sin)) in enumerate(zip(xs, rope)):
                xs[j] = x = x + layer.self_attn(layer.input_layernorm(x), cos, sin)
                flat[where[j]] = x[masks[j]]
            x_moe = layer.post_attention_layernorm(flat)
            if moe_inputs is not None:
                moe_inputs.append(x_moe)
            y, _, _ = layer.mlp(x_moe[None], li, hook)
            for j, x in enumerate(xs):
                x[masks[j]] += y[0, where[j]]
        out = [None] * len(requests)
        for b, x in zip(buckets, xs):
            h = model.norm(x)
            for row, i in enumerate(b):
                out[i] = h[row, : lengths[i]]
    return out


def lm_logits(model: MoEModel, h: torch.Tensor) -> torch.Tensor:
    """Next-token logits [S, V] of hidden states h [S, H] (tied or separate head)."""
    head = model.embed_tokens.weight if model.lm_head is None else model.lm_head.weight
    return h @ head.t()


def route(model: MoEModel, requests: list[Request]) -> Workload:
    """The unmodified model's routing of every request's tokens (one pass, all requests)."""
    c = model.config
    rec, inputs = _Record(c.num_hidden_layers), []
    forward_flat(model, requests, rec, moe_inputs=inputs)
    flat = tuple(torch.stack([o[j] for o in rec.out]) for j in range(3))  # [L, N, .] each
    k = c.num_experts_per_tok
    cross = torch.full_like(flat[1], -1)
    with torch.no_grad():
        for li in range(1, c.num_hidden_layers):
            logits = inputs[li - 1].float() @ model.layers[li].mlp.gate.weight.float().t()
            cross[li] = logits.topk(k, dim=-1).indices
    lengths = [len(r.tokens) for r in requests]
    offset = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    views = [[t[:, o : o + S] for o, S in zip(offset, lengths)] for t in flat]  # per request
    return Workload(requests, *views, c.num_experts, k, c.num_hidden_layers, flat, offset,
                    cross, torch.stack(inputs).float())  # fmt: skip


def arrivals(n: int, rate: float, seed: int) -> np.ndarray:
    """Poisson arrival times (s) of n requests at ``rate`` per second (unit gaps drawn once, so
    every rate sees the same requests in the same order, its gaps scaled)."""
    gaps = np.random.default_rng(seed + 1).exponential(1.0, n)
    return np.cumsum(gaps) / rate


# ---------------------------------------------------------------------------------------------
# Admission: SGLang's own policy where it runs, its budget rule reproduced
# ---------------------------------------------------------------------------------------------


class _NoTreeCache:
    """The prefix cache SchedulePolicy asks about: disabled (a radix cache would need SGLang's KV
    pools); with it disabled SGLang itself turns cache-aware policies into FCFS."""

    disable = True

    def supports_fast_match_prefix(self) -> bool:
        return False

    def supports_prefix_sharing(self) -> bool:
        return False


class _Waiting:
    """What SchedulePolicy reads of a waiting request (SGLang's ``Req`` fields it touches)."""

    def __init__(self, req: Request, arrival: float) -> None:
        self.req, self.rid = req, req.rid
        self.priority = 0
        self.sampling_params = type("SP", (), {"max_new_tokens": req.output})()
        self.time_stats = type("TS", (), {"wait_queue_entry_time": arrival})()
        self.origin_input_ids = req.tokens[: req.prompt].tolist()


def sglang_policy(name: str = "fcfs"):
    """SGLang's ``SchedulePolicy`` as its scheduler builds it (prefix cache off)."""
    from sglang.srt.managers.schedule_policy import SchedulePolicy
    from sglang.srt.runtime_context import reset_context
    from sglang.srt.server_args import ServerArgs
    from sglang.test.parallel_groups import publish

    reset_context()
    publish(ServerArgs(model_path="dummy"), role="test")
    return SchedulePolicy(name, _NoTreeCache(), False, False, False)


class FCFS:
    """Arrival order (SGLang's FCFS with priority scheduling off leaves the queue as it is)."""

    def calc_priority(self, waiting_queue: list, running_batch=None) -> None:
        pass


def admit(policy, waiting: list[_Waiting], running: int, cap: int, budget: int) -> list[_Waiting]:
    """The requests a prefill admits now: the policy orders the queue, then in that order while
    running + admitted < cap and the prefill's tokens stay within ``budget`` (the first request
    always goes: SGLang chunks a prompt over the budget, whole prompts fit here)."""
    if not waiting or running >= cap:
        return []
    policy.calc_priority(waiting)
    out, tokens = [], 0
    for w in waiting:
        if running + len(out) >= cap or (out and tokens + w.req.prompt > budget):
            break
        out.append(w)
        tokens += w.req.prompt
    return out


def _shares(ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[L, N] expert choices -> [L, E] the share of each layer's choices per expert."""
    counts = torch.stack([torch.bincount(row, minlength=num_experts) for row in ids])
    return counts.float() / ids.shape[1]


def oracle_profiles(W: Workload) -> dict[int, torch.Tensor]:
    """Each request's own prompt routing ([L, E] shares): what a server knows only after the
    prompt's prefill, so admission on it bounds what any predictor of it could save."""
    return {r.rid: _shares(W.ids[i][:, : r.prompt].reshape(W.num_layers, -1), W.num_experts)
            for i, r in enumerate(W.requests)}  # fmt: skip


def embedding_profiles(model: MoEModel, W: Workload) -> dict[int, torch.Tensor]:
    """What the server's ``--lynx-admission overlap`` has before the prefill: the library's
    ``PromptProfiler`` on this model's embeddings, pre-MoE norms and routers."""
    profiler = PromptProfiler(
        model.embed_tokens.weight,
        [(la.post_attention_layernorm.weight, la.post_attention_layernorm.eps) for la in model.layers],
        [la.mlp.gate.weight for la in model.layers],
        W.top_k,
    )
    return {r.rid: profiler(r.tokens[: r.prompt]) for r in W.requests}


class OverlapOrder:
    """``--lynx-admission overlap`` in the replay: SGLang's policy orders the queue (from arrival
    order, as SGLang keeps it), then the library's ``OverlapAdmission`` reorders it by each
    request's profile mass on what ``system``'s cache holds, within its pass-over bound."""

    def __init__(self, base, profiles: dict[int, torch.Tensor], system: Ours, max_passed: int):
        self.base, self.profiles, self.system = base, profiles, system
        self.admission = OverlapAdmission(max_passed)

    def calc_priority(self, waiting_queue: list, running_batch=None) -> None:
        waiting_queue.sort(key=lambda w: w.time_stats.wait_queue_entry_time)
        self.base.calc_priority(waiting_queue)
        cache = self.system.cache
        resident = torch.stack([cache.resident_mask(la) for la in range(cache.store.num_layers)])
        order = self.admission.order([w.rid for w in waiting_queue],
                                     [self.profiles[w.rid] for w in waiting_queue], resident)  # fmt: skip
        waiting_queue[:] = [waiting_queue[i] for i in order]


# ---------------------------------------------------------------------------------------------
# Systems: what serves a layer-step
# ---------------------------------------------------------------------------------------------


class TaskProfiles:
    """eMoE's task-aware periodic profiles, in the replay: per task and layer a decayed histogram
    of the experts its requests' decode tokens route to, learned online from the steps served;
    every ``every`` decode steps each layer's cache is re-warmed (``ExpertCache.prefetch``) with
    the experts the running batch's tasks use most, each running request weighing its task's
    normalised profile once. The copies count as loads (the bytes cross PCIe like any miss)."""

    def __init__(self, tasks: tuple[str, ...], L: int, E: int, every: int, decay: float = 0.98):
        if every < 1:
            raise ValueError(f"task profiles: re-warm every N >= 1 decode steps, got {every}")
        self.hist = {t: torch.zeros(L, E) for t in tasks}
        self.every, self.decay, self.E = every, decay, E

    def learn(self, layer: int, ids: torch.Tensor, tasks: list[str]) -> None:
        """One decode layer-step's routing ``ids`` [T, k], row t of task ``tasks[t]``."""
        for t in set(tasks):
            rows = torch.tensor([i for i, x in enumerate(tasks) if x == t])
            h = self.hist[t][layer]
            h.mul_(self.decay).add_(torch.bincount(ids[rows].reshape(-1), minlength=self.E))

    def ranked(self, layer: int, tasks: list[str]) -> np.ndarray:
        """The experts of ``layer``, most used first by the running requests' tasks ``tasks``."""
        mix = torch.zeros(self.E)
        for t in tasks:
            h = self.hist[t][layer]
            mix += h / h.sum().clamp_min(1e-9)
        return np.argsort(-mix.numpy(), kind="stable")


class Ours:
    """The project's cache (eager executor) through ``moe_layer_step``, selection optional."""

    def __init__(self, W: Workload, slots: int, eviction: str, selection: SelectionParams | None,
                 max_requests: int, decay: float = 0.95, rewarm: int = 0,
                 predictor: PathPredictor | None = None, extra_waves: int = 1) -> None:  # fmt: skip
        L, E, k = W.num_layers, W.num_experts, W.top_k
        store = HostExpertStore(L, E, {"w": (4,)}, torch.float32, None, 0)  # counts only
        # path eviction is told each step's request rows, as the server's step tells it
        # (SGLang's req_pool_idx: 1..cap here, 0 is its padding row); "learned" is path eviction
        # reading the learned predictor (--lynx-path-predictor)
        learned = eviction == "learned"
        self.cache = ExpertCache(store, slots, "cpu", k, "path" if learned else eviction,
                                 executor="eager", path_decay=decay, max_requests=max_requests,
                                 path_predictor=predictor if learned else None,
                                 extra_waves=extra_waves)  # fmt: skip
        self.path = self.cache.executor.eviction_policy if eviction in PATHS else None
        self.selection, self.slots, self.E, self.k = selection, slots, E, k
        # the server's capture rule: captured steps select as configured, so graphs capture up
        # to K // top_k tokens unless --lynx-max-experts <= K bounds the kept set
        self.cap = decode_capture_cap(selection, slots, k, E)
        self.needed: np.ndarray | None = None  # [E] bool: what the latest prepare served
        prepare = self.cache.prepare

        def recording_prepare(layer, topk_ids, *a, **kw):
            m = np.zeros(E + 1, dtype=bool)
            ids = topk_ids.reshape(-1).numpy()
            m[np.where(ids < 0, E, ids)] = True
            self.needed = m[:E]
            return prepare(layer, topk_ids, *a, **kw)

        self.cache.prepare = recording_prepare
        self.reads_cache = selection is not None and selection.miss_aware
        self.profiles = TaskProfiles(TASKS, L, E, rewarm) if rewarm else None

    def captured(self, batch: int) -> bool:
        """Whether the server replays a decode batch of ``batch`` rows in a CUDA graph."""
        return self.cap is None or batch <= self.cap

    def layer_step(self, layer: int, x, ids, weights, logits, decode: bool, slots: np.ndarray):
        """One layer-step of rows with MoE input x [T, H]; returns (counts [5], needed [E] bool,
        resident mask seen or None)."""
        B = ids.shape[0]
        sel = None
        if decode and self.selection is not None:
            sel = self.selection
        seen = self.cache.resident_mask(layer).clone() if decode and self.reads_cache else None
        requests = torch.from_numpy(slots + 1) if self.path is not None else None
        step = Step(decode, B if decode else None, requests)
        # the no-op kernel ignores x (counters only); a learned path predictor reads it
        moe_layer_step(layer, x, ids, weights, logits, _no_kernel, step, sel, self.cache)
        c = self.cache.counters(reset=True)["total"]
        counts = [c[f] for f in ("distinct", "hits", "misses", "prefetch_fills", "waves")]
        return counts, self.needed, seen


def _no_kernel(x, ids, weights, experts):
    return x


class SGLangPaged:
    """SGLang's paged experts: its own ``LRUPolicy`` per layer and ``plan_waves`` (live), as
    ``bench.peers.replay_sglang_paged`` drives them; its capture cap K // top-k."""

    def __init__(self, W: Workload, slots: int) -> None:
        res = peers._residency()
        self.res, self.E = res, W.num_experts
        self.policies = [res.LRUPolicy(min(slots, W.num_experts)) for _ in range(W.num_layers)]
        self.cap = peers.capture_cap(slots, W.top_k)
        self.selection = None

    def captured(self, batch: int) -> bool:
        return batch <= self.cap

    def layer_step(self, layer: int, x, ids, weights, logits, decode: bool, slots):
        policy = self.policies[layer]
        distinct = [e for e in torch.unique(ids).tolist() if e >= 0]
        hits = sum(e in policy.resident for e in distinct)
        waves = self.res.plan_waves(policy=policy, distinct=distinct)
        misses = sum(len(w.loads) for w in waves)
        need = np.zeros(self.E, dtype=bool)
        need[distinct] = True
        return [len(distinct), hits, misses, 0, len(waves)], need, None


# ---------------------------------------------------------------------------------------------
# The replay
# ---------------------------------------------------------------------------------------------


@dataclass
class Run:
    """What one system's replay of one (rate, cap) produced."""

    kind: list[str] = field(default_factory=list)  # per step: "prefill" | "decode"
    batch: list[int] = field(default_factory=list)  # per step: rows (decode) or requests (prefill)
    tokens: list[int] = field(default_factory=list)  # per step: tokens processed
    counts: list[np.ndarray] = field(default_factory=list)  # per step [L, 5]
    needed: list[np.ndarray] = field(default_factory=list)  # per step [L, E] bool (the trace)
    seconds: list[float] = field(default_factory=list)  # per step, projected
    captured: list[bool] = field(default_factory=list)  # per step: replayed in a CUDA graph
    schedule: list[list[tuple[int, int]]] = field(default_factory=list)  # per step (rid, position)
    seen: list[np.ndarray | None] = field(default_factory=list)  # per decode step [L, E] resident
    arrival: dict[int, float] = field(default_factory=dict)
    admitted: dict[int, float] = field(default_factory=dict)  # start of its prefill step
    first: dict[int, float] = field(default_factory=dict)  # end of its prefill step (1st token)
    finish: dict[int, float] = field(default_factory=dict)
    generated: dict[int, int] = field(default_factory=dict)
    max_running: int = 0
    decode_steps: int = 0
    admission_order: list[int] = field(default_factory=list)
    # path predictor, per decode layer-step: (layer, |pred & need|, |pred|, |need|, |topK & need|)
    prediction: list[tuple[int, int, int, int, int]] = field(default_factory=list)


def step_time(counts: np.ndarray, tokens: int, top_k: int, shape: Shape, hw: Hardware,
              host_s: float | np.ndarray) -> float:  # fmt: skip
    """Projected seconds of one step from its per-layer counts [L, 5] (bench/projection.py)."""
    c = counts[None]
    t = layer_seconds(c[..., DISTINCT], c[..., MISSES], c[..., PREFETCHED], tokens, top_k, shape,
                      hw, host_s=host_s)  # fmt: skip
    return float(step_seconds(t, shape)[0])


def replay(W: Workload, arrive: np.ndarray, system, cap: int, policy, budget: int, shape: Shape,
           hw: Hardware, host_us: float, progress=None, wave_us: float = 0.0) -> Run:  # fmt: skip
    """Serve every request of ``W`` arriving at ``arrive`` (s) through ``system``."""
    R, L, k = len(W.requests), W.num_layers, W.top_k
    run = Run(arrival={r.rid: float(arrive[i]) for i, r in enumerate(W.requests)})
    order = sorted(range(R), key=lambda i: arrive[i])
    pending = deque(W.requests[i] for i in order)
    waiting: list[_Waiting] = []
    running: list[Request] = []
    slot_of: dict[int, int] = {}
    free = deque(range(cap))
    clock, done = 0.0, 0
    while done < R:
        while pending and arrive[pending[0].rid] <= clock:
            r = pending.popleft()
            waiting.append(_Waiting(r, run.arrival[r.rid]))
        if not running and not waiting:
            clock = max(clock, float(arrive[pending[0].rid]))
            continue
        new = admit(policy, waiting, len(running), cap, budget)
        if new:  # a prefill of the admitted requests (SGLang runs it before the next decode)
            for w in new:
                waiting.remove(w)
            reqs = [w.req for w in new]
            rows = [(r.rid, p) for r in reqs for p in range(r.prompt)]
            for r in reqs:
                slot_of[r.rid] = free.popleft()
                run.admitted[r.rid] = clock
                run.admission_order.append(r.rid)
            decode, batch = False, len(reqs)
        else:  # one decode step of every running request
            rows = [(r.rid, r.prompt + run.generated[r.rid] - 1) for r in running]
            decode, batch = True, len(running)
        index = torch.from_numpy(np.array([W.offset[a] + b for a, b in rows], dtype=np.int64))
        slots = np.array([slot_of[a] for a, _ in rows])
        counts = np.zeros((L, 5), dtype=np.int64)
        need = np.zeros((L, W.num_experts), dtype=bool)
        seen = [] if decode else None
        profiles = getattr(system, "profiles", None) if decode else None
        if profiles is not None:
            row_tasks = [W.requests[a].task for a, _ in rows]
            rewarm = run.decode_steps > 0 and run.decode_steps % profiles.every == 0
        for layer in range(L):
            logits, ids, weights = W.rows(layer, index)
            x = W.hidden[layer].index_select(0, index)  # the rows' MoE input
            if decode and isinstance(system, Ours) and system.path is not None:
                _score_prediction(run, system, layer, ids)
            if profiles is not None and rewarm:  # its copies are counted in this layer-step
                system.cache.prefetch(layer, profiles.ranked(layer, row_tasks)[: system.slots])
            c, n, s = system.layer_step(layer, x, ids, weights, logits, decode, slots)
            if profiles is not None:
                profiles.learn(layer, ids, row_tasks)
            counts[layer], need[layer] = c, n
            if seen is not None and s is not None:
                seen.append(s.numpy())
        captured = decode and system.captured(batch)
        # an eager layer-step's planning, and each of its waves after the first
        host = 0.0 if captured else (host_us + wave_us * (counts[:, WAVES] - 1).clip(0)) * 1e-6
        dt = step_time(counts, len(rows), k, shape, hw, host)
        run.kind.append("decode" if decode else "prefill")
        run.batch.append(batch)
        run.tokens.append(len(rows))
        run.counts.append(counts)
        run.needed.append(need)
        run.seconds.append(dt)
        run.captured.append(captured)
        run.schedule.append(rows)
        if decode:
            run.seen.append(np.stack(seen) if seen else None)
            run.decode_steps += 1
        clock += dt
        if decode:
            finished = []
            for r in running:
                run.generated[r.rid] += 1
                if run.generated[r.rid] >= r.output:
                    finished.append(r)
        else:
            for r in reqs:
                run.first[r.rid] = clock
                run.generated[r.rid] = 1
            running.extend(reqs)
            finished = [r for r in reqs if r.output <= 1]
        for r in finished:
            running.remove(r)
            run.finish[r.rid] = clock
            free.append(slot_of.pop(r.rid))
            done += 1
            if progress is not None:
                progress.update(1)
        run.max_running = max(run.max_running, len(running))
    return run


def _score_prediction(run: Run, system: Ours, layer: int, ids: torch.Tensor) -> None:
    """The path predictor's forecast of this decode layer-step (before it sees the step's
    tokens) against the experts the tokens route to (the routing before selection)."""
    p = system.path.probabilities(layer)
    need = np.zeros(system.E, dtype=bool)
    need[ids.reshape(-1).numpy()] = True
    pred = p >= 0.5
    top = np.zeros(system.E, dtype=bool)
    top[np.argsort(-p, kind="stable")[: system.slots]] = True
    run.prediction.append((layer, int((pred & need).sum()), int(pred.sum()), int(need.sum()),
                           int((top & need).sum())))  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Quality of selection over the decoded tokens
# ---------------------------------------------------------------------------------------------


class ScheduleHook:
    """Applies the selection to each decode step of a schedule, layer by layer, on
    ``forward_flat``'s rows: a step's rows selected together as the server's step would, the kept
    set capped at K on captured steps, with the resident masks the run saw (miss-aware)."""

    def __init__(self, run: Run, system: Ours, offset: np.ndarray) -> None:
        self.steps = [(np.array([offset[a] + b for a, b in rows]), cap)
                      for rows, kind, cap in zip(run.schedule, run.kind, run.captured)
                      if kind == "decode"]  # fmt: skip
        self.seen, self.system = run.seen, system

    def __call__(self, layer, logits, ids, weights):  # [1, N, .]
        lg, ids, weights = logits[0], ids[0].clone(), weights[0].clone()
        sys = self.system
        groups: dict[tuple[int, bool], list[int]] = {}  # steps of one batch size and path
        for d, (rows, captured) in enumerate(self.steps):
            if len(rows) >= sys.selection.min_batch:
                groups.setdefault((len(rows), captured), []).append(d)
        for _, ds in groups.items():  # each step selected on its own rows
            r = torch.from_numpy(np.stack([self.steps[d][0] for d in ds]))  # [D, B]
            params = sys.selection.at_layer(layer)
            res = None
            if params.miss_aware and self.seen[ds[0]] is not None:
                res = torch.from_numpy(np.stack([self.seen[d][layer] for d in ds]))  # [D, E]
            sel = select_experts(lg[r], ids[r], weights[r], params, None, res)
            ids[r], weights[r] = sel.topk_ids.to(ids.dtype), sel.topk_weights.to(weights.dtype)
        return ids[None], weights[None]


def decoded_quality(model: MoEModel, W: Workload, hook=None, base_logp=None):
    """Per request over its decoded tokens: (NLL, top-1 hits, KL from the base, tokens) rows
    (bench/quality.py's per-sequence columns), and the log-probabilities (for the base)."""
    hidden = forward_flat(model, W.requests, hook)
    rows, logps = [], []
    for i, r in enumerate(W.requests):
        pos = torch.tensor(list(r.decode_positions), dtype=torch.long)
        if len(pos) == 0:
            rows.append([0.0, 0.0, 0.0, 0.0])
            logps.append(None)
            continue
        with torch.no_grad():
            lp = torch.log_softmax(lm_logits(model, hidden[i][pos]).float(), -1)  # [D, V]
        tgt = r.tokens[pos + 1]
        nll = float(-lp.gather(1, tgt[:, None]).sum())
        hits = float((lp.argmax(-1) == tgt).sum())
        kl = 0.0
        if base_logp is not None:
            ref = base_logp[i].float()
            kl = float((ref.exp() * (ref - lp)).sum())
        rows.append([nll, hits, kl, float(len(pos))])
        logps.append(lp.to(torch.bfloat16))
    return np.array(rows), logps


def quality_row(per_req: np.ndarray, base: np.ndarray, tasks: list[str]) -> dict:
    """Δppl, Δacc (points), KL with paired-bootstrap 95 % intervals over requests and the gate
    verdict (bench/quality.py's), overall and by task."""
    keep = base[:, 3] > 0
    out = {}
    for name, m in [("all", keep)] + [(t, keep & (np.array(tasks) == t)) for t in TASKS]:
        if not m.any():
            continue
        a = quality.Result(name, 0.0, 0, per_req[m])
        b = quality.Result("base", 0.0, 0, base[m])
        ci = quality.paired_intervals(a, b)
        out[name] = {"ppl_rel_increase": round(a.ppl / b.ppl - 1, 5),
                     "accuracy_delta_points": round(100 * (a.accuracy - b.accuracy), 3),
                     "kl": round(a.kl, 6), "ci95": ci, "verdict": quality.gate_verdict(ci),
                     "requests": int(m.sum()), "tokens": int(b.count)}  # fmt: skip
    return out


# ---------------------------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------------------------


def pct(values, q: float) -> float | None:
    return None if not len(values) else round(float(np.percentile(values, q)), 4)


def summarise(W: Workload, run: Run, shape: Shape, traced_layers: int) -> dict:
    """Loads, bytes, projected throughput and per-request latencies of one run, with MIN on its
    own trace."""
    c = np.stack(run.counts)  # [N, L, 5]
    loads = c[..., MISSES] + c[..., PREFETCHED]  # demand copies and re-warm copies (task profiles)
    dec = np.array([k == "decode" for k in run.kind])
    trace = np.stack(run.needed)  # [N, L, E]
    E = W.num_experts
    ids = torch.from_numpy(np.where(trace, np.arange(E), -1))[:, :, None, :]  # [N, L, 1, E]
    slots = run_slots(run)
    mins = peers.replay_belady(ids, E, slots) if slots else None
    out_tokens = sum(r.output for r in W.requests)
    scale = shape.layers / traced_layers
    busy = float(np.sum(run.seconds))
    span = max(run.finish.values()) - min(run.arrival.values())
    R = W.requests
    ttft = [run.first[r.rid] - run.arrival[r.rid] for r in R]
    queue = [run.admitted[r.rid] - run.arrival[r.rid] for r in R]
    tpot = [(run.finish[r.rid] - run.first[r.rid]) / (r.output - 1) for r in R if r.output > 1]
    row = {
        "steps": len(run.kind), "decode_steps": int(dec.sum()),
        "mean_decode_batch": round(float(np.mean(np.array(run.batch)[dec])), 2) if dec.any() else 0,
        "max_running": run.max_running,
        "captured_decode_share": round(float(np.mean(np.array(run.captured)[dec])), 3) if dec.any() else 0,
        "distinct_per_decode_layer_step": round(float(c[dec][..., DISTINCT].mean()), 3),
        "loads_per_decode_layer_step": round(float(loads[dec].mean()), 3),
        "loads_per_prefill_layer_step": round(float(loads[~dec].mean()), 3) if (~dec).any() else 0,
        "loads_total": int(loads.sum()),
        "rewarm_loads_total": int(c[..., PREFETCHED].sum()),
        "h2d_bytes_per_token": round(float(loads.sum() * scale * shape.expert_bytes / out_tokens), 1),
        "tokens_per_s_busy": round(out_tokens / busy, 2),
        "tokens_per_s_span": round(out_tokens / span, 2),
        "ttft_p50_s": pct(ttft, 50), "ttft_p99_s": pct(ttft, 99),
        "tpot_p50_s": pct(tpot, 50), "tpot_p99_s": pct(tpot, 99),
        "queue_p50_s": pct(queue, 50), "queue_p99_s": pct(queue, 99),
        "time_source": "projected",
    }  # fmt: skip
    if mins is not None:
        row["min_loads_per_decode_layer_step"] = round(float(mins[dec][..., MISSES].mean()), 3)
        row["min_loads_total"] = int(mins[..., MISSES].sum())
        row["loads_over_min"] = round(row["loads_total"] / max(1, row["min_loads_total"]), 4)
        min_decode = max(1, float(mins[dec][..., MISSES].sum()))
        row["decode_loads_over_min"] = round(float(loads[dec].sum()) / min_decode, 4)
        # an exact forecast of the next h steps, MIN's plan within it and LRU beyond: how far
        # ahead a policy must see to come within a given share of MIN on this trace
        row["horizon_decode_loads_over_min"] = {
            str(h): round(float(peers.replay_belady(ids, E, slots, horizon=h)[dec][..., MISSES]
                                .sum()) / min_decode, 4)
            for h in HORIZONS
        }  # fmt: skip
        # where the gap lies: the first decode step after a prefill reloads what the prefill's
        # waves evicted (MIN keeps the next step's experts through a multi-wave step)
        after = np.array([d and i > 0 and not dec[i - 1] for i, d in enumerate(dec)])
        if after.any():
            row["decode_loads_after_prefill_share"] = round(
                float(loads[after].sum()) / max(1, float(loads[dec].sum())), 4
            )
            row["min_decode_loads_after_prefill_share"] = round(
                float(mins[after][..., MISSES].sum()) / max(1, float(mins[dec][..., MISSES].sum())),
                4,
            )
    # what a per-task budget could act on: a batch-wide selection's cut is one for the whole
    # batch, so a task's own budget applies only to decode steps running no other task
    mix = [{W.requests[a].task for a, _ in rows}
           for rows, kind in zip(run.schedule, run.kind) if kind == "decode"]  # fmt: skip
    if mix:
        row["decode_steps_single_task"] = round(float(np.mean([len(m) == 1 for m in mix])), 4)
        row["decode_steps_without_task"] = {t: round(float(np.mean([t not in m for m in mix])), 4)
                                            for t in TASKS}  # fmt: skip
    if W.cross is not None and dec.any():
        row["predictors_per_layer"] = predictor_scores(W, run)
    if run.prediction:
        p = np.array(run.prediction)  # [M, 5]
        per = []
        for layer in range(traced_layers):
            q = p[p[:, 0] == layer]
            per.append({"precision": round(float(q[:, 1].sum() / max(1, q[:, 2].sum())), 4),
                        "recall": round(float(q[:, 1].sum() / max(1, q[:, 3].sum())), 4),
                        "recall_at_K": round(float(q[:, 4].sum() / max(1, q[:, 3].sum())), 4)})  # fmt: skip
        row["path_prediction_per_layer"] = per
    return row


def predictor_scores(W: Workload, run: Run) -> dict:
    """Precision and recall per layer of two forecasts of a decode layer-step's experts (the
    union of its rows' top-k, before selection), made before it runs: ``cross_layer`` (the
    server's --lynx-prefetch cross-layer: this layer's router on the previous layer's MoE input,
    per row) and ``previous_step`` (the set the previous decode step needed at this layer)."""
    E, L = W.num_experts, W.num_layers
    tally = np.zeros((2, L, 3))  # [predictor, layer, (|pred & need|, |pred|, |need|)]
    prev = None
    for rows, kind in zip(run.schedule, run.kind):
        if kind != "decode":
            continue
        index = torch.from_numpy(np.array([W.offset[a] + b for a, b in rows], dtype=np.int64))
        need = np.zeros((L, E), dtype=bool)
        cross = np.zeros((L, E), dtype=bool)
        for layer in range(L):
            need[layer, W.flat[1][layer].index_select(0, index).reshape(-1).numpy()] = True
            ids = W.cross[layer].index_select(0, index).reshape(-1).numpy()
            cross[layer, ids[ids >= 0]] = True
        for j, pred in enumerate((cross, prev)):
            if pred is None:
                continue
            tally[j, :, 0] += (pred & need).sum(-1)
            tally[j, :, 1] += pred.sum(-1)
            tally[j, :, 2] += need.sum(-1)
        prev = need

    def per_layer(t: np.ndarray) -> list[dict | None]:
        return [None if r[1] == 0 else {"precision": round(float(r[0] / r[1]), 4),
                                        "recall": round(float(r[0] / max(1, r[2])), 4)}
                for r in t]  # fmt: skip

    return {"cross_layer": per_layer(tally[0]), "previous_step": per_layer(tally[1])}


def run_slots(run: Run) -> int | None:
    return getattr(run, "slots", None)


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = ap.add_argument
    add("--model", default=str(SHIPPED_MODEL))
    add("--quick", action="store_true", help="a small slice for CI (well under a minute)")
    add("--requests-per-task", type=int, default=32)
    add("--prompt-median", type=int, default=96)
    add("--output-median", type=int, default=48)
    add("--prompt-max", type=int, default=256)
    add("--output-max", type=int, default=160)
    add("--rates", default="0.5,1.5,6", help="Poisson arrival rates, requests per projected second")
    add("--caps", default="16,32", help="--max-running-requests values (SGLang's cap)")
    add("--k-fractions", default="0.25,0.5", help="K (slots per layer) as fractions of E")
    add("--evictions", default="lru,lfu,path,learned",
        help="our cache's eviction policies (learned: path reading --path-predictor)")
    add("--path-predictor", default="",
        help="the learned predictor the 'learned' eviction reads (default: <model>/"
             f"{PREDICTOR_FILE}, written by python -m bench.train_path_predictor)")
    add("--path-decay", type=float, default=0.95,
        help="the path policy's history decay (0.8, 0.9, 0.95, 0.98 measured: 0.95 and up best)")
    add(
        "--schedule-policy",
        default=SGLANG_DEFAULTS["schedule_policy"],
        help="SGLang's --schedule-policy (its own code orders the queue)",
    )
    add("--max-prefill-tokens", type=int, default=SGLANG_DEFAULTS["max_prefill_tokens"])
    add(
        "--no-sglang",
        action="store_true",
        help="FCFS without SGLang's policy code and no paged-experts peer (SGLang absent)",
    )
    add("--no-selection", action="store_true", help="skip the lynx+offload rows")
    add("--admissions", default="fcfs",
        help="admission orders to run our cache under: fcfs (the --schedule-policy as SGLang "
        "runs it) and overlap (resident overlap first, --overlap-profile; offload rows only)")
    add("--max-passed", type=int, default=32,
        help="overlap admission: a request passed over this many times by later arrivals goes first")
    add("--overlap-profile", default="embedding", choices=("embedding", "oracle"),
        help="overlap admission's profile of a waiting request: the routers on its prompt's "
        "embeddings (what a server has before the prefill), or its true prompt routing (a bound)")
    add("--rewarm", default="",
        help="task-aware profiles (eMoE): offload rows (lru, path) whose cache is re-warmed every "
        "N decode steps from the running tasks' online profiles, e.g. 4,16 (empty: none)")
    add("--budget", type=float, default=quality.DEFAULT.budget,
        help="the lynx+offload rows' Lynx budget (the server's default)")
    add("--shape", default="qwen3-30b-a3b", choices=["shipped", *SHAPES])
    add(
        "--host-us",
        type=float,
        default=130.0,
        help="host planning charged per eager layer-step (compare_offload measured 124-135 µs "
        "on this machine's 2 cores at batch 16-32)",
    )
    add("--wave-us", type=float, default=60.0,
        help="host planning charged per wave after the first of an eager layer-step (bench/"
             "host_overhead here: a planned multi-wave step, eager_lfu at T=16 E=64 K=32, is 153 "
             "µs in 2.95 waves against 33-39 µs for one wave)")  # fmt: skip
    add("--path-us", type=float, default=150.0,
        help="host time path eviction adds per eager layer-step (bench.host_overhead: path "
             "against lfu at T=16, E=64, K=32, 301 - 148 µs; 121 at E=128, K=64)")
    add("--learned-us", type=float, default=105.0,
        help="host time the learned predictor adds on top of path's (bench.host_overhead: "
             "learned against path at T=16, E=64, K=32, 408 - 301 µs; 120 at E=128, K=64)")
    add("--extra-waves", default="1",
        help="--lynx-extra-waves values for our cache's rows (waves a planned multi-wave step may "
             "run beyond the fewest to keep its best-valued experts), e.g. 1,4")
    add("--seed", type=int, default=0)
    add("--name", default="")
    add("--out-dir", default=str(RESULTS))
    add("--no-plot", action="store_true")
    if ap.parse_known_args(argv)[0].quick:
        ap.set_defaults(**QUICK)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    t0 = time.time()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # bookkeeping-sized tensors, and a shared 2-core machine
    try:
        return _main(args, t0)
    finally:
        torch.set_num_threads(threads)


def _main(args, t0: float) -> dict:
    from tqdm import tqdm

    torch.manual_seed(args.seed)
    hw = Hardware()
    model_dir = Path(args.model)
    model = MoEModel.from_pretrained(model_dir)
    c = model.config
    L, E, k = c.num_hidden_layers, c.num_experts, c.num_experts_per_tok
    shipped = Shape("shipped", c.hidden_size, c.moe_intermediate_size, L, E, k)
    shape = shipped if args.shape == "shipped" else SHAPES[args.shape]
    reqs = make_requests(task_tokens(model_dir), args.requests_per_task, args.seed,
                         args.prompt_median, args.output_median, args.prompt_max, args.output_max)  # fmt: skip
    W = route(model, reqs)
    oracle = oracle_profiles(W)
    profiles = oracle if args.overlap_profile == "oracle" else embedding_profiles(model, W)
    # the profile as a predictor of the prompt's routing: histogram intersection per layer
    agreement = torch.stack([torch.minimum(profiles[r], oracle[r]).sum(-1) for r in oracle]).mean(0)
    tasks = [r.task for r in reqs]
    base_rows, base_logp = decoded_quality(model, W)
    policy = FCFS() if args.no_sglang else sglang_policy(args.schedule_policy)
    rates = [float(x) for x in args.rates.split(",") if x]
    caps = [int(x) for x in args.caps.split(",") if x]
    fracs = [float(x) for x in args.k_fractions.split(",") if x]
    evictions = [e for e in args.evictions.split(",") if e]
    predictor = None
    if "learned" in evictions:
        where = Path(args.path_predictor or model_dir / PREDICTOR_FILE)
        if not where.exists():
            raise SystemExit(f"serve_replay: no path predictor at {where}; train one with "
                             f"python -m bench.train_path_predictor --model {model_dir}")  # fmt: skip
        predictor = PathPredictor.load(where, L, E, args.path_decay, c.hidden_size)
    sel = replace(quality.DEFAULT, budget=args.budget)  # the server's defaults (miss-aware)
    admissions = [a for a in args.admissions.split(",") if a]
    if set(admissions) - {"fcfs", "overlap"}:
        raise SystemExit(f"serve_replay: --admissions takes fcfs and overlap, got {args.admissions}")
    rewarms = [int(x) for x in args.rewarm.split(",") if x]
    extra = [int(x) for x in args.extra_waves.split(",") if x]
    if not extra or min(extra) < 0:
        raise SystemExit(f"serve_replay: --extra-waves takes integers >= 0, got {args.extra_waves}")
    # (system, eviction, selection, admission, re-warm every, extra waves); LRU plans no waves'
    # end, so it runs at the first value only
    ours = [(e, w) for w in extra for e in evictions if e != "lru" or w == extra[0]]
    systems = [("offload (ours)", e, None, a, 0, w) for a in admissions for e, w in ours]
    systems += [("offload (ours)", e, None, "fcfs", n, extra[0]) for n in rewarms
                for e in evictions if e in ("lru", *PATHS)]  # fmt: skip
    if not args.no_sglang:
        systems.append(("sglang paged experts", "lru (sglang)", None, "fcfs", 0, 0))
    if not args.no_selection:
        systems += [("lynx+offload", e, sel, "fcfs", 0, w) for e, w in ours
                    if e in ("lru", *PATHS)]  # fmt: skip
    n_runs = len(rates) * len(caps) * len(fracs) * len(systems)
    print(f"serve_replay: {model_dir.name} (E={E}, top-{k}, {L} layers), {len(reqs)} requests "
          f"({', '.join(f'{t}: {tasks.count(t)}' for t in TASKS)}), {sum(r.output for r in reqs)} "
          f"output tokens; times projected at {shape.name} ({hw.describe()})", flush=True)  # fmt: skip
    rows = []
    bar = tqdm(total=n_runs * len(reqs), desc="requests served", unit="req", mininterval=2)
    for frac in fracs:
        K = max(k, math.ceil(frac * E))
        for cap in caps:
            for rate in rates:
                arrive = arrivals(len(reqs), rate, args.seed)
                for name, ev, params, adm, every, waves in systems:
                    system = (SGLangPaged(W, K) if name.startswith("sglang")
                              else Ours(W, K, ev, params, cap, args.path_decay, every, predictor,
                                        waves))  # fmt: skip
                    order = (policy if adm == "fcfs"
                             else OverlapOrder(policy, profiles, system, args.max_passed))  # fmt: skip
                    t1 = time.time()
                    host_us = (args.host_us + (args.path_us if ev in PATHS else 0.0)
                               + (args.learned_us if ev == "learned" else 0.0))  # fmt: skip
                    run = replay(W, arrive, system, cap, order, args.max_prefill_tokens, shape,
                                 hw, host_us, bar, args.wave_us)  # fmt: skip
                    run.slots = K
                    row = {"system": name, "eviction": ev, "selection": params is not None,
                           "admission": adm, "rewarm_every": every, "extra_waves": waves,
                           "slots": K,
                           "k_fraction": frac, "cap": cap,
                           "rate": rate, **summarise(W, run, shape, L)}  # fmt: skip
                    if params is not None:
                        per, _ = decoded_quality(
                            model, W, ScheduleHook(run, system, W.offset), base_logp
                        )
                        row["quality"] = quality_row(per, base_rows, tasks)
                        row["quality_verdict"] = row["quality"]["all"]["verdict"]
                    else:
                        row["quality_verdict"] = "exact"
                    row["replay_seconds"] = round(time.time() - t1, 2)
                    rows.append(row)
    bar.close()
    result = {
        "bench": "serve_replay", "model": model_dir.name, "num_experts": E, "top_k": k,
        "shape": shape.name, "time_source": "projected",
        "hardware": {**hw.as_dict(), "model": "bench/projection.py"},
        "host_us_per_eager_layer_step": args.host_us,
        "host_us_per_later_wave": args.wave_us,
        "host_us_path_eviction": args.path_us,
        "host_us_learned_predictor": args.learned_us,
        "requests": len(reqs), "tasks": {t: tasks.count(t) for t in TASKS},
        "output_tokens": sum(r.output for r in reqs),
        "prompt_tokens": sum(r.prompt for r in reqs),
        "lengths": {"prompt_median": args.prompt_median, "prompt_max": args.prompt_max,
                    "output_median": args.output_median, "output_max": args.output_max,
                    "distribution": "log-normal, sigma 0.6, clipped"},
        "admission": {"schedule_policy": args.schedule_policy, "orders": admissions,
                      "overlap_max_passed": args.max_passed,
                      "overlap_profile": args.overlap_profile,
                      "profile_agreement_per_layer": [round(float(a), 3) for a in agreement],
                      "source": "FCFS (no SGLang)" if args.no_sglang else
                      "sglang.srt.managers.schedule_policy.SchedulePolicy (imported)",
                      "max_prefill_tokens": args.max_prefill_tokens},
        "selection": None if args.no_selection else {"policy": sel.policy, "budget": sel.budget,
                                                     "miss_budget": sel.miss_budget},
        "path_decay": args.path_decay, "path_predictor": (predictor.meta if predictor else None),
        "extra_waves": extra, "rewarm_every": rewarms,
        "task_profiles": {"decay": 0.98, "learned_from": "decode steps served",
                          "rewarm": "ExpertCache.prefetch of the running tasks' top-K experts"},
        "rates": rates, "caps": caps, "k_fractions": fracs,
        "decoding": "teacher-forced (the next token is the text's next token)",
        "rows": rows, "seconds": round(time.time() - t0, 1),
        "device": f"cpu ({platform.processor() or platform.machine()})",
    }  # fmt: skip
    print_report(result)
    name = args.name or ("serve_replay_quick" if args.quick else "serve_replay")
    out = Path(args.out_dir) / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    if not args.no_plot:
        png = plot(result, out.with_suffix(".png"))
        if png:
            result["plot"] = Path(png).name
    out.write_text(json.dumps(result, separators=(",", ":")) + "\n")
    print(json.dumps(compact(result, out)))
    return result


def label(row: dict) -> str:
    """A row's system in one word: its eviction, with lynx+, +overlap and +rewarmN where they
    apply."""
    base = "sglang" if row["system"].startswith("sglang") else row["eviction"]
    return ("lynx+" if row["selection"] else "") + base + _variant(row)


def _variant(row: dict) -> str:
    adm = "+overlap" if row.get("admission") == "overlap" else ""
    waves = row.get("extra_waves", 1)
    extra = f"+waves{waves}" if waves != 1 and not row["system"].startswith("sglang") else ""
    return adm + extra + (f"+rewarm{row['rewarm_every']}" if row.get("rewarm_every") else "")


def print_report(result: dict) -> None:
    """One line per run: loads against MIN, bytes, projected throughput and latency, quality."""
    print(f"\nserve_replay ({result['model']}, {result['requests']} requests, times projected at "
          f"{result['shape']}; loads = expert copies per decode layer-step; MIN on each run's own "
          f"trace; p50/p99 in projected seconds)")  # fmt: skip
    hdr = (f"{'K':>4}{'cap':>5}{'rate':>6} {'system':<22}{'evict':<13}{'batch':>6}{'loads':>7}"
           f"{'MIN':>7}{'x MIN':>7}{'MB/tok':>8}{'tok/s':>8}{'TTFT p50/p99':>15}"
           f"{'TPOT p50/p99':>15}{'queue p99':>10}  quality")  # fmt: skip
    print(hdr)
    print("-" * len(hdr))
    for r in result["rows"]:
        q = r["quality_verdict"]
        if "quality" in r:
            a = r["quality"]["all"]
            lo, hi = a["ci95"]["ppl_rel_increase"]
            q = f"Δppl {100 * a['ppl_rel_increase']:+.2f}% [{100 * lo:+.2f},{100 * hi:+.2f}] {a['verdict']}"
        evict = r["eviction"] + _variant(r)
        print(f"{r['slots']:>4}{r['cap']:>5}{r['rate']:>6g} {r['system']:<22}{evict:<13}"
              f"{r['mean_decode_batch']:>6.1f}{r['loads_per_decode_layer_step']:>7.2f}"
              f"{r.get('min_loads_per_decode_layer_step', float('nan')):>7.2f}"
              f"{r.get('decode_loads_over_min', float('nan')):>7.3f}"
              f"{r['h2d_bytes_per_token'] / 1e6:>8.1f}{r['tokens_per_s_busy']:>8.1f}"
              f"{r['ttft_p50_s']:>7.2f}/{r['ttft_p99_s']:<7.2f}{r['tpot_p50_s']:>7.3f}/{r['tpot_p99_s']:<7.3f}"
              f"{r['queue_p99_s']:>10.2f}  {q}")  # fmt: skip
    seen = set()
    print(f"\nMIN seeing only h steps ahead (LRU beyond), decode loads over MIN, h = "
          f"{', '.join(map(str, HORIZONS))}; on each setting's best offloading-alone trace:")
    best = sorted((r for r in result["rows"] if not r["selection"] and "horizon_decode_loads_over_min" in r),
                  key=lambda r: r["decode_loads_over_min"])  # fmt: skip
    for r in best:
        key = (r["slots"], r["cap"], r["rate"])
        if key not in seen:
            seen.add(key)
            h = r["horizon_decode_loads_over_min"]
            print(f"  K={r['slots']} cap={r['cap']} rate={r['rate']:g}: "
                  + "  ".join(f"h={k}: {v:.3f}" for k, v in h.items())
                  + f"   (best: {label(r)} {r['decode_loads_over_min']:.3f})")


def compact(result: dict, path: Path) -> dict:
    """The last stdout line (at most 2 KB): per K and cap at the queueing rate, decode loads over
    MIN of each eviction, and the lynx+offload quality verdicts."""
    top = max(result["rates"])
    first = result["extra_waves"][0]  # other --extra-waves values: only the best row per setting
    head = {}
    for r in result["rows"]:
        if r["rate"] != top:
            continue
        key = f"K={r['slots']},cap={r['cap']}"
        ratio = r.get("decode_loads_over_min")
        if r["extra_waves"] in (first, 0):  # 0: SGLang's row
            head.setdefault(key, {})[label(r)] = ratio
        best = head.setdefault(key, {}).get("best")
        if ratio is not None and (best is None or ratio < best[1]):
            head[key]["best"] = [label(r), ratio]
    verdicts = sorted({r["quality_verdict"] for r in result["rows"] if r["selection"]})
    return {"bench": "serve_replay", "time_source": "projected", "model": result["model"],
            "shape": result["shape"], "requests": result["requests"], "rate": top,
            "decode_loads_over_min": head, "lynx_quality_verdicts": verdicts,
            "rows": len(result["rows"]), "seconds": result["seconds"], "out": str(path)}  # fmt: skip


def plot(result: dict, path: Path) -> str | None:
    """Per K: decode loads over MIN by cap and rate, one bar per system; and p99 TTFT."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = result["rows"]
    Ks = sorted({r["slots"] for r in rows})
    names = list(dict.fromkeys(label(r) for r in rows))
    colours = plt.get_cmap("tab20" if len(names) > 10 else "tab10")
    fig, axes = plt.subplots(2, len(Ks), figsize=(6 * len(Ks), 7), squeeze=False)
    for j, K in enumerate(Ks):
        at = [r for r in rows if r["slots"] == K]
        groups = list(dict.fromkeys((r["cap"], r["rate"]) for r in at))
        w = 0.8 / len(names)
        for i, n in enumerate(names):
            for m, (key, ylabel) in enumerate((("decode_loads_over_min", "decode loads / MIN"),
                                               ("ttft_p99_s", "p99 TTFT (s, projected)"))):  # fmt: skip
                ys = []
                for g in groups:
                    hit = [r for r in at if (r["cap"], r["rate"]) == g and label(r) == n]
                    ys.append(hit[0].get(key) or 0 if hit else 0)
                ax = axes[m][j]
                ax.bar(np.arange(len(groups)) + i * w, ys, w, label=n, color=colours(i % 20))
                ax.set_xticks(np.arange(len(groups)) + 0.4 - w / 2)
                ax.set_xticklabels([f"cap {c}\n{rt:g}/s" for c, rt in groups], fontsize=7)
                ax.set_ylabel(ylabel, fontsize=8)
                ax.set_title(f"K = {K} of {result['num_experts']}", fontsize=9)
        axes[0][j].axhline(1.1, color="r", ls=":", lw=0.8)
        axes[0][j].legend(fontsize=6, ncol=2 if len(names) > 10 else 1)
    fig.suptitle(f"serve_replay, {result['model']} (times projected at {result['shape']}); red "
                 f"dotted: 10 % above Belady's MIN", fontsize=9)  # fmt: skip
    fig.tight_layout()
    save_png(fig, path, dpi=100)
    plt.close(fig)
    return str(path)


if __name__ == "__main__":
    main()
