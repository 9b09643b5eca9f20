"""How the shipped models route, beside the published figures of the models they stand for.

    python -m bench.routing_stats [--models lynx-moe-tiny lynx-moe-e128] [--batches 1,4,16,32,64]

A testbed is only as good as its routing: a flatter router than the real model's makes selection
look costlier and caches look worse. Per model, on its held-out code (teacher-forced decode, B
sequences advancing together as in bench/quality.py; the first 64 positions are prefill):
  distinct   distinct experts per layer-step at each batch size B (mean over steps and layers),
             beside the value if every token chose k experts uniformly and independently,
             E * (1 - (1 - k/E)^B), and beside the value the measured loads alone predict,
             sum_e 1 - (1 - p_e)^B with p_e the layer's share of tokens choosing expert e: where
             the two agree, a batch's distinct count is set by the layer's load imbalance, not by
             any agreement between the requests of the batch;
  skew       per layer, over all decode tokens: the share of routed choices going to the most
             popular 10 % of experts (uniform: 10 %) and the coefficient of variation of the
             experts' loads;
  reuse      per request (sequence) and layer: the fraction of a token's k experts that the
             previous token of the same request also chose (uniform: k/E).
Published figures are printed beside ours with their source; where none is known, none is shown.
Writes ``<out-dir>/routing_stats.json``; the last line is compact JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from bench import quality
from lynx_sglang import SHIPPED_MODEL, SHIPPED_MODELS
from lynx_sglang.model.qwen3_moe import MoEModel

RESULTS = Path(__file__).parent / "results"
# Published distinct experts per layer-step of the models our testbeds stand for.
PUBLISHED = {
    "lynx-moe-e128": {
        "model": "Qwen3-30B-A3B (128 experts, top-8)",
        "distinct": {16: 48.8},
        "source": "OEA, arXiv 2511.02237 (distinct experts per layer at batch 16), as cited in "
                  "this project's issue on quality numbers",
    },
}


def routing(model: MoEModel, ids: torch.Tensor, B: int, prefill: int, decode: int,
            windows: int) -> torch.Tensor | None:  # fmt: skip
    """Decode routing of ``windows`` windows of B sequences: [W, L, B, D, k] int64, or None."""
    batches = quality.make_batches(ids, B, prefill + decode, windows)
    if not batches:
        return None
    out = []
    with torch.no_grad():
        for x in batches:
            topk = model(x).topk_ids  # per layer [B, S, k]
            out.append(torch.stack([t[:, prefill:] for t in topk]))  # [L, B, D, k]
    return torch.stack(out)


def distinct_per_step(r: torch.Tensor, E: int) -> float:
    """Mean distinct experts per layer-step: r [W, L, B, D, k]."""
    W, L, B, D, k = r.shape
    hit = torch.zeros(W, L, D, E, dtype=torch.bool)
    hit.scatter_(-1, r.permute(0, 1, 3, 2, 4).reshape(W, L, D, B * k), True)
    return float(hit.sum(-1).float().mean())


def from_loads(r: torch.Tensor, E: int, B: int) -> float:
    """Distinct experts per layer-step if each of B tokens chose its experts independently with
    the layer's measured marginal p_e (share of tokens choosing e): mean over layers of
    sum_e 1 - (1 - p_e)^B. r: [W, L, B', D, k] (any batch B' of the same routing)."""
    k, L = r.shape[-1], r.shape[1]
    out = 0.0
    for layer in range(L):
        p = torch.bincount(r[:, layer].reshape(-1), minlength=E).double() / (r[:, layer].numel() / k)
        out += float((1 - (1 - p) ** B).sum())
    return out / L


def skew(r: torch.Tensor, E: int) -> list[dict]:
    """Per layer: share of choices to the top 10 % of experts, and the loads' CV."""
    L = r.shape[1]
    out = []
    for layer in range(L):
        load = torch.bincount(r[:, layer].reshape(-1), minlength=E).double()  # [E]
        top = max(1, round(0.1 * E))
        out.append({"top10pct_share": round(float(load.sort(descending=True).values[:top].sum()
                                                  / load.sum()), 4),
                    "load_cv": round(float(load.std() / load.mean()), 4)})  # fmt: skip
    return out


def reuse(r: torch.Tensor, E: int) -> list[float]:
    """Per layer: mean fraction of a token's experts its request's previous token also chose."""
    W, L, B, D, k = r.shape
    chosen = torch.zeros(W, L, B, D, E, dtype=torch.bool)
    chosen.scatter_(-1, r, True)
    both = (chosen[:, :, :, 1:] & chosen[:, :, :, :-1]).sum(-1).double() / k  # [W, L, B, D-1]
    return [round(float(both[:, layer].mean()), 4) for layer in range(L)]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    names = [m.name for m in SHIPPED_MODELS]
    ap.add_argument("--models", nargs="+", default=names)
    ap.add_argument("--batches", default="1,4,16,32,64")
    ap.add_argument("--prefill", type=int, default=64)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--windows", type=int, default=4, help="windows of B sequences per batch")
    ap.add_argument("--out-dir", default=str(RESULTS))
    args = ap.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",") if b]
    result = {"bench": "routing_stats", "text": "held-out code", "prefill": args.prefill,
              "decode": args.decode, "windows": args.windows, "models": {}}  # fmt: skip
    for name in args.models:
        path = Path(name) if "/" in name else SHIPPED_MODEL.parent / name
        model = MoEModel.from_pretrained(path)
        c = model.config
        E, k = c.num_experts, c.num_experts_per_tok
        ids = quality.load_heldout_ids(path)
        pub = PUBLISHED.get(path.name, {})
        print(f"\n{path.name}: E={E}, top-{k}, {c.num_hidden_layers} MoE layers; held-out code")
        print(f"{'batch':>6}{'distinct':>10}{'uniform':>9}{'from loads':>12}{'published':>11}")
        entry = {"num_experts": E, "top_k": k, "distinct": {}, "uniform": {}, "from_loads": {},
                 "published": pub}  # fmt: skip
        widest = None
        for B in batches:
            r = routing(model, ids, B, args.prefill, args.decode, args.windows)
            if r is None:
                print(f"{B:>6}  held-out text too short")
                continue
            d = distinct_per_step(r, E)
            u = E * (1 - (1 - k / E) ** B)
            f = from_loads(r, E, B)
            entry["distinct"][str(B)], entry["uniform"][str(B)] = round(d, 2), round(u, 2)
            entry["from_loads"][str(B)] = round(f, 2)
            p = pub.get("distinct", {}).get(B)
            print(f"{B:>6}{d:>10.1f}{u:>9.1f}{f:>12.1f}{'' if p is None else f'{p:.1f}':>11}")
            widest = r
        entry["skew"] = skew(widest, E)
        entry["reuse"] = reuse(widest, E)
        entry["reuse_uniform"] = round(k / E, 4)
        print("per layer: share of choices to the top 10 % of experts (uniform 0.10), load CV, "
              f"consecutive-token reuse (uniform {k / E:.3f})")  # fmt: skip
        for layer, (s, ru) in enumerate(zip(entry["skew"], entry["reuse"])):
            print(f"  layer {layer}: {s['top10pct_share']:.3f}  {s['load_cv']:.3f}  {ru:.3f}")
        if pub:
            print(f"published: {pub['model']}: {pub['distinct']} ({pub['source']})")
        result["models"][path.name] = entry
    out = Path(args.out_dir) / "routing_stats.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({"bench": "routing_stats", "out": str(out),
                      "distinct": {m: e["distinct"] for m, e in result["models"].items()}}))  # fmt: skip
    return result


if __name__ == "__main__":
    main()
