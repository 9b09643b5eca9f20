"""The quality frontier of batch-aware expert selection: fewer experts (resident) and fewer
host->GPU bytes (offloaded) against Δ perplexity and Δ top-1 accuracy, one line per policy.

    python -m bench.quality [--quick] [--models lynx-moe-tiny lynx-moe-e128] [--batch 16 32]
                            [--lines lynx drop similar lynx+l0 lynx+miss@2 ...] [--budgets ...]

B held-out sequences advance together: the first `--prefill` positions are prefill (untouched),
every later position is one decode step whose B tokens form the batch the policy sees
(teacher-forced). Because attention is causal, running the whole sequence at once with the
policy applied per position group equals stepping the decode one token at a time, so this is
exactly what a server computing this batch would produce, and fast.

A frontier line is a policy (``lynx``, ``drop``, ``similar``, ``oea``) with options joined by
"+": ``l0`` (MoE layer 0 keeps every expert: a per-layer budget), ``miss@N`` (miss-aware
selection in front of an expert cache of K = E/N slots per layer, the selection reading the
cache's resident mask step by step, as the server's step does), ``t=X`` (the "similar"
policy's threshold). Each line runs at every budget.

Expert formats (``--formats bf16,fp8,int4,int3``): a row per format, the model with every expert
weight (w13, w2 of every MoE layer) quantised round-to-nearest with no calibration data and
dequantised (``lynx_sglang.offload.quantize.fake_quantize``: block FP8 e4m3 128x128, int-b
symmetric with an fp16 scale per 64 weights along the input dim), everything else as it is,
against the same unmodified model as every line, so precision sits beside selection;
``FMT+LINE`` is the format under a selection line at every budget (``int4+default``: under the
recommended setting). With ``bf16`` among them, each format row also carries its interval against
the bf16-expert row (``vs_bf16``: what the format costs over the checkpoint it is made from).

Per setting: distinct experts per layer per decode step (mean; reduction against the base),
host->GPU bytes per decode token at K = E/4 and E/2 (the project's ExpertCache, LRU, per-layer
slots, replaying the run's own decode routing; misses counted after `--warmup` steps; the
reduction is against the same cache with selection off), held-out perplexity (Δppl), top-1
accuracy against the true next token (Δ in points: the task-accuracy analogue for a language
model), mean KL from the unmodified model, greedy agreement (reported, not gated). Each beside
its bf16 numerics floor (the unmodified model in bf16 against fp32). The goal (issue 12): at
Δppl <= +0.5 % and Δacc >= -0.5 pt, >= 40 % fewer distinct experts (resident) and >= 50 % fewer
bytes at K = E/2 (offloaded). Writes ``<out-dir>/<name>.json`` and ``.png``; last line: JSON.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from bench.figures import save_png
from lynx_sglang import SHIPPED_MODEL, SHIPPED_MODELS
from lynx_sglang.model.qwen3_moe import MoEModel
from lynx_sglang.offload import ExpertCache, HostExpertStore
from lynx_sglang.offload.quantize import FORMATS, fake_quantize
from lynx_sglang.selection.policy import SelectionParams, distinct_experts, select_experts_ref
from lynx_sglang.selection.similarity import expert_similarity

DEFAULT = SelectionParams()  # the recommended setting (LynxConfig defaults)
GOAL = {"ppl_rel_increase": 0.005, "accuracy_delta_points": -0.5, "expert_reduction": 0.40,
        "bytes_reduction_e2": 0.50}  # fmt: skip
FRACTIONS = (4, 2)  # cache sizes of the bytes frontier: K = E/4 and E/2
RESULTS = Path(__file__).parent / "results"
BOOTSTRAP = 2000  # paired bootstrap resamples of every interval
SEQ_COLUMNS = ("nll", "correct", "kl", "tokens")  # Result.per_seq

PROSE = SHIPPED_MODEL.parent / "prose_ood.txt"  # English prose no model trained on
TEXTS = ("code", "prose")


def model_digest(model_dir: Path) -> str:
    """The first 16 hex digits of the sha256 of a model's weights: which weights a run measured."""
    h = hashlib.sha256()
    with open(Path(model_dir) / "model.safetensors", "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def frontier_point(path: Path, model_dir: Path, text: str, batch: int, params: SelectionParams,
                   max_half_width: float) -> Optional[tuple[dict, dict]]:  # fmt: skip
    """(run, point) of a frontier JSON that measured this selection on the same weights, text and
    batch with a Δppl interval within ±``max_half_width``; None where there is none."""
    if not Path(path).is_file():
        return None
    digest = model_digest(model_dir)
    for run in json.loads(Path(path).read_text())["runs"]:
        if (run.get("model_digest"), run["text"], run["batch"]) != (digest, text, batch):
            continue
        for pt in run["points"]:
            if pt.get("format") or pt["line"] == "default":
                continue
            lo, hi = pt["ci95"]["ppl_rel_increase"]
            same = parse_line(pt["line"], pt["budget"]).params == params
            if same and (hi - lo) / 2 <= max_half_width:
                return run, pt
    return None


