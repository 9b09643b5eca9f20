"""Expert-cache hit rate and host->GPU bytes per token on routing traces, through the real cache.

    python -m bench.cache_trace [--trace FILE.pt] [--quick] [--expert-bytes N | --model NAME]

A trace file is a ``torch.save``d dict: ``topk_ids`` [steps, layers, B, k] (int), ``num_experts``
(int); optional ``hidden`` [steps, layers, B, H] and ``routers`` [layers, E, H] enable the
cross-layer prefetch, and ``expert_bytes`` sets the size of one expert. Without a file the
routing is synthetic (``synthetic_trace``, labelled "synthetic").

The cache runs on CPU with tiny experts: hits, misses and expert copies are exact counts; bytes
are counts x the expert size of the chosen model; any time shown is projected from bytes at a
stated bandwidth, never measured.
"""

from __future__ import annotations

import argparse
import glob
import itertools
import json
import math
import time

import torch

from lynx_sglang.offload import ExpertCache, HostExpertStore
from lynx_sglang.step import NOT_DECODE, predict_votes

# One bf16 expert (w13 [2I, H] + w2 [H, I]) of the models we compare against, in bytes.
MODELS = {
    "mixtral-8x7b": dict(H=4096, I=14336, E=8, k=2),
    "qwen3-30b-a3b": dict(H=2048, I=768, E=128, k=8),
    "olmoe": dict(H=2048, I=1024, E=64, k=8),
    "gpt-oss-20b": dict(H=2880, I=2880, E=32, k=4),
    "deepseek-v2-lite": dict(H=2048, I=1408, E=64, k=6),
}
PROJECT_GBPS = 50.0  # PCIe Gen5 pinned copy engine, for the projected column only


def expert_bytes(model: str) -> int:
    m = MODELS[model]
    return 3 * m["H"] * m["I"] * 2


def synthetic_trace(
    steps: int = 256,
    layers: int = 8,
    batch: int = 16,
    k: int = 8,
    num_experts: int = 128,
    alpha: float = 1.3,
    sigma: float = 1.5,
    tau: float = 0.8,
    seed: int = 0,
) -> torch.Tensor:
    """Skewed, temporally correlated routing: topk_ids [steps, layers, batch, k] int32.

    Generator: per layer, expert popularity p_e ~ 1/(rank+1)^alpha over a random permutation;
    per (sequence, layer) a fixed affinity log p + sigma*N(0,1); per step each token takes the
    top-k of affinity + tau*Gumbel noise. Defaults give ~51 distinct experts of 128 per step
    at batch 16, top-8 (published Qwen3-30B-A3B: ~49) and ~53% of a token's experts repeated
    from its previous step.
    """
    g = torch.Generator().manual_seed(seed)
    log_p = -alpha * torch.log1p(torch.arange(num_experts, dtype=torch.float32))  # [E] by rank
    ranks = torch.stack([torch.randperm(num_experts, generator=g) for _ in range(layers)])
    base = log_p[ranks]  # [L, E]: expert e of layer l gets the popularity of rank ranks[l, e]
    affinity = base[:, None, :] + sigma * torch.randn(layers, batch, num_experts, generator=g)
    out = torch.empty(steps, layers, batch, k, dtype=torch.int32)
    for s in range(steps):
        u = torch.rand(layers, batch, num_experts, generator=g).clamp_(1e-9, 1 - 1e-9)
        out[s] = (affinity - tau * torch.log(-torch.log(u))).topk(k, dim=-1).indices
    return out


def load_trace(path: str) -> dict:
    """Read a trace file; checks the shape contract and returns its dict."""
    data = torch.load(path, map_location="cpu", weights_only=True)
    ids = data.get("topk_ids") if isinstance(data, dict) else None
    if ids is None or ids.dim() != 4 or "num_experts" not in data:
        raise ValueError(f"{path}: need a dict with topk_ids [steps, layers, B, k] and num_experts")
    data["num_experts"] = int(data["num_experts"])
    return data


