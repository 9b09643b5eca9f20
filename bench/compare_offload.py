"""Lynx + expert cache vs offloading alone, on the same model, prompts and GPU expert budget.

    python -m bench.compare_offload [--quick] [--batches 1,4,16,32,64] [--k-fractions 0.25,0.5]

Systems, at each batch size B and each K (GPU slots per MoE layer, a fraction of E):
  resident          every expert on the GPU (the speed ceiling)
  offload (ours)    the expert cache, selection off, at its best eviction x prefetch (baseline)
  offload: peers    SGLang --enable-paged-experts, HF accelerate CPU offload (its own placement)
  lynx              batch-aware selection, every expert resident
  lynx+offload      the product: selection in front of the cache, with and without cache-aware
                    selection (+aware: a score bonus; +miss: miss-aware, the budget on the
                    missing experts only) and cross-layer prefetch (+prefetch), each at its best
                    eviction; at the primary K also at the other --budgets ("b=0.8"; +miss: the miss budget)
The product at a batch size is its fastest row meeting the quality goal on its 95 % bound; where
none does, the product is offloading alone (1.0x), and the fastest row regardless is shown apart.

Routing: the shipped model runs held-out text as batched teacher-forced decode (bench/quality.py
machinery); each decode step's router logits and top-k of the unmodified model are recorded, and
every system replays them step by step, layer by layer, through the real policy and the real
cache (cache-aware selection sees the cache's resident mask at that layer and step). The routing
therefore comes from the base model's hidden states; the quality cost of each setting comes from
bench/quality.py's measurement, which propagates the changed routing through the model. A plain
selection row (Lynx at a budget, not reading the cache) takes that measurement from the frontier
(--frontier, bench/results/frontier.json) where the frontier ran the same setting on the same
weights (sha256 of model.safetensors), held-out code and batch with a Δppl interval within
±0.2 %; every other row is measured here, on at least --quality-sequences sequences.

Times: on a GPU every time is measured (CUDA events, warm-up, median of repeats, same run) over
the traced model's MoE layers at the chosen expert size. On a CPU-only machine the counters
(distinct experts, hits, misses, prefetches, bytes) are exact and every time is projected from
them with the model in bench/projection.py, labelled "projected". accelerate's CPU offload is
placed by its own infer_auto_device_map (on meta tensors on a CPU): an offloaded layer copies all
its experts at every step, so its counters are exact too; on a GPU it is run and timed. SGLang's
paged experts is replayed through its own code where SGLang is installed, and its counters
recorded (--out-dir/sglang_paged_counts.npz); where it is not (the GPU machine), the counters
recorded for the same routing are used, labelled, or the row is absent. Other expert sizes reuse
the same counters (labelled).

Expert formats (``--formats bf16,fp8,int4`` at ``--expert-memory`` 0.25: a GPU budget for routed
experts of that fraction of the layer's E experts in bf16, and at each ``--device-shapes`` shape the
budget one H200 leaves for its experts): the format sets K = floor(budget / bytes_per_expert), so a
smaller format buys more slots as well as cheaper copies and reads (bytes: the format's real bytes,
scales included). Per format: offloading alone (ours; SGLang's paged experts at its K for that
format) and lynx+offload (+miss), quality measured on the model with every expert quantised RTN
and dequantised: against the model in that same format (a checkpoint shipped in it: the speedup
is stated at the same format) and against the bf16 experts ("sent_from_bf16": a bf16 checkpoint
sent as that format, gated like any selection and compared with SGLang at the best format it runs
inside the gate). Projected only (a CPU run; a GPU run states the section absent). Per row:
decode_ms_per_step is each sequence's time per token, ms_per_token the step over B. The
"temporal" prefetch mode copies nothing with per-layer slot pools (the previous step's experts
of a layer are still resident), so it is not swept by default. Last stdout line: JSON.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import platform
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from bench import peers, quality
from bench.compare_report import plot, print_report
from bench.projection import SHAPES, Hardware, Shape, layer_seconds, slots_at_memory, step_seconds
from lynx_sglang import SHIPPED_MODEL
from lynx_sglang.config import SelectionParams
from lynx_sglang.model.qwen3_moe import MoEModel, experts_forward
from lynx_sglang.offload import ExpertCache, HostExpertStore
from lynx_sglang.selection import select_experts_ref
from lynx_sglang.step import Step, bounded_selection, decode_capture_cap, moe_layer_step

RESULTS = Path(__file__).parent / "results"
REUSE_HALF_WIDTH = 0.002  # a frontier point stands in for a row's own sample within ±0.2 % Δppl
# bench/quality.py's goal: Δppl <= +0.5 % and Δ top-1 accuracy >= -0.5 points (agreement with
# the unmodified model is reported, not gated: bf16 numerics alone move it to ~0.985)
QUALITY_GOAL = {"ppl_rel_increase": 0.005, "accuracy_delta_points": -0.5}
SPEEDUP_GOAL = {"batches": [16, 32], "speedup": 2.0}
OURS = "offload (ours)"
SGLANG_PEER = "offload: sglang paged experts"
SGLANG_LYNX = "lynx on sglang paged experts"
MIN_BOUND = "bound: Belady MIN"
MIN_LYNX = "bound: Belady MIN + lynx"
ACCEL_PEER = "offload: accelerate cpu offload"
PRODUCT = "lynx+offload"
# name -> (what of the cache the selection reads: False, "bonus" (cache-aware: resident scores
# x (1 + bonus)) or "miss" (miss-aware: resident experts kept, the budget on the missing ones),
# prefetch, captured steps bound the kept set at K). Unbound:
# the server captures graphs only up to K // top_k (--cuda-graph-max-bs-decode), where the bound
# never binds; larger decode batches run host-planned with the selection as configured.
VARIANTS = {
    "lynx+offload": (False, False, True),
    "lynx+offload +aware": ("bonus", False, True),
    "lynx+offload +miss": ("miss", False, True),
    "lynx+offload +prefetch": (False, True, True),
    "lynx+offload +aware +prefetch": ("bonus", True, True),
    "lynx+offload (no cap)": (False, False, False),
    "lynx+offload +miss (no cap)": ("miss", False, False),
}
BUDGET_VARIANTS = ("lynx+offload", "lynx+offload +miss", "lynx+offload (no cap)",
                   "lynx+offload +miss (no cap)")  # fmt: skip
QUICK = dict(prefill=24, decode=16, warmup=4, max_batches=1, quality_windows=1, quality_sequences=0,
             k_fractions="0.25,0.5",
             evictions="lfu,score", prefetches="cross-layer", budgets="", formats="",
             device_shapes="")  # fmt: skip
# formats SGLang's paged experts pages from a checkpoint (block FP8; GPTQ/AWQ int4 via Marlin)
SGLANG_FORMATS = ("bf16", "fp8", "int4")
FORMAT_VARIANTS = {k: VARIANTS[k] for k in ("lynx+offload", "lynx+offload +miss", "lynx+offload +prefetch")}
DISTINCT, HITS, MISSES, PREFETCHED, WAVES = range(5)  # Run.counts columns


# ---------------------------------------------------------------------------------------------
# Routing
# ---------------------------------------------------------------------------------------------


@dataclass
class Routing:
    """Decode routing of the unmodified model: W windows of B sequences, D decode steps each."""

    batches: list[torch.Tensor]  # W x [B, S] token ids
    logits: torch.Tensor  # [W, D, L, B, E] float32
    ids: torch.Tensor  # [W, D, L, B, k] int64
    weights: torch.Tensor  # [W, D, L, B, k] float32
    hidden: torch.Tensor | None  # [W, D, L, B, H] MoE inputs (cross-layer prefetch, GPU)

    def to(self, device) -> Routing:
        h = None if self.hidden is None else self.hidden.to(device)
        t = (self.logits.to(device), self.ids.to(device), self.weights.to(device))
        return Routing(self.batches, *t, h)


class _Recorder:
    """Routing hook + MoE-input pre-hooks of one forward: keeps the decode positions, by step."""

    def __init__(self, num_layers: int, prefill: int) -> None:
        self.prefill = prefill
        self.rec = {n: [None] * num_layers for n in ("logits", "ids", "weights", "hidden")}

    def __call__(self, layer, logits, ids, weights):  # [B, S, .] -> decode part: [D, B, .]
        for name, t in (("logits", logits), ("ids", ids), ("weights", weights)):
            self.rec[name][layer] = t[:, self.prefill :].transpose(0, 1)
        return ids, weights

    def grab(self, layer: int):
        def pre_hook(module, args):  # args[0]: the MoE input [B, S, H]
            self.rec["hidden"][layer] = args[0][:, self.prefill :].transpose(0, 1)

        return pre_hook


def collect_routing(model: MoEModel, batches: list[torch.Tensor], prefill: int, hidden: bool):
    """One forward per window; records each layer's decode-step routing (and MoE input)."""
    names = ["logits", "ids", "weights"] + (["hidden"] if hidden else [])
    out = {name: [] for name in names}
    for x in batches:
        rec = _Recorder(model.config.num_hidden_layers, prefill)
        mlps = [m.mlp for m in model.layers] if hidden else []
        handles = [m.register_forward_pre_hook(rec.grab(i)) for i, m in enumerate(mlps)]
        try:
            with torch.no_grad():
                model(x, hook=rec)
        finally:
            for h in handles:
                h.remove()
        for name in names:
            out[name].append(torch.stack(rec.rec[name], dim=1))  # [D, L, B, .]
    st = {name: torch.stack(v) for name, v in out.items()}  # [W, D, L, B, .]
    ids, w = st["ids"].long(), st["weights"].float()
    return Routing(batches, st["logits"].float(), ids, w, st.get("hidden"))