def load_heldout_ids(model_dir: Path, text: str = "code") -> torch.Tensor:
    """Token ids of the evaluation text: the model's held-out code (in-domain, its
    ``heldout.txt``) or the shipped out-of-domain English prose (``data/prose_ood.txt``)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    path = model_dir / "heldout.txt" if text == "code" else PROSE
    return torch.tensor(tok.encode(path.read_text()).ids, dtype=torch.long)


def make_batches(ids: torch.Tensor, batch: int, seq: int, max_batches: int) -> list[torch.Tensor]:
    """Consecutive, non-overlapping [batch, seq] windows of the held-out token stream."""
    n = ids.numel() // seq
    rows = ids[: n * seq].view(n, seq)
    out = [rows[i : i + batch] for i in range(0, n - batch + 1, batch)]
    return out[:max_batches]


@dataclass(frozen=True)
class Setting:
    """One point of the frontier: a line (policy and options) at one budget."""

    line: str
    params: Optional[SelectionParams]  # None: selection off (a format row)
    fraction: Optional[int] = None  # miss-aware: the cache it reads has K = E / fraction slots
    fmt: str = ""  # expert format the model's experts are sent as ("": as they are)

    @property
    def name(self) -> str:
        if self.params is None:
            return f"{self.fmt} experts"
        return f"{self.line} b={self.params.budget:g}"


def parse_format(item: str, budgets: list[float]) -> list[Setting]:
    """``FMT`` (the format alone) or ``FMT+LINE`` (under a frontier line at every budget;
    ``FMT+default``: under the recommended setting) -> Settings (one-line ValueError otherwise)."""
    fmt, _, line = item.partition("+")
    if fmt not in FORMATS:
        raise ValueError(f"--formats {item!r}: the format is one of {', '.join(FORMATS)}")
    if not line:
        return [Setting(f"format {fmt}", None, fmt=fmt)]
    if line == "default":
        return [Setting(item, DEFAULT, fmt=fmt)]
    return [replace(parse_line(line, b), line=item, fmt=fmt) for b in budgets]


def quantized_model(model: MoEModel, fmt: str) -> MoEModel:
    """A copy of ``model`` with every MoE layer's expert weights (w13 [E, 2I, H], w2 [E, H, I],
    the input dim last) quantised to ``fmt`` and dequantised; router and the rest unchanged."""
    q = copy.deepcopy(model)
    with torch.no_grad():
        for layer in q.layers:
            for w in (layer.mlp.w13, layer.mlp.w2):
                w.copy_(fake_quantize(w, fmt))
    return q


def parse_line(line: str, budget: float, base: SelectionParams = DEFAULT) -> Setting:
    """``policy[+l0][+miss@N]`` at ``budget`` -> Setting (one-line ValueError otherwise)."""
    policy, *opts = line.split("+")
    changes: dict = {"policy": policy, "budget": budget, "miss_budget": 0.0, "layer_budgets": ""}
    fraction = None
    for opt in opts:
        if opt == "l0":
            changes["layer_budgets"] = "0:1.0"
        elif opt.startswith("miss@") and opt[5:].isdigit() and int(opt[5:]) >= 1:
            changes["miss_budget"], fraction = budget, int(opt[5:])
        elif opt.startswith("t=") and _is_float(opt[2:]):
            changes["similar_threshold"] = float(opt[2:])
        else:
            raise ValueError(f"frontier line {line!r}: options are l0, miss@N, t=X; got {opt!r}")
    return Setting(line, replace(base, **changes), fraction)


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def tiny_cache(num_layers: int, num_experts: int, slots: int, top_k: int) -> ExpertCache:
    """The project's expert cache over tiny experts (hits, misses and copies are exact counts;
    bytes are misses x one expert's size): eager executor, LRU, per-layer slots."""
    store = HostExpertStore(num_layers, num_experts, {"w": (4,)}, torch.float32, None, 0)
    return ExpertCache(store, slots, "cpu", top_k, "lru", executor="eager")