def run_trace(
    topk_ids: torch.Tensor,
    num_experts: int,
    slots: int,
    eviction: str = "lru",
    prefetch: str = "off",
    slot_pool: str = "layer",
    lfu_decay: float = 0.9,
    hidden: torch.Tensor | None = None,
    routers: torch.Tensor | None = None,
) -> dict:
    """Replay topk_ids [S, L, B, k] through an ExpertCache on CPU; returns its total counters.

    ``prefetch="oracle"`` prefetches each next layer's true set (an upper bound for predictors).
    """
    S, L, B, k = topk_ids.shape
    store = HostExpertStore(L, num_experts, {"w": (4,)}, torch.float32, headroom_gib=0)
    mode = "off" if prefetch == "oracle" else prefetch
    cache = ExpertCache(
        store,
        slots,
        "cpu",
        k,
        eviction=eviction,
        lfu_decay=lfu_decay,
        slot_pool=slot_pool,
        prefetch=mode,
    )
    if routers is not None:
        for layer in range(L):
            cache.set_router(layer, routers[layer].float())
    scores = None
    for s in range(S):
        for layer in range(L):
            ids = topk_ids[s, layer]
            if eviction == "score":  # the selection policy's stand-in: tokens routed per expert
                scores = torch.zeros(num_experts).index_add_(
                    0, ids.reshape(-1).long(), torch.ones(ids.numel())
                )
            votes = None
            if hidden is not None and cache.predicts(layer):
                h = hidden[s, layer].float()
                votes = predict_votes(h, cache.router(layer + 1), k, None, NOT_DECODE)
            for _wave in cache.prepare(layer, ids, scores, votes):  # counts only: no compute
                pass
            cache.end_step(layer)
            if prefetch == "oracle":
                nl, ns = (layer + 1, s) if layer + 1 < L else (0, s + 1)
                if ns < S:
                    cache.prefetch(nl, torch.unique(topk_ids[ns, nl]))
    total = cache.counters()["total"]
    total["experts_moved"] = total["bytes_h2d"] // store.nbytes_per_expert
    total["tokens"] = S * B
    return total


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--trace", help="trace .pt file (default: bench/results/traces/*.pt, else synthetic)"
    )
    ap.add_argument(
        "--synthetic", action="store_true", help="ignore trace files, use synthetic routing"
    )
    ap.add_argument("--quick", action="store_true", help="fewer steps/layers/settings (< 30 s)")
    ap.add_argument(
        "--model",
        default="qwen3-30b-a3b",
        choices=sorted(MODELS),
        help="expert size for bytes (and E, k for synthetic routing)",
    )
    ap.add_argument("--expert-bytes", type=int, default=0, help="override one expert's bytes")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--fractions", default="0.25,0.5,0.75", help="K as fractions of E")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # tiny tensors: bookkeeping, not math

    path = args.trace
    if path is None and not args.synthetic:
        found = sorted(glob.glob("bench/results/traces/*.pt"))
        path = found[0] if found else None
    hidden = routers = None
    if path:
        data = load_trace(path)
        topk_ids, E = data["topk_ids"], data["num_experts"]
        hidden, routers = data.get("hidden"), data.get("routers")
        source = path
        ebytes = int(data.get("expert_bytes", 0)) or expert_bytes(args.model)
        if args.quick:
            topk_ids = topk_ids[:24, :4]
            hidden = hidden[:24, :4] if hidden is not None else None
            routers = routers[:4] if routers is not None else None
    else:
        m = MODELS[args.model]
        steps, layers = (24, 4) if args.quick else (256, 8)
        E = m["E"]
        topk_ids = synthetic_trace(steps, layers, args.batch, m["k"], E)
        source = f"synthetic ({args.model} E={E} k={m['k']} batch={args.batch}, skewed generator)"
        ebytes = expert_bytes(args.model)
    if args.expert_bytes:
        ebytes = args.expert_bytes
    S, L, B, k = topk_ids.shape
    fractions = [float(f) for f in args.fractions.split(",")]
    prefetches = ["off", "temporal", "oracle"]
    if hidden is not None and routers is not None:
        prefetches[2:2] = ["cross-layer", "both"]
    pools = ["layer", "shared"]
    distinct = sum(
        len(torch.unique(topk_ids[s, layer])) for s in range(S) for layer in range(L)
    ) / (S * L)

    print(
        f"routing: {source}; {S} steps x {L} layers, batch {B}, top-{k}, E={E}; "
        f"{distinct:.1f} distinct experts per layer-step; expert {ebytes / 1e6:.2f} MB"
    )
    head = (
        f"{'eviction':8} {'prefetch':11} {'pool':6} {'K':>5} {'hit%':>6} {'moved/step':>10} "
        f"{'MB/token':>9} {'wasted':>6} {'proj ms/step':>12}"
    )
    print(head)
    print("-" * len(head))
    rows = []
    t0 = time.perf_counter()
    for frac, pool, eviction, prefetch in itertools.product(
        fractions, pools, ["lru", "lfu", "score"], prefetches
    ):
        K = max(k, math.ceil(frac * E))
        c = run_trace(topk_ids, E, K, eviction, prefetch, pool, hidden=hidden, routers=routers)
        moved = c["experts_moved"]
        mb_tok = moved * ebytes / c["tokens"] / 1e6
        proj_ms = moved * ebytes / S / (PROJECT_GBPS * 1e9) * 1e3
        row = dict(
            eviction=eviction,
            prefetch=prefetch,
            slot_pool=pool,
            k_fraction=frac,
            slots=K,
            hit_rate=round(c["hit_rate"], 4),
            misses=c["misses"],
            prefetch_fills=c["prefetch_fills"],
            prefetch_hits=c["prefetch_hits"],
            prefetch_wasted=c["prefetch_wasted"],
            experts_moved=moved,
            mb_per_token=round(mb_tok, 3),
            projected_ms_per_step=round(proj_ms, 3),
        )
        rows.append(row)
        print(
            f"{eviction:8} {prefetch:11} {pool:6} {K:5d} {100 * c['hit_rate']:6.1f} "
            f"{moved / S:10.1f} {mb_tok:9.2f} {c['prefetch_wasted']:6d} {proj_ms:12.2f}"
        )
    print(
        f"({L} traced layers; 'proj ms/step' = bytes / {PROJECT_GBPS:.0f} GB/s, projected, not "
        f"measured; 'oracle' prefetches the true next set: an upper bound; "
        f"{time.perf_counter() - t0:.1f} s)"
    )
    result = dict(
        bench="cache_trace",
        source=source,
        synthetic=path is None,
        steps=S,
        layers=L,
        batch=B,
        top_k=k,
        num_experts=E,
        expert_bytes=ebytes,
        distinct_per_step=round(distinct, 2),
        projected_gbps=PROJECT_GBPS,
        time_is="projected",
        rows=rows,
    )
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