# ---------------------------------------------------------------------------------------------
# Replaying the routing through each system
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setup:
    """One system's decode step: selection or not, cache (K slots) or all resident."""

    system: str
    slots: int | None  # None: every expert resident, no cache
    lynx: bool = False
    aware: bool = False
    eviction: str = "-"
    prefetch: str = "off"
    budget: float | None = None  # the selection budget (None: selection off)
    bound: bool = True  # captured steps cap the kept set at K (graphs up to K / protect_top)


@dataclass
class Run:
    """What one replay produced."""

    setup: Setup
    counts: np.ndarray  # [N, L, 5] per counted step and layer: DISTINCT, HITS, MISSES, ...
    resident: torch.Tensor | None  # [W, D, L, E] bool: what cache-aware selection saw
    step_ms: float | None = None  # measured (GPU): median over repeats of the mean step
    expert_gpu_bytes: int | None = None  # measured (accelerate peer)
    # The path the server takes for these decode steps, and its host time per layer-step that
    # the GPU waits for (0 inside a captured CUDA graph; measured in this replay otherwise).
    path: str = "CUDA graph"
    host_us: float = 0.0


@dataclass
class Gpu:
    """What a measured (CUDA) replay needs: real-size weights and each step's MoE input."""

    w13: torch.Tensor  # [L, E, 2I, H] bf16, host
    w2: torch.Tensor  # [L, E, H, I] bf16, host
    repeats: int
    x: torch.Tensor | None = None  # [W, D, L, B, H] bf16 on the device (per batch size)
    _store: HostExpertStore | None = None
    _resident: tuple[torch.Tensor, torch.Tensor] | None = None

    def store(self) -> HostExpertStore:
        """The pinned host store of every expert, built once, shared by every cache run."""
        if self._store is None:
            L, E = self.w13.shape[:2]
            shapes = {"w13": tuple(self.w13.shape[2:]), "w2": tuple(self.w2.shape[2:])}
            self._store = HostExpertStore(L, E, shapes, torch.bfloat16, headroom_gib=2.0)
            for i in range(L):
                self._store.load_layer(i, {"w13": self.w13[i], "w2": self.w2[i]})
        return self._store

    def resident(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Every expert on the GPU: ([L, E, 2I, H], [L, E, H, I])."""
        if self._resident is None:
            self._resident = (self.w13.to(device), self.w2.to(device))
        return self._resident


def replay(R: Routing, setup: Setup, params: SelectionParams, pre: dict, gates, warmup: int,
           gpu: Gpu | None = None) -> Run:  # fmt: skip
    """Replay the recorded routing through ``setup``, decode step by step, layer by layer, each
    layer-step through ``lynx_sglang.step.moe_layer_step`` as the server runs it (selection in
    the step, so cache-aware selection sees the cache as it is and score eviction gets the
    selection's scores). On a GPU each step is computed and timed; on a CPU only counted (the
    kernel is a no-op) and the host time of the cache's planning in every layer-step measured.

    pre: {"lynx": SelectionResult over the whole trace} (the resident rows' distinct counts).
    """
    W, D, L, B, E = R.logits.shape
    k, dev = R.ids.shape[-1], R.logits.device
    counts = np.zeros((W * D, L, 5), dtype=np.int64)
    if setup.slots is None:  # resident: every expert on the GPU, nothing ever moves
        counts[..., DISTINCT] = counts[..., HITS] = _distinct_of(R, setup, pre)
        counts[..., WAVES] = 1
        if gpu is None:
            return Run(setup, counts[warmup:], None)
    cache, cross = None, setup.prefetch in ("cross-layer", "both")
    if setup.slots is not None:  # CPU: tiny experts; hits and misses do not depend on the size
        store = gpu.store() if gpu else HostExpertStore(L, E, {"w": (4,)}, torch.float32, None, 0)
        cache = ExpertCache(store, setup.slots, dev, k, setup.eviction, executor="hybrid",
                            prefetch=setup.prefetch)  # fmt: skip
        cache.executor.graphs = True  # the server captured its decode graphs at start-up
        if cross:
            for layer in range(L):
                cache.set_router(layer, gates[layer].to(dev))
        clock = _HostClock(cache)
    # The server's path for a decode batch of B (hybrid executor): a CUDA graph when every step
    # of B fits the slots (the capture rule; captured steps cap the kept set at K), else eager.
    captured, selection = True, params if setup.lynx else None
    if cache is not None:
        bounded = bounded_selection(params, setup.slots, E) if setup.lynx and setup.bound else None
        cap = decode_capture_cap(bounded, setup.slots, k, E)
        captured = cap is None or B <= cap
        if captured and bounded is not None:
            selection = bounded
    kernels = [_kernel(gpu, layer, dev) for layer in range(L)]
    step = Step(decode=True, num_valid=torch.tensor(B, device=dev) if captured else B)
    seen = torch.zeros(W, D, L, E, dtype=torch.bool) if setup.aware else None
    times, host_ns = [], []
    for rep in range(gpu.repeats if gpu else 1):
        events = []
        for n, (w, d) in enumerate(itertools.product(range(W), range(D))):
            timed = gpu is not None and n >= warmup
            if timed:
                events.append([torch.cuda.Event(enable_timing=True) for _ in range(2)])
                events[-1][0].record()
            for layer in range(L):
                if seen is not None and rep == 0:  # what cache-aware selection sees
                    seen[w, d, layer] = cache.resident_mask(layer).cpu()
                if gpu is not None:
                    x = gpu.x[w, d, layer]
                else:  # counting: the kernel ignores x; cross-layer prefetch predicts from it
                    x = R.hidden[w, d, layer] if cross else R.logits[w, d, layer, :, :1]
                moe_layer_step(layer, x, R.ids[w, d, layer], R.weights[w, d, layer],
                               R.logits[w, d, layer], kernels[layer], step, selection, cache)  # fmt: skip
                if cache is None:
                    continue
                if gpu is None and n >= warmup and not captured:
                    host_ns.append(clock.take())
                c = cache.counters(reset=True)["total"]
                counts[n, layer] = [c[f] for f in ("distinct", "hits", "misses", "prefetch_fills", "waves")]  # fmt: skip
            if timed:
                events[-1][1].record()
        if gpu is not None:
            torch.cuda.synchronize()
            times.append(statistics.fmean(s.elapsed_time(e) for s, e in events))
    path, host_us = "CUDA graph", 0.0
    if not captured:  # host-planned: its planning measured here, state pull and push included
        path = f"eager (B > {cap})"
        host_us = statistics.fmean(host_ns) / 1e3 if host_ns else 0.0
    step_time = statistics.median(times) if times else None
    return Run(setup, counts[warmup:], seen, step_time, path=path, host_us=host_us)


class _HostClock:
    """Host time of the cache's planning in a layer-step (``prepare`` with its one device->host
    read and uploads, the later waves it plans on demand, and ``end_step``): what an eager step
    makes the GPU wait for. The selection is not in it: in the server it runs on the device
    (two kernel launches)."""

    def __init__(self, cache: ExpertCache) -> None:
        self.ns = 0
        cache.prepare = self._timed(cache.prepare, waves=True)
        cache.end_step = self._timed(cache.end_step)

    def _timed(self, fn, waves: bool = False):
        def timed(*args, **kwargs):
            t0 = time.perf_counter_ns()
            try:
                plan = fn(*args, **kwargs)
                # a multi-wave plan's later waves are planned as the step reaches them
                return plan.map_later(self._timed) if waves else plan
            finally:
                self.ns += time.perf_counter_ns() - t0

        return timed

    def take(self) -> int:
        ns, self.ns = self.ns, 0
        return ns


def _kernel(gpu: Gpu | None, layer: int, device):
    """The replay's MoE kernel for ``layer``: none on a CPU (only counters are measured there),
    else the expert computation on the layer's resident weights or the cache's slot weights."""
    if gpu is None:
        return lambda x, ids, weights, experts: x

    def kernel(x, ids, weights, experts):
        if experts is None:  # every expert resident
            w13, w2 = gpu.resident(device)
            return experts_forward(x, w13[layer], w2[layer], ids.long(), weights)
        return experts_forward(x, experts["w13"], experts["w2"], ids.long(), weights)

    return kernel


def _distinct_of(R: Routing, setup: Setup, pre: dict) -> np.ndarray:
    """[W * D, L] distinct experts per step and layer of the routing ``setup`` computes."""
    ids = pre["lynx"].topk_ids if setup.lynx else R.ids  # [W, D, L, B, k]
    W, D, L, B, k = ids.shape
    E = R.logits.shape[-1]
    hit = torch.zeros(W, D, L, E + 1, dtype=torch.bool, device=ids.device)
    hit.scatter_(-1, ids.reshape(W, D, L, B * k), True)
    return hit[..., :E].sum(-1).reshape(W * D, L).cpu().numpy()


class _AccelExperts(torch.nn.Module):
    """One MoE layer's experts as one module: the unit accelerate places (GPU or host)."""

    def __init__(self, w13: torch.Tensor, w2: torch.Tensor):
        super().__init__()
        self.w13 = torch.nn.Parameter(w13, requires_grad=False)  # [E, 2I, H]
        self.w2 = torch.nn.Parameter(w2, requires_grad=False)  # [E, H, I]

    def forward(self, x, ids, wts):
        return experts_forward(x, self.w13, self.w2, ids, wts)


def accelerate_plan(layers: torch.nn.ModuleList, slots: int) -> tuple[dict, list[int]]:
    """accelerate's own ``infer_auto_device_map`` at a GPU budget of ``slots`` experts per layer:
    (its device map, the layers it leaves in host memory). Runs on meta tensors too, so the CPU
    run computes the same placement the GPU run measures."""
    from accelerate import infer_auto_device_map

    L, E = len(layers), layers[0].w13.shape[0]
    budget = slots * L * (layers[0].w13[0].numel() + layers[0].w2[0].numel()) * 2  # bf16 bytes
    mem = {0: budget, "cpu": 2 * budget * E // slots}
    log = logging.getLogger("accelerate.utils.modeling")  # "Device 0 is not available" on a CPU
    level = log.level
    log.setLevel(logging.ERROR if not torch.cuda.is_available() else level)
    try:
        dmap = infer_auto_device_map(layers, max_memory=mem,
                                     no_split_module_classes=["_AccelExperts"])  # fmt: skip
    finally:
        log.setLevel(level)
    offloaded = [i for i in range(L) if dmap.get(str(i), dmap.get("")) in ("cpu", "disk")]
    return dmap, offloaded


def accelerate_counts(R: Routing, offloaded: list[int], warmup: int) -> np.ndarray:
    """Exact counters of accelerate's CPU offload: a GPU layer hits every expert it needs; an
    offloaded layer's hooks copy the whole module, all E experts, at every step."""
    W, D, L, B, E = R.logits.shape
    counts = np.zeros((W * D, L, 5), dtype=np.int64)
    counts[..., DISTINCT] = _distinct_of(R, Setup("", None), {})
    counts[..., HITS] = counts[..., DISTINCT]
    counts[:, offloaded, HITS] = 0
    counts[:, offloaded, MISSES] = E
    return counts[warmup:]


def plan_accelerate(R: Routing, shape: Shape, slots: int, warmup: int) -> Run:
    """accelerate's CPU offload on a CPU machine: its own placement on meta tensors of the real
    expert size, exact counters (times projected from them like every other row)."""
    W, D, L, B, E = R.logits.shape
    with torch.device("meta"):
        layers = torch.nn.ModuleList(
            _AccelExperts(torch.empty(E, 2 * shape.inter, shape.hidden, dtype=torch.bfloat16),
                          torch.empty(E, shape.hidden, shape.inter, dtype=torch.bfloat16))
            for _ in range(L))  # fmt: skip
    _, offloaded = accelerate_plan(layers, slots)
    setup = Setup(ACCEL_PEER, slots, prefetch=f"device_map: {L - len(offloaded)}/{L} on GPU")
    return Run(setup, accelerate_counts(R, offloaded, warmup), None, path="eager (hooks)")


def measure_accelerate(R: Routing, gpu: Gpu, slots: int, warmup: int) -> Run:
    """HF accelerate's CPU offload of the same expert weights at the same GPU budget (GPU only).

    accelerate places whole modules: the layers that fit ``slots * L`` experts' bytes stay on
    the GPU, the others stay in host memory and are copied in at every forward (its hooks).
    """
    from accelerate import dispatch_model

    W, D, L, B, E = R.logits.shape
    layers = torch.nn.ModuleList(_AccelExperts(gpu.w13[i], gpu.w2[i]) for i in range(L))
    dmap, offloaded = accelerate_plan(layers, slots)
    torch.cuda.empty_cache()
    base_mem = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    dispatch_model(layers, dmap, main_device=torch.device("cuda", 0))
    times = []
    for _ in range(gpu.repeats):
        events = []
        for n, (w, d) in enumerate(itertools.product(range(W), range(D))):
            if n >= warmup:
                events.append([torch.cuda.Event(enable_timing=True) for _ in range(2)])
                events[-1][0].record()
            for i in range(L):
                layers[i](gpu.x[w, d, i], R.ids[w, d, i], R.weights[w, d, i])
            if n >= warmup:
                events[-1][1].record()
        torch.cuda.synchronize()
        times.append(statistics.fmean(s.elapsed_time(e) for s, e in events))
    setup = Setup(ACCEL_PEER, slots, prefetch=f"device_map: {L - len(offloaded)}/{L} on GPU")
    peak = torch.cuda.max_memory_allocated() - base_mem
    del layers
    torch.cuda.empty_cache()
    return Run(setup, accelerate_counts(R, offloaded, warmup), None, statistics.median(times), peak)


# ---------------------------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------------------------


def step_ms(run: Run, batch: int, top_k: int, shape: Shape, hw: Hardware) -> float:
    """Mean decode-step time: measured if the run was timed, else projected at ``shape``."""
    if run.step_ms is not None:
        return run.step_ms
    c = run.counts
    t = layer_seconds(c[..., DISTINCT], c[..., MISSES], c[..., PREFETCHED], batch, top_k, shape, hw,
                      host_s=run.host_us * 1e-6)  # fmt: skip
    return float(step_seconds(t, shape).mean() * 1e3)


def best_run(runs: list[Run], batch: int, top_k: int, shape: Shape, hw: Hardware) -> Run:
    """The fastest of a sweep (the baselines and the product both run at their best settings)."""
    return min(runs, key=lambda r: step_ms(r, batch, top_k, shape, hw))


def make_row(run: Run, batch: int, top_k: int, E: int, shape: Shape, hw: Hardware, q: dict,
             sweep: list[Run] | None = None, measured: bool = False) -> dict:  # fmt: skip
    """One system x batch x K row; bytes and times at ``shape`` (its expert size and depth)."""
    c, s = run.counts, run.setup
    eb, steps = shape.expert_bytes, c.shape[0]
    demand = c[..., HITS].sum() + c[..., MISSES].sum()
    moved = (c[..., MISSES].sum() + c[..., PREFETCHED].sum()) * shape.layers / c.shape[1]
    ms = step_ms(run, batch, top_k, shape, hw)
    slots = s.slots if s.slots is not None else E
    row = {
        "system": s.system, "batch": batch, "slots": slots, "k_fraction": round(slots / E, 4),
        "eviction": s.eviction, "prefetch": s.prefetch, "cache_aware": s.aware,
        "selection": s.lynx, "budget": s.budget, "shape": shape.name,
        "distinct_per_layer_step": round(float(c[..., DISTINCT].mean()), 3),
        "hit_rate": round(float(c[..., HITS].sum() / demand), 4) if demand else 1.0,
        "misses_per_layer_step": round(float(c[..., MISSES].mean()), 3),
        "prefetched_per_layer_step": round(float(c[..., PREFETCHED].mean()), 3),
        "h2d_bytes_per_token": round(float(moved * eb / (steps * batch)), 1),
        "decode_ms_per_step": round(ms, 4),
        "ms_per_token": round(ms / batch, 5),
        "tokens_per_s": round(batch / ms * 1e3, 1),
        "time_source": "measured" if measured else "projected",
        "server_path": run.path,
        "host_us_per_layer_step": round(run.host_us, 1),
        "expert_gpu_bytes": run.expert_gpu_bytes or slots * eb * shape.layers,
        **q,
        "status": "ok",
    }  # fmt: skip
    if sweep:  # every setting tried, fastest first
        keys = ("eviction", "prefetch", "tokens_per_s", "hit_rate", "h2d_bytes_per_token")
        tried = [make_row(r, batch, top_k, E, shape, hw, q, None, measured) for r in sweep]
        row["swept"] = sorted(({k: t[k] for k in keys} for t in tried), key=lambda d: -d["tokens_per_s"])  # fmt: skip
    return row


def peer_row(system: str, batch: int, slots: int, E: int, shape: Shape, status: str) -> dict:
    """A peer that did not run here: no numbers, only why."""
    none = ("distinct_per_layer_step", "hit_rate", "misses_per_layer_step", "budget",
            "prefetched_per_layer_step", "h2d_bytes_per_token", "decode_ms_per_step",
            "ms_per_token", "tokens_per_s", "time_source", "expert_gpu_bytes",
            "ppl_rel_increase", "accuracy_delta_points", "agreement")  # fmt: skip
    row = dict.fromkeys(none)
    row.update(system=system, batch=batch, slots=slots, k_fraction=round(slots / E, 4),
               eviction="-", prefetch="-", cache_aware=False, selection=False, shape=shape.name,
               quality_source="exact (no selection)", ci95=None, quality_verdict="exact",
               status=status)  # fmt: skip
    return row


# ---------------------------------------------------------------------------------------------
# Quality
# ---------------------------------------------------------------------------------------------


def quality_cost(r: quality.Result | None, base: quality.Result, source: str) -> dict:
    """The quality columns of a row (selection off: the cache is exact, nothing changes)."""
    if r is None:
        return {"ppl_rel_increase": 0.0, "accuracy_delta_points": 0.0, "agreement": 1.0,
                "ci95": None, "quality_verdict": "exact", "quality_source": source}  # fmt: skip
    ci = quality.paired_intervals(r, base)
    return {"ppl_rel_increase": round(r.ppl / base.ppl - 1, 5),
            "accuracy_delta_points": round(100 * (r.accuracy - base.accuracy), 3),
            "agreement": round(r.agree / r.count, 5), "ci95": ci,
            "quality_verdict": quality.gate_verdict(ci), "quality_source": source,
            "quality_sequences": len(r.per_seq)}  # fmt: skip


def quality_with_resident(model: MoEModel, batches: list[torch.Tensor], prefill: int,
                          params: SelectionParams, resident: torch.Tensor,
                          base_argmax: list[torch.Tensor]) -> quality.Result:  # fmt: skip
    """bench/quality.py's measurement for cache-aware selection: each decode step's selection
    sees the resident mask the cache replay recorded at that step and layer ([W, D, L, E])."""
    r, _, _ = quality.run_setting(model, batches, prefill, params, base_argmax, residents=resident)
    return r


def meets_goal(row: dict) -> bool:
    """The quality goal met on the 95 % bound (exact rows meet it; unresolved ones do not)."""
    return row.get("quality_verdict") in ("exact", "met")


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = ap.add_argument
    add("--model", default=str(SHIPPED_MODEL))
    add("--quick", action="store_true", help="a small slice: under a minute on 2 CPU cores")
    add("--batches", default="1,4,16,32,64")
    add("--k-fractions", default="0.25,0.5,0.75", help="K (slots per layer) as fractions of E")
    add("--primary-k", type=float, default=0.5, help="K fraction of the headline speedup")
    add("--prefill", type=int, default=64)
    add("--decode", type=int, default=64, help="decode steps per window")
    add("--warmup", type=int, default=8, help="first decode steps not counted (cache warm-up)")
    add("--max-batches", type=int, default=8,
        help="windows of B sequences per batch size: replayed, and the quality sample of the "
             "rows whose selection reads the cache (+aware, +miss)")
    add("--quality-windows", type=int, default=12,
        help="windows of the quality sample of every other selection row (at least the replayed)")
    add("--quality-sequences", type=int, default=192,
        help="at batch > 1, every quality sample holds at least this many sequences (the replayed "
             "windows too, for the rows whose selection reads the cache): 192 keeps a met row's "
             "95 %% interval within about ±0.2 %% Δppl at batch 4 (it was ±0.22-0.40 on 32-48)")
    add("--frontier", default=str(RESULTS / "frontier.json"),
        help="a frontier JSON (bench.quality): a plain selection row takes its quality from the "
             "frontier's point for the same weights, held-out code, batch and setting when that "
             "point's Δppl interval is within ±0.2 %%; empty: measure every row here")
    add("--evictions", default="lru,lfu,score")
    add("--prefetches", default="cross-layer", help="prefetch modes swept besides off")
    add("--budget", type=float, default=quality.DEFAULT.budget, help="the Lynx budget")
    add("--budgets", default="0.6,0.8", help="more budgets for lynx+offload at the primary K")
    add("--cache-bonus", type=float, default=0.3, help="cache-aware selection's resident bonus")
    add("--miss-budget", type=float, default=quality.DEFAULT.miss_budget or quality.DEFAULT.budget,
        help="miss-aware selection's budget on the missing experts (+miss; --budgets sweep it too)")
    add(
        "--shape",
        default="qwen3-30b-a3b",
        choices=["shipped", *SHAPES],
        help="expert size of the rows (CPU: projected; GPU: random weights of this size)",
    )
    add("--device", default="auto", choices=["auto", "cpu", "cuda"])
    add("--repeats", type=int, default=3, help="GPU: timed repeats (median)")
    add("--name", default="", help="output name (default compare_offload[_quick])")
    add("--out-dir", default=str(RESULTS))
    add("--no-plot", action="store_true")
    add("--formats", default="bf16,fp8,int4",
        help="expert formats of the memory-budget section (bf16, fp8, int4, int3; empty: none)")
    add("--expert-memory", default="0.25",
        help="GPU budgets for routed experts, as fractions of the layer's E experts in bf16")
    add("--device-shapes", default="qwen3-235b-a22b-fp8,deepseek-v3-fp8",
        help="shapes projected at the expert budget one device leaves them (Shape.device_expert_bytes)")
    add("--peer-counts", default=str(peers.RECORDED),
        help="SGLang paged-experts counters a run with SGLang recorded, read where it is absent")
    if ap.parse_known_args(argv)[0].quick:  # the preset; explicit flags still win
        ap.set_defaults(**QUICK)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    t0 = time.time()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small tensors: bookkeeping, not math (and a shared 2-core machine)
    try:
        torch.manual_seed(0)
        bench = Bench(args, t0)
        for B in bench.batches:
            bench.run_batch(B)
        return bench.finish()
    finally:
        torch.set_num_threads(threads)


class Bench:
    """One comparison: the model, the knobs, and the rows gathered batch size by batch size."""

    def __init__(self, args: argparse.Namespace, t0: float) -> None:
        self.args, self.t0, self.hw = args, t0, Hardware()
        self.model_dir = Path(args.model)
        if not (self.model_dir / "model.safetensors").exists():
            raise SystemExit(
                f"{self.model_dir}: no model.safetensors (python -m bench.train_model)"
            )
        self.model = model = MoEModel.from_pretrained(self.model_dir)
        c = model.config
        L, E, k = self.L, self.E, self.k = c.num_hidden_layers, c.num_experts, c.num_experts_per_tok
        self.gates = [model.expert_weights(i)[0] for i in range(L)]  # routers [E, H]
        self.shipped = Shape("shipped", c.hidden_size, c.moe_intermediate_size, L, E, k)
        self.shape = self.shipped if args.shape == "shipped" else SHAPES[args.shape]
        self.measured = torch.cuda.is_available() and args.device != "cpu"
        if args.device == "cuda" and not self.measured:
            raise SystemExit("--device cuda: no CUDA device here")
        self.device = torch.device("cuda" if self.measured else "cpu")
        # miss-aware selection is its own variant (+miss), measured with the masks it saw
        self.params = replace(quality.DEFAULT, budget=args.budget, miss_budget=0.0)
        self.budgets = [float(b) for b in args.budgets.split(",") if b and float(b) != args.budget]
        self.batches = [int(b) for b in args.batches.split(",") if b]
        self.fractions = [float(f) for f in args.k_fractions.split(",") if f]
        if args.primary_k not in self.fractions:
            args.primary_k = self.fractions[len(self.fractions) // 2]
        self.slots_of = {f: max(k, math.ceil(f * E)) for f in self.fractions}
        self.evictions = [e for e in args.evictions.split(",") if e]
        self.prefetches = [p for p in args.prefetches.split(",") if p and p != "off"]
        cross = any(p in ("cross-layer", "both") for p in self.prefetches)
        self.keep_hidden = cross or (self.measured and args.shape == "shipped")
        self.heldout = quality.load_heldout_ids(self.model_dir)
        self.rows: list[dict] = []
        self.formats = [f for f in args.formats.split(",") if f]
        # (label, fraction of the layer's E experts in bf16, shape the rows are projected at)
        self.memories = [(f"{float(m):g} x bf16 experts", float(m), self.shape)
                         for m in args.expert_memory.split(",") if m]  # fmt: skip
        for name in (n for n in args.device_shapes.split(",") if n):
            sh = SHAPES[name]
            self.memories.append((f"one H200 at {name}", sh.device_fraction("bf16"), sh))
        self.format_rows: list[dict] = []
        self._qmodels: dict = {}
        self._sweeps: dict = {}
        # SGLang's paged experts: its own code where installed (recorded beside the results),
        # else what a run with it recorded for the same routing
        self.sglang = peers.PeerCounts(args.peer_counts, Path(args.out_dir) / peers.RECORDED.name)
        self.runs: dict[tuple, list[Run]] = {}  # (batch, K fraction, system) -> its sweep
        hw, cpu = self.hw, platform.processor() or platform.machine()
        self.device_name = torch.cuda.get_device_name() if self.measured else f"cpu ({cpu})"
        what = "measured (CUDA events)" if self.measured else f"projected ({hw.describe()})"
        self.routing_src = (
            f"{self.model_dir.name}: held-out text, batched teacher-forced decode; routing of the "
            f"base model (E={E}, top-{k}, {L} layers) replayed through the policy and the cache"
        )
        print(f"compare_offload: {self.device_name}; times {what}")
        print(f"routing: {self.routing_src}")
        self.gpu = None
        if self.measured:  # what ran is what is reported: the traced layers at this expert size
            self.gpu = _gpu_weights(model, self.shape, self.shipped, args.repeats)
            self.shape = replace(self.shape, name=f"{self.shape.name} x {L} layers", layers=L)
            src = "the shipped weights" if args.shape == "shipped" else "random bf16 weights"
            sb = self.shape.shared_bytes
            shared = f"; its shared experts ({sb / 1e6:.1f} MB/layer) are not run" if sb else ""
            print(f"GPU: {src}, {self.shape.expert_bytes / 1e6:.2f} MB/expert, {E} x {L} layers"
                  f"{shared}")  # fmt: skip
        else:
            sh = self.shape
            scaled = "" if sh is self.shipped else f" (counters of the {L} traced layers, scaled)"
            shared = (
                f" + {sh.shared_bytes / 1e6:.2f} MB shared (resident)" if sh.shared_bytes else ""
            )
            print(f"bytes and times at {sh.name}: {sh.expert_bytes / 1e6:.2f} MB/expert{shared}, "
                  f"{sh.layers} layers{scaled}")  # fmt: skip

    def row(self, run: Run, B: int, q: dict, sweep: list[Run] | None = None) -> dict:
        return make_row(run, B, self.k, self.E, self.shape, self.hw, q, sweep, self.measured)

    def run_batch(self, B: int) -> None:
        """Every system at batch B and every K: replay, pick the best settings, add the rows."""
        args, model, P = self.args, self.model, self.args.prefill
        # batch 1 selects nothing (its kept set is the token's own top-k): no larger sample
        least = 0 if B == 1 else math.ceil(args.quality_sequences / B)
        wins = quality.make_batches(self.heldout, B, P + args.decode, max(args.max_batches, least))
        if not wins:
            print(f"batch {B}: held-out text too short, skipped")
            return
        base, base_am, _ = quality.run_setting(model, wins, P, None)
        # quality of rows that do not depend on the cache: a larger sample of the same text
        # (the replayed windows first), so that its interval can resolve the gate
        qwins = quality.make_batches(self.heldout, B, P + args.decode,
                                     max(args.quality_windows, len(wins), least))  # fmt: skip
        qbase, qbase_am, _ = (base, base_am, None) if len(qwins) == len(wins) else \
            quality.run_setting(model, qwins, P, None)  # fmt: skip
        R = collect_routing(model, wins, P, self.keep_hidden)
        warmup = min(args.warmup, R.ids.shape[0] * R.ids.shape[1] - 1)
        if self.gpu is not None:
            R = R.to(self.device)
            self.gpu.x = _gpu_x(R, self.gpu, args.shape == "shipped")
        exact = quality_cost(None, base, "exact (selection off; the cache is lossless)")
        ctx = dict(B=B, R=R, wins=wins, base=base, base_am=base_am, warmup=warmup, qwins=qwins,
                   qbase=qbase, qbase_am=qbase_am)  # fmt: skip
        lynx = self.selection(ctx, self.params)
        ctx.update(pre=lynx["pre"], params=self.params)
        self.rows.append(self.row(self.replay(ctx, Setup("resident", None)), B, exact))
        lynx_setup = Setup("lynx", None, lynx=True, budget=self.params.budget)
        self.rows.append(self.row(self.replay(ctx, lynx_setup), B, lynx["q"]))
        for f in self.fractions:
            K = self.slots_of[f]
            modes = ["off", *self.prefetches]
            sweep = [self.replay(ctx, Setup(OURS, K, eviction=e, prefetch=m))
                     for e in self.evictions for m in modes]  # fmt: skip
            self.runs[(B, f, OURS)] = sweep
            self.rows.append(self.row(best_run(sweep, B, self.k, self.shape, self.hw), B, exact, sweep))  # fmt: skip
            self.rows += self.peers(ctx, K, exact, lynx["q"])
            self.product_rows(ctx, f, lynx, VARIANTS)
            if f == args.primary_k:  # the quality vs speed trade-off: other budgets
                for b in self.budgets:
                    sel = self.selection(ctx, replace(self.params, budget=b))
                    names = {f"{n} b={b:g}": VARIANTS[n] for n in BUDGET_VARIANTS}
                    self.product_rows({**ctx, "pre": sel["pre"], "params": sel["params"],
                                       "miss_budget": b}, f, sel, names)  # fmt: skip
        if self.formats and not self.measured:
            self.run_formats(ctx)
        print(f"  batch {B}: {len(wins)} window(s) x {R.ids.shape[1]} decode steps, "
              f"{time.time() - self.t0:.1f} s", flush=True)  # fmt: skip

    def selection(self, ctx: dict, params: SelectionParams) -> dict:
        """A Lynx setting at this batch: its quality (bench/quality.py) and its routing."""
        R, B = ctx["R"], ctx["B"]
        sel = select_experts_ref(R.logits, R.ids, R.weights, params)
        found = self.args.frontier and quality.frontier_point(
            Path(self.args.frontier), self.model_dir, "code", B, params, REUSE_HALF_WIDTH)
        if found:
            run, pt = found
            source = (f"{Path(self.args.frontier).name}: the same weights, held-out code and batch, "
                      f"{run['windows']} window(s) x {B} x {run['decode_tokens'] // max(run['sequences'], 1)} "
                      "decode tokens")  # fmt: skip
            q = {"ppl_rel_increase": pt["ppl_rel_increase"],
                 "accuracy_delta_points": pt["accuracy_delta_points"], "agreement": pt["agreement"],
                 "ci95": pt["ci95"], "quality_verdict": quality.gate_verdict(pt["ci95"]),
                 "quality_source": source, "quality_sequences": pt["sequences"]}  # fmt: skip
            return {"params": params, "q": q, "pre": {"lynx": sel}}
        lyn, _, _ = quality.run_setting(self.model, ctx["qwins"], self.args.prefill, params, ctx["qbase_am"])  # fmt: skip
        q = quality_cost(lyn, ctx["qbase"], "bench/quality.py at this batch")
        return {"params": params, "q": q, "pre": {"lynx": sel}}

    def replay(self, ctx: dict, setup: Setup, params: SelectionParams | None = None) -> Run:
        params = params or ctx["params"]
        return replay(ctx["R"], setup, params, ctx["pre"], self.gates, ctx["warmup"], self.gpu)

    def peers(self, ctx: dict, K: int, exact: dict, lynx_q: dict) -> list[dict]:
        """SGLang's paged experts replayed through its own residency code (exact counters; its
        CUDA-graph capture cap applied), alone and under Lynx; Belady's MIN on the same traces
        (the limit no eviction policy can beat); accelerate's CPU offload (its own placement:
        exact counters here, measured on a GPU)."""
        B, E, shape, warmup = ctx["B"], self.E, self.shape, ctx["warmup"]
        R, sel = ctx["R"], ctx["pre"]["lynx"]
        W, D, L = R.ids.shape[:3]
        out = []
        for name, ids, q in ((SGLANG_PEER, R.ids, exact), (SGLANG_LYNX, sel.topk_ids, lynx_q)):
            flat = ids.reshape(W * D, L, *ids.shape[3:]).cpu()  # [N, L, B, k] in decode order
            got = self.sglang.get(flat, E, K)
            if got is None:  # no SGLang here, and no run with it saw this routing
                out.append(peer_row(name, B, K, E, shape, "absent: SGLang is not installed "
                                    "here and no run with SGLang recorded this routing"))  # fmt: skip
                continue
            counts, plan_us, source = got
            captured = B <= peers.capture_cap(K, self.k)
            path = "CUDA graph" if captured else f"eager (B > {peers.capture_cap(K, self.k)})"
            lynx = name == SGLANG_LYNX
            setup = Setup(name, K, lynx=lynx, eviction="lru",
                          budget=self.params.budget if lynx else None)  # fmt: skip
            run = Run(setup, counts[warmup:], None, path=path,
                      host_us=0.0 if captured else plan_us)  # fmt: skip
            out.append({**self.row(run, B, q), "counter_source": source})
        # MIN under Lynx on the routing lynx+offload serves at this B: captured steps (B up to
        # the cap) run the selection with its kept set capped at K
        bounded = bounded_selection(self.params, K, E)
        product_ids = sel.topk_ids
        if B <= (decode_capture_cap(bounded, K, self.k, E) or B):
            product_ids = select_experts_ref(R.logits, R.ids, R.weights, bounded).topk_ids
        for name, ids, q in ((MIN_BOUND, R.ids, exact), (MIN_LYNX, product_ids, lynx_q)):
            flat = ids.reshape(W * D, L, *ids.shape[3:]).cpu()
            setup = Setup(name, K, lynx=name == MIN_LYNX, eviction="MIN")
            run = Run(setup, peers.replay_belady(flat, E, K)[warmup:], None, path="bound")
            out.append(self.row(run, B, q))
        try:
            run = (plan_accelerate(R, shape, K, warmup) if self.gpu is None
                   else measure_accelerate(R, self.gpu, K, warmup))  # fmt: skip
            return out + [self.row(run, B, exact)]
        except Exception as e:  # report, never estimate
            return out + [peer_row(ACCEL_PEER, B, K, E, shape, f"failed: {type(e).__name__}: {e}")]

    def product_rows(self, ctx: dict, f: float, lynx: dict, variants: dict) -> None:
        """lynx+offload variants at K: each at its best eviction (and prefetch mode)."""
        B, K, params = ctx["B"], self.slots_of[f], ctx["params"]
        reads = {False: params, "bonus": replace(params, cache_bonus=self.args.cache_bonus),
                 "miss": replace(params, miss_budget=ctx.get("miss_budget", self.args.miss_budget))}  # fmt: skip
        for name, (aware, pf, bound) in variants.items():
            if pf and not self.prefetches:
                continue
            p, aware = reads[aware], bool(aware)
            modes = self.prefetches if pf else ["off"]
            sweep = [self.replay(ctx, Setup(name, K, True, aware, e, m, params.budget, bound), p)
                     for e in self.evictions for m in modes]  # fmt: skip
            self.runs[(B, f, name)] = sweep
            best = best_run(sweep, B, self.k, self.shape, self.hw)
            # the quality of what ran: captured steps cap the kept set at K (see replay)
            bounded = bounded_selection(p, K, self.E)
            ran = bounded if best.path == "CUDA graph" and bound else p
            q = lynx["q"]
            if aware:
                r = quality_with_resident(self.model, ctx["wins"], self.args.prefill, ran,
                                          best.resident, ctx["base_am"])  # fmt: skip
                q = quality_cost(r, ctx["base"], "bench/quality.py measure; selection sees the "
                                 "resident masks of this replay")  # fmt: skip
            elif ran is not p:
                r, _, _ = quality.run_setting(self.model, ctx["qwins"], self.args.prefill, ran,
                                              ctx["qbase_am"])  # fmt: skip
                q = quality_cost(r, ctx["qbase"], "bench/quality.py at this batch, kept set "
                                 "capped at K (captured steps)")  # fmt: skip
            self.rows.append(self.row(best, B, q, sweep))

    def qmodel(self, fmt: str) -> MoEModel:
        """The model with every expert quantised to ``fmt`` (RTN) and dequantised, built once."""
        if fmt not in self._qmodels:
            self._qmodels[fmt] = quality.quantized_model(self.model, fmt)
        return self._qmodels[fmt]

    def run_formats(self, ctx: dict) -> None:
        """The memory-budget section at this batch: per budget and format, K from the format's
        bytes, offloading alone (ours, SGLang) and lynx+offload, each with its two qualities."""
        B, P, R, W = ctx["B"], self.args.prefill, ctx["R"], ctx["R"].ids.shape[0]
        D, L = R.ids.shape[1:3]
        bases = {}  # fmt -> (its unmodified run on the quality sample, on the replayed windows)
        for fmt in dict.fromkeys(["bf16", *self.formats]):
            qm = self.qmodel(fmt)
            qb, _, _ = quality.run_setting(qm, ctx["qwins"], P, None, ctx["qbase_am"])
            wb, _, _ = quality.run_setting(qm, ctx["wins"], P, None, ctx["base_am"])
            bases[fmt] = (qb, wb)

        def two(r_q, fmt: str, on: int, source: str) -> tuple[dict, dict]:
            """(quality vs the model in fmt, vs the bf16 experts) of one result."""
            same = quality_cost(r_q, bases[fmt][on], source) if r_q is not None else \
                quality_cost(None, bases[fmt][on], "exact (selection off; the cache is lossless)")  # fmt: skip
            sent = quality_cost(r_q if r_q is not None else bases[fmt][on], bases["bf16"][on],
                                f"{fmt} (RTN) against bf16 experts")  # fmt: skip
            if fmt == "bf16" and r_q is None:
                sent = same
            keys = ("ppl_rel_increase", "accuracy_delta_points", "ci95", "quality_verdict")
            return same, {k: sent.get(k) for k in keys}

        for label, m, shape in self.memories:
            for fmt in self.formats:
                K = slots_at_memory(m, fmt, shape, self.E, self.k)
                sh = shape.with_format(fmt)
                tag = {"format": fmt, "memory": label, "memory_fraction": round(m, 4)}
                if not K:
                    row = peer_row(OURS, B, self.k, self.E, sh, f"does not fit: fewer than top-{self.k} "
                                   f"{fmt} experts per layer in {label}")  # fmt: skip
                    self.format_rows.append({**row, **tag, "slots": 0})
                    continue
                same, sent = two(None, fmt, 0, "")
                sweep = self._sweep(ctx, B, K, OURS, [Setup(OURS, K, eviction=e, prefetch=md)
                                    for e in self.evictions for md in ["off", *self.prefetches]])  # fmt: skip
                best = best_run(sweep, B, self.k, sh, self.hw)
                self.format_rows.append({**self._frow(best, B, sh, same), **tag, "sent_from_bf16": sent})
                flat = R.ids.reshape(W * D, L, *R.ids.shape[3:]).cpu()
                got = self.sglang.get(flat, self.E, K) if fmt in SGLANG_FORMATS else None
                if got is not None:
                    counts, plan_us, source = got
                    captured = B <= peers.capture_cap(K, self.k)
                    run = Run(Setup(SGLANG_PEER, K, eviction="lru"), counts[ctx["warmup"]:], None,
                              path="CUDA graph" if captured else f"eager (B > {peers.capture_cap(K, self.k)})",
                              host_us=0.0 if captured else plan_us)  # fmt: skip
                    self.format_rows.append({**self._frow(run, B, sh, same), **tag, "sent_from_bf16": sent,
                                             "counter_source": source})  # fmt: skip
                for name, (aware, pf, bound) in FORMAT_VARIANTS.items():
                    if pf and not self.prefetches:
                        continue
                    p = replace(self.params, miss_budget=self.args.miss_budget) if aware else self.params
                    sweep = self._sweep(ctx, B, K, name, [Setup(name, K, True, bool(aware), e, md, p.budget, bound)
                                        for e in self.evictions for md in (self.prefetches if pf else ["off"])], p)  # fmt: skip
                    best = best_run(sweep, B, self.k, sh, self.hw)
                    bounded = bounded_selection(p, K, self.E)
                    ran = bounded if best.path == "CUDA graph" and bound else p
                    if aware:
                        r = quality_with_resident(self.qmodel(fmt), ctx["wins"], P, ran, best.resident,
                                                  ctx["base_am"])  # fmt: skip
                        same, sent = two(r, fmt, 1, "bench/quality.py measure on the format's model; "
                                         "selection sees the resident masks of this replay")  # fmt: skip
                    else:
                        r, _, _ = quality.run_setting(self.qmodel(fmt), ctx["qwins"], P, ran, ctx["qbase_am"])
                        same, sent = two(r, fmt, 0, "bench/quality.py on the format's model at this batch")
                    self.format_rows.append({**self._frow(best, B, sh, same), **tag, "sent_from_bf16": sent})

    def _sweep(self, ctx: dict, B: int, K: int, name: str, setups: list, params=None) -> list[Run]:
        """Replays at K, shared by every budget and format that lands on the same K."""
        key = (B, K, name)
        if key not in self._sweeps:
            self._sweeps[key] = [self.replay(ctx, st, params) for st in setups]
        return self._sweeps[key]

    def _frow(self, run: Run, B: int, shape: Shape, q: dict) -> dict:
        return make_row(run, B, self.k, self.E, shape, self.hw, q, None, self.measured)

    def finish(self) -> dict:
        """Summary, table, JSON file, plots; returns the result."""
        args = self.args
        result = summarise(self)
        result["formats"] = summarise_formats(self)
        result.update(
            device=self.device_name, routing=self.routing_src, model=str(self.model_dir),
            quality_goal=QUALITY_GOAL, seconds=round(time.time() - self.t0, 1),
            selection={"policy": self.params.policy, "budget": self.params.budget,
                       "layer_budgets": self.params.layer_budgets, "other_budgets": self.budgets,
                       "cache_bonus": args.cache_bonus, "miss_budget": args.miss_budget},
        )  # fmt: skip
        self.sglang.save()
        print_report(result)
        name = args.name or ("compare_offload_quick" if args.quick else "compare_offload")
        path = Path(args.out_dir) / f"{name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        if not args.no_plot:
            result["plots"] = [Path(p).name for p in plot(result, path, QUALITY_GOAL)]  # beside it
        path.write_text(json.dumps(result, indent=1) + "\n")
        print(json.dumps(compact(result, path)))
        return result


def compact(result: dict, path: Path) -> dict:
    """The last stdout line: the headline and where the rest is (at most 2 KB)."""
    product = {B: {"system": p["system"], "speedup": result["speedup_lynx_offload_vs_offload"][B],
                   "ppl_rel_increase": p["ppl_rel_increase"], "quality_verdict": p["quality_verdict"]}
               for B, p in result["product"].items()}  # fmt: skip
    return {"bench": "compare_offload", "measured": result["measured"],
            "time_source": result["time_source"], "device": result["device"],
            "shape": result["shape"], "slots": result["slots"],
            "primary_k_fraction": result["primary_k_fraction"], "product": product,
            "goal_met": result["goal"]["met"], "rows": len(result["rows"]),
            "seconds": result["seconds"], "out": str(path),
            "formats": compact_formats(result.get("formats"))}  # fmt: skip


def compact_formats(fm: dict | None) -> dict | None:
    """The memory-budget section's headline at its first budget: per batch, the same-format
    speedup of each format and the bf16 checkpoint's best row against SGLang's best format."""
    if not fm or not fm.get("budgets"):
        return None
    label, first = next(iter(fm["budgets"].items()))
    out = {"memory": label, "K": first["K"]}
    for B, at in first["by_batch"].items():
        s = at["bf16_checkpoint"]
        out[B] = {"same_format": {f: v["speedup_same_format"] for f, v in at["formats"].items()},
                  "bf16_sent_as": s.get("format"), "vs_sglang_best": s.get("speedup_vs_sglang_best")}  # fmt: skip
    return out


def summarise_formats(bench: Bench) -> dict:
    """Per budget and batch: each format's product over offloading alone at that same format
    (ours or SGLang's, the faster; the product's rows gated against the model in that format),
    and the bf16 checkpoint's fastest row inside the gate against the bf16 experts (a format
    change gated like any selection) over SGLang's fastest format inside that gate."""
    if not bench.formats:
        return {"budgets": {}, "note": "no --formats"}
    if bench.measured:
        return {"budgets": {}, "note": "projected only: a GPU run has no quantised kernels here"}
    ok = [r for r in bench.format_rows if r["status"] == "ok"]
    ok_sent = lambda r: r["sent_from_bf16"]["quality_verdict"] in ("exact", "met")  # noqa: E731
    out = {}
    for label, m, shape in bench.memories:
        at_m = [r for r in bench.format_rows if r["memory"] == label]
        entry = {"memory_fraction": round(m, 4), "shape": shape.name,
                 "K": {f: next((r["slots"] for r in at_m if r["format"] == f), 0) for f in bench.formats},
                 "by_batch": {}}  # fmt: skip
        for B in dict.fromkeys(r["batch"] for r in ok if r["memory"] == label):
            rows = [r for r in ok if r["memory"] == label and r["batch"] == B]
            per = {}
            for f in bench.formats:
                fr = [r for r in rows if r["format"] == f]
                offl = [r for r in fr if r["system"].startswith("offload")]
                if not offl:
                    continue
                ref = max(offl, key=lambda r: r["tokens_per_s"])
                good = [r for r in fr if r["system"].startswith(PRODUCT) and meets_goal(r)]
                p = max(good, key=lambda r: r["tokens_per_s"]) if good else ref
                sg = next((r["tokens_per_s"] for r in offl if r["system"] == SGLANG_PEER), None)
                per[f] = {"K": ref["slots"], "offload_ours": next(r["tokens_per_s"] for r in offl if r["system"] == OURS),
                          "sglang": sg, "product": p["tokens_per_s"], "product_system": p["system"],
                          "speedup_same_format": round(p["tokens_per_s"] / ref["tokens_per_s"], 3),
                          "meets_quality_goal": bool(good)}  # fmt: skip
            ours = [r for r in rows if r["system"] != SGLANG_PEER and ok_sent(r) and
                    (meets_goal(r) or not r["selection"])]  # fmt: skip
            peer = [r for r in rows if r["system"] == SGLANG_PEER and ok_sent(r)]
            view = {}
            if ours:
                b = max(ours, key=lambda r: r["tokens_per_s"])
                view = {"system": b["system"], "format": b["format"], "tokens_per_s": b["tokens_per_s"],
                        "sent_from_bf16": b["sent_from_bf16"]}  # fmt: skip
                base16 = per.get("bf16", {}).get("offload_ours")
                if base16:
                    view["speedup_vs_offload_bf16"] = round(b["tokens_per_s"] / base16, 3)
                if peer:
                    pb = max(peer, key=lambda r: r["tokens_per_s"])
                    view.update(sglang_best_format=pb["format"], sglang_tokens_per_s=pb["tokens_per_s"],
                                speedup_vs_sglang_best=round(b["tokens_per_s"] / pb["tokens_per_s"], 3))  # fmt: skip
            entry["by_batch"][str(B)] = {"formats": per, "bf16_checkpoint": view}
        out[label] = entry
    return {"budgets": out, "rows": bench.format_rows,
            "rule": "K = floor(budget / bytes_per_expert(format)), budget = fraction x E x bf16 bytes; "
                    "same-format speedups gate selection against the model in that format; the bf16 "
                    "checkpoint's rows gate the format change and the selection against bf16 experts"}  # fmt: skip


def _gpu_weights(model: MoEModel, shape: Shape, shipped: Shape, repeats: int) -> Gpu:
    """The shipped weights at the shipped size, else random bf16 weights of the real expert size
    (E and L of the trace: the routing decides which experts a step touches)."""
    L, E = shipped.layers, shipped.experts
    if shape is shipped:
        w = [model.expert_weights(i) for i in range(L)]
        w13, w2 = (torch.stack([t[j] for t in w]).to(torch.bfloat16) for j in (1, 2))
        return Gpu(w13, w2, repeats)
    from lynx_sglang.offload.store import check_host_memory

    check_host_memory(2 * L * E * shape.expert_bytes, 4.0)  # these tensors + the pinned store
    g = torch.Generator().manual_seed(0)
    H, inter = shape.hidden, shape.inter
    w13 = torch.empty(L, E, 2 * inter, H, dtype=torch.bfloat16)
    w2 = torch.empty(L, E, H, inter, dtype=torch.bfloat16)
    for i in range(L):  # a layer at a time: the float32 temporaries stay small
        w13[i] = torch.randn(E, 2 * inter, H, generator=g) * 0.02
        w2[i] = torch.randn(E, H, inter, generator=g) * 0.02
    return Gpu(w13, w2, repeats)


def _gpu_x(R: Routing, gpu: Gpu, shipped: bool) -> torch.Tensor:
    """Each step's MoE input: recorded (shipped weights) or random of the experts' width H."""
    if shipped:
        return R.hidden.to(torch.bfloat16)
    W, D, L, B, _ = R.logits.shape
    H = gpu.w13.shape[-1]
    return torch.randn(W, D, L, B, H, device=R.logits.device, dtype=torch.bfloat16)


def summarise(bench: Bench) -> dict:
    """Product choice (fastest lynx+offload row within the quality goal), speedups, goal check."""
    args, k, E, hw = bench.args, bench.k, bench.E, bench.hw
    ok = [r for r in bench.rows if r["status"] == "ok"]
    product, speed, speed_any, speed_each, speed_k = {}, {}, {}, {}, {}
    for f in bench.fractions:
        speed_k[str(f)] = {}
        for B in dict.fromkeys(r["batch"] for r in ok):
            at = [r for r in ok if r["batch"] == B and r["slots"] == bench.slots_of[f]]
            cands = [r for r in at if r["system"].startswith(PRODUCT)]
            offl = [r for r in at if r["system"].startswith("offload")]
            if not cands or not offl:
                continue
            ref = max(offl, key=lambda r: r["tokens_per_s"])
            good = [r for r in cands if meets_goal(r)]
            # no selection row inside the gate on its bound: the product is offloading alone
            p = max(good, key=lambda r: r["tokens_per_s"]) if good else ref
            x = round(p["tokens_per_s"] / ref["tokens_per_s"], 3)
            speed_k[str(f)][str(B)] = {"speedup": x, "system": p["system"], "meets_quality_goal": bool(good)}  # fmt: skip
            if f != args.primary_k:
                continue
            keys = ("system", "budget", "eviction", "prefetch", "tokens_per_s",
                    "distinct_per_layer_step", "ppl_rel_increase", "accuracy_delta_points",
                    "agreement", "ci95", "quality_verdict")  # fmt: skip
            product[str(B)] = {**{k_: p[k_] for k_ in keys}, "meets_quality_goal": bool(good)}
            speed[str(B)] = x
            fastest = max(cands, key=lambda r: r["tokens_per_s"])
            speed_any[str(B)] = {"system": fastest["system"], "agreement": fastest["agreement"],
                                 "speedup": round(fastest["tokens_per_s"] / ref["tokens_per_s"], 3)}  # fmt: skip
            speed_each[str(B)] = dict.fromkeys((OURS, SGLANG_PEER, ACCEL_PEER))
            for r in offl:
                speed_each[str(B)][r["system"]] = round(p["tokens_per_s"] / r["tokens_per_s"], 3)
    by_shape = {}
    if not bench.measured:  # the same counters, projected at every expert size
        for sh in [bench.shipped, *SHAPES.values()]:
            entry = {"expert_bytes": sh.expert_bytes, "shared_bytes": sh.shared_bytes,
                     "layers": sh.layers, "speedup": {}, "tokens_per_s": {}}  # fmt: skip
            if sh is not bench.shipped:  # its expert size and depth, not its routing
                entry["routing"] = (f"the shipped model's (E={E}, top-{k}), "
                                    f"not {sh.name}'s (E={sh.experts}, top-{sh.top_k})")  # fmt: skip
            for B in map(int, product):
                at = [r for r in ok if r["batch"] == B and r["slots"] == bench.slots_of[args.primary_k]]  # fmt: skip
                good = [
                    r["system"] for r in at if r["system"].startswith(PRODUCT) and meets_goal(r)
                ]
                systems = good or [OURS]  # none inside the gate: offloading alone, 1.0x
                tps = {}
                for system in [OURS, *systems]:
                    run = best_run(bench.runs[(B, args.primary_k, system)], B, k, sh, hw)
                    tps[system] = round(B / step_ms(run, B, k, sh, hw) * 1e3, 1)
                best = max(systems, key=tps.get)
                entry["tokens_per_s"][str(B)] = {OURS: tps[OURS], "product": tps[best], "product_system": best}  # fmt: skip
                entry["speedup"][str(B)] = round(tps[best] / tps[OURS], 3)
            by_shape[sh.name] = entry
    goal_b = [str(b) for b in SPEEDUP_GOAL["batches"] if str(b) in speed]
    met = bool(goal_b) and all(
        speed[b] >= SPEEDUP_GOAL["speedup"] and product[b]["meets_quality_goal"] for b in goal_b
    )
    return {
        "bench": "compare_offload",
        "measured": bench.measured,
        "time_source": "measured" if bench.measured else "projected",
        "time_fields": ["decode_ms_per_step", "ms_per_token", "tokens_per_s"],
        "shape": bench.shape.name,
        "expert_bytes": bench.shape.expert_bytes,
        "hardware": None if bench.measured else {**hw.as_dict(), "model": "bench/projection.py"},
        "batches": bench.batches,
        "k_fractions": bench.fractions,
        "primary_k_fraction": args.primary_k,
        "slots": {str(f): K for f, K in bench.slots_of.items()},
        "num_experts": E,
        "top_k": k,
        "decode_steps": args.decode,
        "warmup_steps": args.warmup,
        "rows": bench.rows,
        "product": product,
        "speedup_lynx_offload_vs_offload": speed,
        "speedup_vs_each": speed_each,
        "speedup_by_k": speed_k,
        "speedup_ignoring_quality": speed_any,
        "by_shape": by_shape,
        "goal": {**SPEEDUP_GOAL, "quality": QUALITY_GOAL, "met": met,
                 "on": "measured" if bench.measured else f"projected at {bench.shape.name}"},
    }  # fmt: skip


if __name__ == "__main__":
    main()