class DecodePolicyHook:
    """Applies the policy to each decode position's B tokens, layer by layer; records distinct
    experts and, through expert caches, the misses the decode routing causes.

    resident: [D, L, E] bool masks a cache replay recorded (cache-aware selection, as
    ``bench/compare_offload.py`` passes them), or None. similarity: per layer, for "similar".
    caches: {K: ExpertCache} replaying this run's selected decode routing (bytes); live: the
    cache miss-aware selection reads, step by step (counted under its own K)."""

    def __init__(self, params: Optional[SelectionParams], prefill: int, num_experts: int,
                 resident: Optional[torch.Tensor] = None, similarity=None,
                 caches: Optional[dict] = None, live: Optional[ExpertCache] = None,
                 warmup: int = 0):  # fmt: skip
        self.params, self.prefill, self.E, self.resident = params, prefill, num_experts, resident
        self.similarity, self.live, self.warmup = similarity, live, warmup
        self.caches = dict(caches or {})
        self.distinct: list[torch.Tensor] = []  # per layer: [D] distinct experts per decode step
        self.trace: list[torch.Tensor] = []  # per layer: [D, B, k] decode routing after the policy
        self.misses = {K: 0 for K in self.caches}
        if live is not None:
            self.misses[live.num_slots] = 0

    def __call__(self, layer, logits, ids, weights):
        P = self.prefill
        # [B, S, .] -> decode part grouped by step: [D, B, .]
        dl, di, dw = (t[:, P:].transpose(0, 1) for t in (logits, ids, weights))
        if self.params is not None:
            p = self.params.at_layer(layer)
            sim = self.similarity[layer] if self.similarity is not None else None
            if self.live is not None:  # each step sees the cache as the previous step left it
                steps = []
                for d in range(dl.shape[0]):
                    res = self.live.resident_mask(layer)
                    r = select_experts_ref(dl[d], di[d], dw[d], p, resident=res, similarity=sim)
                    self._serve(self.live, layer, d, r.topk_ids)
                    steps.append((r.topk_ids, r.topk_weights))
                di, dw = torch.stack([s[0] for s in steps]), torch.stack([s[1] for s in steps])
            else:
                res_mask = None if self.resident is None else self.resident[:, layer]  # [D, E]
                r = select_experts_ref(dl, di, dw, p, resident=res_mask, similarity=sim)
                di, dw = r.topk_ids, r.topk_weights
            ids = torch.cat([ids[:, :P], di.transpose(0, 1)], dim=1)
            weights = torch.cat([weights[:, :P], dw.transpose(0, 1)], dim=1)
        for cache in self.caches.values():
            for d in range(di.shape[0]):
                self._serve(cache, layer, d, di[d])
        self.distinct.append(distinct_experts(di, self.E).float())
        self.trace.append(di)
        return ids, weights

    def _serve(self, cache: ExpertCache, layer: int, d: int, ids: torch.Tensor) -> None:
        """One decode step of ``layer`` through the cache (every wave), counting its misses."""
        for _ in cache.prepare(layer, ids):
            pass
        cache.end_step(layer)
        misses = cache.counters(reset=True)["total"]["misses"]
        if d >= self.warmup:
            self.misses[cache.num_slots] += misses


@dataclass
class Result:
    name: str
    distinct: float
    agree: int
    # per evaluated sequence, in batch order: [n, 4] float64 columns SEQ_COLUMNS (summed NLL,
    # top-1 predictions equal to the true next token, summed KL(base || this setting) in nats,
    # tokens); every total derives from it, and a setting pairs with the base sequence by
    # sequence (the paired bootstrap's unit)
    per_seq: np.ndarray = field(default_factory=lambda: np.zeros((0, 4)))
    misses: dict = field(default_factory=dict)  # {K: expert copies after warmup, all layers}
    line: str = ""
    budget: float = 1.0
    fmt: str = ""  # the expert format of the model it ran ("": as shipped)

    @property
    def nll_sum(self) -> float:
        return float(self.per_seq[:, 0].sum())

    @property
    def correct(self) -> int:
        return int(self.per_seq[:, 1].sum())

    @property
    def kl_sum(self) -> float:
        return float(self.per_seq[:, 2].sum())

    @property
    def count(self) -> int:
        return int(self.per_seq[:, 3].sum())

    @property
    def ppl(self) -> float:
        return math.exp(self.nll_sum / max(self.count, 1))

    @property
    def accuracy(self) -> float:
        return self.correct / max(self.count, 1)

    @property
    def kl(self) -> float:
        return self.kl_sum / max(self.count, 1)


def run_setting(model, batches, prefill, params, base_argmax=None, keep_trace=False,
                residents=None, base_logp=None, keep_logp=False, similarity=None,
                bytes_slots=(), live_slots=None, warmup=0):  # fmt: skip
    """Forward every batch with the policy; returns (Result, argmax per batch, traces).

    residents: per batch, [D, L, E] resident masks for cache-aware selection (or None).
    base_logp: per batch, the unmodified model's next-token log-probabilities (for the KL);
    keep_logp: return this run's instead of its argmaxes (the base run, for the others).
    bytes_slots: cache sizes K whose misses this run's decode routing is replayed through;
    live_slots: the K of the cache miss-aware selection reads (a fresh cache per batch)."""
    c = model.config
    E, L, k = c.num_experts, c.num_hidden_layers, c.num_experts_per_tok
    agree, dsum, dn = 0, 0.0, 0
    misses = {K: 0 for K in (*bytes_slots, *([live_slots] if live_slots else []))}
    argmaxes, traces, per_seq = [], [], []
    for b, x in enumerate(batches):
        caches = {K: tiny_cache(L, E, K, k) for K in bytes_slots}
        live = tiny_cache(L, E, live_slots, k) if live_slots else None
        hook = DecodePolicyHook(params, prefill, E, None if residents is None else residents[b],
                                similarity, caches, live, warmup)  # fmt: skip
        with torch.no_grad():
            logits = model(x, hook=hook).logits[:, prefill:-1]  # predicts x[:, prefill+1:]
        for K, m in hook.misses.items():
            misses[K] += m
        tgt = x[:, prefill + 1 :]  # [B, D]
        tok_nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(), tgt.reshape(-1), reduction="none")
        seq_nll = tok_nll.view(tgt.shape).double().sum(1)  # [B]
        am = logits.argmax(-1)
        seq_correct = (am == tgt).sum(1).double()  # [B]
        logp = torch.log_softmax(logits.float(), -1)  # [B, D, V]
        seq_kl = torch.zeros(tgt.shape[0], dtype=torch.float64)
        if base_logp is not None:
            ref = base_logp[b].float()
            seq_kl = (ref.exp() * (ref - logp)).sum((1, 2)).double()  # [B]
        per_seq.append(torch.stack([seq_nll, seq_correct, seq_kl,
                                    torch.full_like(seq_nll, tgt.shape[1])], 1).numpy())  # fmt: skip
        argmaxes.append((am, logp.to(torch.bfloat16)) if keep_logp else am)
        if base_argmax is not None:
            agree += int((am == base_argmax[b]).sum())
        d = torch.stack(hook.distinct)  # [L, D]
        dsum += float(d[:, :-1].sum())
        dn += d[:, :-1].numel()
        if keep_trace:
            traces.append(torch.stack(hook.trace, dim=1))  # [D, L, B, k]
    name = "base" if params is None else describe(params)
    r = Result(name, dsum / max(dn, 1), agree,
               np.concatenate(per_seq) if per_seq else np.zeros((0, 4)), misses)
    return r, argmaxes, traces


def describe(p: SelectionParams) -> str:
    if p.policy == "oea":
        return f"oea k0={p.protect_top}"
    s = f"{p.policy} b={p.budget:g}"
    if p.layer_budgets:
        s += f" layers={p.layer_budgets}"
    if p.miss_aware:
        s += " miss-aware"
    if p.max_experts:
        s += f" cap={p.max_experts}"
    if p.protect_top != 1:
        s += f" top={p.protect_top}"
    if p.protect_p:
        s += f" p={p.protect_p:g}"
    return s


def numerics_floor(model, batches, prefill, base_argmax, base_logp=None) -> Result:
    """The unmodified model in bf16 against fp32: what numerics alone move each metric.

    Servers run bf16, so this is the noise floor every column should be read against.
    """
    half = copy.deepcopy(model).to(torch.bfloat16)
    r, _, _ = run_setting(half, batches, prefill, None, base_argmax, base_logp=base_logp)
    r.name = "base in bf16 (floor)"
    return r


def model_similarity(model: MoEModel, threshold: float) -> list:
    """Every MoE layer's expert similarity, from its weights (as the server computes it at load)."""
    return [expert_similarity(*model.expert_weights(layer)[1:], threshold)
            for layer in range(model.config.num_hidden_layers)]  # fmt: skip


def evaluate(model, batches, prefill, settings: list, keep_trace=False, floor: bool = False,
             fractions: tuple[int, ...] = (), warmup: int = 0, progress: bool = False):  # fmt: skip
    """Base plus each setting; returns (base Result, [Result], base traces, traces per setting).

    settings: ``Setting``s or bare ``SelectionParams``. With ``floor``, the first row is the
    bf16 numerics floor (see ``numerics_floor``). fractions: the bytes frontier's caches
    (K = E / f), replayed for the base and every setting; a miss-aware setting reads its own.
    """
    E = model.config.num_experts
    slots = tuple(E // f for f in fractions)
    base, kept, base_tr = run_setting(model, batches, prefill, None, keep_trace=keep_trace,
                                      keep_logp=True, bytes_slots=slots, warmup=warmup)  # fmt: skip
    base_am, base_logp = [am for am, _ in kept], [lp for _, lp in kept]
    base.agree = base.count
    rows, trs, sims, models = [], [], {}, {"": model}
    if floor:
        rows.append(numerics_floor(model, batches, prefill, base_am, base_logp))
        trs.append([])
    for st in settings:
        st = st if isinstance(st, Setting) else Setting(describe(st), st)
        p = st.params
        if st.fmt not in models:
            models[st.fmt] = quantized_model(model, st.fmt)
        m = models[st.fmt]
        sim = None
        if p is not None and p.policy == "similar":
            if p.similar_threshold not in sims:
                sims[p.similar_threshold] = model_similarity(m, p.similar_threshold)
            sim = sims[p.similar_threshold]
        live = E // st.fraction if st.fraction else None
        t0 = time.time()
        r, _, tr = run_setting(m, batches, prefill, p, base_am, keep_trace=keep_trace,
                               base_logp=base_logp, similarity=sim,
                               bytes_slots=() if live else slots, live_slots=live, warmup=warmup)  # fmt: skip
        r.name = st.name if p is None or st.line != describe(p) else st.line
        r.line, r.budget, r.fmt = st.line, 1.0 if p is None else p.budget, st.fmt
        if progress:
            print(f"    {r.name}: {time.time() - t0:.1f} s", flush=True)
        rows.append(r)
        trs.append(tr)
    return base, rows, base_tr, trs


def bytes_reduction(r: Result, base: Result, K: int) -> Optional[float]:
    """1 - this setting's expert copies / the same cache's with selection off (None: not run)."""
    if K not in r.misses or not base.misses.get(K):
        return None
    return 1 - r.misses[K] / base.misses[K]


def paired_intervals(r: Result, base: Result, resamples: int = BOOTSTRAP,
                     level: float = 0.95, seed: int = 0) -> dict:
    """95 % intervals of Δppl (relative), Δ top-1 accuracy (points) and the KL, by a paired
    bootstrap over sequences: the same sequences are drawn for the setting and the base, so
    the spread is that of the per-sequence differences, not of the text.

    The unit is the sequence (B per window): the policy sees the whole batch, so sequences of
    one window are not fully independent, but a window-level bootstrap over 4 windows resolves
    nothing. Returns {"ppl_rel_increase": [lo, hi], "accuracy_delta_points": [lo, hi], "kl":
    [lo, hi]}.
    """
    a, b = r.per_seq, base.per_seq
    if a.shape != b.shape or not np.array_equal(a[:, 3], b[:, 3]) or not len(a):
        raise ValueError(f"{r.name}: not paired with the base (different sequences)")
    n = len(a)
    pick = np.random.default_rng(seed).integers(0, n, size=(resamples, n))  # [R, n]
    count = a[:, 3][pick].sum(1)  # [R]
    d_nll = (a[:, 0] - b[:, 0])[pick].sum(1) / count
    d_acc = 100 * (a[:, 1] - b[:, 1])[pick].sum(1) / count
    kl = a[:, 2][pick].sum(1) / count
    q = [(1 - level) / 2, (1 + level) / 2]
    return {"ppl_rel_increase": np.expm1(np.quantile(d_nll, q)).round(5).tolist(),
            "accuracy_delta_points": np.quantile(d_acc, q).round(3).tolist(),
            "kl": np.quantile(kl, q).round(6).tolist()}  # fmt: skip


def gate_verdict(ci: dict) -> str:
    """The quality gate (Δppl <= +0.5 %, Δacc >= -0.5 pt) read on the interval's bounds: "met"
    when both intervals lie inside it, "failed" when either lies wholly outside, else
    "unresolved" (the sample cannot tell; never reported as met)."""
    (p_lo, p_hi), (a_lo, a_hi) = ci["ppl_rel_increase"], ci["accuracy_delta_points"]
    gp, ga = GOAL["ppl_rel_increase"], GOAL["accuracy_delta_points"]
    if p_lo > gp or a_hi < ga:
        return "failed"
    if p_hi <= gp and a_lo >= ga:
        return "met"
    return "unresolved"


def point(r: Result, base: Result, E: int) -> dict:
    """One frontier point's JSON."""
    ci = paired_intervals(r, base)
    out = {"setting": r.name, "line": r.line, "budget": r.budget,
           "distinct": round(r.distinct, 3), "expert_reduction": round(1 - r.distinct / base.distinct, 4),
           "ppl": round(r.ppl, 4), "ppl_rel_increase": round(r.ppl / base.ppl - 1, 5),
           "accuracy_delta_points": round(100 * (r.accuracy - base.accuracy), 3),
           "kl": round(r.kl, 6), "agreement": round(r.agree / max(r.count, 1), 5),
           "ci95": ci, "sequences": len(r.per_seq)}  # fmt: skip
    for f in FRACTIONS:
        red = bytes_reduction(r, base, E // f)
        out[f"bytes_reduction_e{f}"] = None if red is None else round(red, 4)
    out["verdict"] = gate_verdict(ci)
    out["meets_quality"] = meets_quality(out)
    out["format"] = r.fmt
    return out


def meets_quality(pt: dict) -> bool:
    """The quality gate met on the bound: Δppl <= +0.5 % and Δ top-1 accuracy >= -0.5 points
    for the whole 95 % interval (a point estimate inside the gate is not enough)."""
    return gate_verdict(pt["ci95"]) == "met"


def print_table(batch: int, base: Result, rows: list[Result], E: Optional[int] = None) -> None:
    hdr = (f"{'setting':<24}{'distinct':>9}{'reduct':>7}{'Δppl % [95 % CI]':>23}"
           f"{'Δacc pt [95 % CI]':>22}{'KL':>8}{'agree':>7}{'bytes-E/4':>10}{'bytes-E/2':>10}"
           f"  gate")  # fmt: skip
    print(f"batch {batch}: {base.count} decode tokens in {len(base.per_seq)} sequences (the bf16 "
          f"row is the numerics floor; bytes: reduction vs selection off; the gate Δppl <= "
          f"+0.5 %, Δacc >= -0.5 pt is read on the interval's bounds)")  # fmt: skip
    print(hdr)
    print("-" * len(hdr))
    for r in [base] + rows:
        red = 1 - r.distinct / base.distinct
        dp = 100 * (r.ppl / base.ppl - 1)
        da = 100 * (r.accuracy - base.accuracy)
        if r is base:
            q, verdict = f"{dp:>+8.2f}{'':15}{da:>+8.2f}{'':14}", ""
        else:
            ci = paired_intervals(r, base)
            (pl, ph), (al, ah) = ci["ppl_rel_increase"], ci["accuracy_delta_points"]
            q = f"{dp:>+8.2f}{f'[{100 * pl:+.2f},{100 * ph:+.2f}]':>15}{da:>+8.2f}{f'[{al:+.2f},{ah:+.2f}]':>14}"
            verdict = gate_verdict(ci)
        cells = ""
        for f in FRACTIONS:
            b = bytes_reduction(r, base, E // f) if E else None
            cells += f"{'' if b is None else f'{b:.3f}':>10}"
        print(f"{r.name[:24]:<24}{r.distinct:>9.2f}{red:>7.3f}{q}{r.kl:>8.4f}"
              f"{r.agree / r.count:>7.3f}{cells}  {verdict}")


DEFAULT_BUDGETS = "0.9,0.8,0.7,0.6,0.5,0.4"
LINES = ("lynx", "drop", "similar", "lynx+l0", "lynx+miss@2", "lynx+l0+miss@2", "lynx+miss@4")


def goal_status(points: list[dict]) -> dict:
    """The issue's two goals on one run: the best reduction inside the quality gate, and the
    policy reaching it (or, if none meets the gate, the point closest to it)."""
    out = {}
    points = [p for p in points if not p.get("format")]  # the goals are selection's
    for key, target in (("expert_reduction", GOAL["expert_reduction"]),
                        ("bytes_reduction_e2", GOAL["bytes_reduction_e2"])):  # fmt: skip
        pts = [p for p in points if p.get(key) is not None]
        ok = [p for p in pts if p["meets_quality"]]
        best = max(ok, key=lambda p: p[key], default=None)
        out[key] = {"target": target, "met": bool(best and best[key] >= target),
                    "best_within_quality": None if best is None else
                    {k: best[k] for k in ("setting", key, "ppl_rel_increase", "accuracy_delta_points")}}  # fmt: skip
    return out


def plot(runs: list[dict], path: Path) -> Optional[str]:
    """Per model (rows: Δppl, Δacc) against the three reductions (distinct experts, bytes at
    E/4, bytes at E/2), one line per policy, the quality goal dotted. Returns the file."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    xs = (("expert_reduction", "fewer distinct experts (resident)"),
          ("bytes_reduction_e4", "fewer host->GPU bytes, K=E/4"),
          ("bytes_reduction_e2", "fewer host->GPU bytes, K=E/2"))  # fmt: skip
    ys = (("ppl_rel_increase", "Δppl (relative)", GOAL["ppl_rel_increase"]),
          ("accuracy_delta_points", "Δ top-1 accuracy (points)", GOAL["accuracy_delta_points"]))
    fig, axes = plt.subplots(2 * len(runs), 3, figsize=(13, 3.3 * 2 * len(runs)), squeeze=False)
    for i, run in enumerate(runs):
        lines = list(dict.fromkeys(p["line"] for p in run["points"]))
        for j, (ykey, ylabel, goal) in enumerate(ys):
            for c, (xkey, xlabel) in enumerate(xs):
                ax = axes[2 * i + j][c]
                for n, line in enumerate(lines):
                    pts = sorted((p[xkey], p[ykey], *p["ci95"][ykey]) for p in run["points"]
                                 if p["line"] == line and p.get(xkey) is not None)  # fmt: skip
                    if pts:
                        x, y, lo, hi = (np.array(v) for v in zip(*pts))
                        ax.errorbar(x, y, yerr=[y - lo, hi - y], marker="o", ms=3, lw=1,
                                    elinewidth=0.7, capsize=2, color=f"C{n}", label=line)  # fmt: skip
                ax.axhline(goal, color="r", lw=0.8, ls=":")
                floor = run["floor"]
                ax.axhline(floor[ykey], color="grey", lw=0.8, ls="--")
                if "ci95" in floor:  # the floor's own 95 % interval, shaded
                    ax.axhspan(*floor["ci95"][ykey], color="grey", alpha=0.15, lw=0)
                ax.set_xlabel(xlabel, fontsize=8)
                ax.set_ylabel(ylabel, fontsize=8)
                ax.set_title(f"{run['model']}, {run['text']}, batch {run['batch']}", fontsize=8)
                ax.grid(alpha=0.3)
        axes[2 * i][0].legend(fontsize=6)
    fig.suptitle("quality frontier: one line per policy (budgets along each line), bars: 95 % "
                 "intervals; red dotted: the quality goal, grey dashed and band: the bf16 numerics "
                 "floor and its interval", fontsize=9)  # fmt: skip
    fig.tight_layout()
    save_png(fig, path, dpi=110)
    plt.close(fig)
    return str(path)


def run_one(model, model_name: str, text: str, B: int, args, settings: list[Setting]) -> dict:
    """Base, bf16 floor and every setting at one (model, text, batch)."""
    ids = load_heldout_ids(Path(args.model_dir[model_name]), text)
    batches = make_batches(ids, B, args.prefill + args.decode, args.max_batches or 10**9)
    if not batches:
        raise SystemExit(f"{text} too short for batch {B} x seq {args.prefill + args.decode}")
    E = model.config.num_experts
    print(f"\n== {model_name}, {text}, batch {B} ({len(batches)} window(s)) ==", flush=True)
    base, rows, _, _ = evaluate(model, batches, args.prefill, settings, floor=True,
                                fractions=FRACTIONS, warmup=args.warmup, progress=args.progress)  # fmt: skip
    print_table(B, base, rows, E)
    floor, rows = rows[0], rows[1:]
    points = [point(r, base, E) for r in rows]
    bf16 = next((r for r in rows if r.fmt == "bf16" and r.line == "format bf16"), None)
    for r, pt in zip(rows, points):
        if r.fmt and bf16 is not None and r is not bf16:  # the format over its bf16 source
            ci = paired_intervals(r, bf16)
            pt["vs_bf16"] = {"ppl_rel_increase": round(r.ppl / bf16.ppl - 1, 5),
                             "accuracy_delta_points": round(100 * (r.accuracy - bf16.accuracy), 3),
                             "ci95": ci, "verdict": gate_verdict(ci)}  # fmt: skip
    fl = point(floor, base, E)
    return {"model": model_name, "model_digest": model_digest(Path(args.model_dir[model_name])),
            "text": text, "batch": B, "num_experts": E, "decode_tokens": base.count, "windows": len(batches),
            "distinct_base": round(base.distinct, 3), "ppl_base": round(base.ppl, 4),
            "accuracy_base": round(base.accuracy, 5),
            "misses_base": {str(K): m for K, m in base.misses.items()},
            "floor": {k: fl[k] for k in ("ppl_rel_increase", "accuracy_delta_points", "kl", "agreement", "ci95")},
            "sequences": len(base.per_seq),
            "points": points, "goals": goal_status(points)}  # fmt: skip


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    names = [m.name for m in SHIPPED_MODELS]
    ap.add_argument("--models", nargs="+", default=names, help=f"shipped models ({', '.join(names)}) or paths")
    ap.add_argument("--quick", action="store_true", help="a small slice: about a minute on 2 cores")
    ap.add_argument("--texts", nargs="+", choices=TEXTS, default=list(TEXTS),
                    help="held-out code (in-domain) and/or out-of-domain English prose")
    ap.add_argument("--batch", type=int, nargs="+", default=[16, 32])
    ap.add_argument("--prose-batch", type=int, nargs="+", default=[16], help="batches on prose")
    ap.add_argument("--prefill", type=int, default=64)
    ap.add_argument("--decode", type=int, default=192)
    ap.add_argument("--warmup", type=int, default=16, help="decode steps before misses count")
    ap.add_argument("--max-batches", type=int, default=4, help="windows per run (0: all held-out text)")
    ap.add_argument("--lines", nargs="*", default=list(LINES),
                    help="policy[+l0][+miss@N] (see above; none: only the formats and the default)")
    ap.add_argument("--formats", default="",
                    help=f"expert formats, comma-separated: FMT or FMT+LINE ({', '.join(FORMATS)}; "
                         "e.g. bf16,fp8,int4,int3,int4+default)")
    ap.add_argument("--budgets", default=DEFAULT_BUDGETS)
    ap.add_argument("--max-experts", type=int, default=0,
                    help="cap every setting's kept set (e.g. K: a hybrid cache's capture bound)")
    ap.add_argument("--out-dir", default=str(RESULTS))
    ap.add_argument("--name", default="frontier")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--progress", action="store_true", help="print each setting's time")
    ap.add_argument("--replot", default="", help="only redraw the PNGs of a frontier JSON")
    ap.add_argument("--add-runs", default="",
                    help="a frontier JSON of the same lines, budgets and windows (e.g. another "
                         "model, measured apart): its runs come first in this one")
    args = ap.parse_args(argv)
    if args.replot:
        return replot(Path(args.replot))
    torch.manual_seed(0)
    t0 = time.time()
    if args.quick:
        args.models, args.texts, args.batch, args.prose_batch = args.models[:1], ["code"], [16], []
        args.prefill, args.decode = 32, 96
        args.max_batches = 1
        if args.lines == list(LINES):
            args.lines = ["lynx", "drop", "lynx+miss@2"]
        if args.budgets == DEFAULT_BUDGETS:
            args.budgets = "0.8,0.6"
        args.name = "frontier_quick" if args.name == "frontier" else args.name
    budgets = [float(b) for b in args.budgets.split(",") if b]
    settings = [parse_line(line, b) for line in args.lines for b in budgets]
    if args.max_experts:
        settings = [replace(st, params=replace(st.params, max_experts=args.max_experts))
                    for st in settings]  # fmt: skip
    settings.append(Setting("default", DEFAULT))  # the recommended setting, wherever it lies
    formats = [f for f in args.formats.split(",") if f]
    try:
        settings += [st for f in formats for st in parse_format(f, budgets)]
    except ValueError as e:
        raise SystemExit(str(e)) from None
    args.model_dir = {Path(m).name: (m if "/" in m else str(SHIPPED_MODEL.parent / m)) for m in args.models}
    runs = earlier_runs(Path(args.add_runs), args, budgets) if args.add_runs else []
    for name, path in args.model_dir.items():
        model = MoEModel.from_pretrained(Path(path))
        for text in args.texts:
            for B in args.batch if text == "code" else args.prose_batch:
                runs.append(run_one(model, name, text, B, args, settings))
    first = runs[0]
    d = next(p for p in first["points"] if p["line"] == "default")
    out = {"goal": GOAL, "lines": args.lines, "budgets": budgets, "fractions": list(FRACTIONS),
           "formats": formats, "format_method": "every expert weight quantised round-to-nearest "
           "(no calibration) then dequantised; the rest of the model as it is",
           "default_setting": describe(DEFAULT), "warmup_steps": args.warmup,
           "prefill": args.prefill, "decode": args.decode,
           "bytes_source": "the project's ExpertCache (eager executor, LRU, per-layer slots) on "
                           "each run's own decode routing; misses x expert size",
           "runs": runs,
           # the recommended setting on the first run (the demo's table reads this)
           "batch": first["batch"], "model": first["model"], "text": first["text"],
           "setting": d["setting"], "expert_reduction": d["expert_reduction"],
           "ppl_rel_increase": d["ppl_rel_increase"], "accuracy_delta_points": d["accuracy_delta_points"],
           "kl": d["kl"], "agreement": d["agreement"], "ci95": d["ci95"], "verdict": d["verdict"],
           "agreement_bf16_floor": first["floor"]["agreement"]}  # fmt: skip
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not args.no_plot:
        code = [r for r in runs if r["text"] == "code"]
        for B in dict.fromkeys(r["batch"] for r in code):
            png = plot([r for r in code if r["batch"] == B], out_dir / f"{args.name}_b{B}.png")
            if png:
                out.setdefault("plots", []).append(png)
    out["seconds"] = round(time.time() - t0, 1)
    print()
    print_goals(runs)
    (out_dir / f"{args.name}.json").write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps({k: v for k, v in out.items() if k != "runs"}))
    return out


def earlier_runs(path: Path, args, budgets: list[float]) -> list[dict]:
    """The runs of an earlier frontier JSON, refused in one line unless it was measured the
    same way (lines, budgets, windows, warm-up) and holds none of this run's models."""
    old = json.loads(path.read_text())
    same = {"lines": args.lines, "budgets": budgets, "prefill": args.prefill,
            "decode": args.decode, "warmup_steps": args.warmup}  # fmt: skip
    diff = [k for k, v in same.items() if old.get(k) != v]
    if diff:
        raise SystemExit(f"--add-runs {path}: measured with other {', '.join(diff)}")
    clash = {r["model"] for r in old["runs"]} & set(args.model_dir)
    if clash:
        raise SystemExit(f"--add-runs {path}: already has {', '.join(sorted(clash))}")
    return old["runs"]


def replot(path: Path) -> dict:
    """Redraw a frontier JSON's PNGs beside it (one per batch of the code runs)."""
    out = json.loads(path.read_text())
    code = [r for r in out["runs"] if r["text"] == "code"]
    out["plots"] = [plot([r for r in code if r["batch"] == B], path.with_name(f"{path.stem}_b{B}.png"))
                    for B in dict.fromkeys(r["batch"] for r in code)]  # fmt: skip
    path.write_text(json.dumps(out, indent=1) + "\n")
    return out


def print_goals(runs: list[dict]) -> None:
    """One line per run and goal: the best reduction inside the quality gate and its policy."""
    print("goals (the gate Δppl <= +0.5 % and Δacc >= -0.5 pt met on the 95 % bound):")
    for r in runs:
        for key, g in r["goals"].items():
            b = g["best_within_quality"]
            got = "none inside the gate" if b is None else f"{b[key]:.3f} by {b['setting']}"
            print(f"  {r['model']:<14}{r['text']:<6}B={r['batch']:<3} {key:<19} >= {g['target']:.2f}: "
                  f"{'met' if g['met'] else 'not met'} ({got})")


if __name__ == "__main__":
    main()
