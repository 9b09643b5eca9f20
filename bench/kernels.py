"""Selection kernel cost: the Triton kernels vs the torch reference vs one MoE layer forward.

    python -m bench.kernels [--batches 1,2,4,8,16,32,64] [--iters 200] [--models ...]

On CUDA, for each model's MoE shape and decode batch, times with CUDA events (median):
  select      select_experts_triton, eager (includes Python and launch overhead)
  select_g    the same inside a CUDA graph (how decode runs), per call
  ref         select_experts_ref, eager
  moe_g       SGLang's fused MoE (its tuned Triton kernel, bf16) on the stock routing, graphed
  lynx_moe_g  the same MoE on the routing after selection (budget 0.6), graphed
overhead = select_g / moe_g. Distinct experts before and after selection are averaged too.
Without CUDA it says so, runs a small correctness check of the kernels under the Triton
interpreter, and prints JSON with "measured": false. The last line is always JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from collections.abc import Callable
from typing import Optional

import torch

# (experts E, top-k, hidden H, expert intermediate I)
MODELS = {
    "mixtral-8x7b": (8, 2, 4096, 14336),
    "qwen3-30b-a3b": (128, 8, 2048, 768),
    "olmoe-1b-7b": (64, 8, 2048, 1024),
}
BATCHES = (1, 2, 4, 8, 16, 32, 64)
GRAPH_COPIES = 10  # selections per graph replay, so replay latency is amortised


def routing(T: int, E: int, k: int, seed: int, device: str):
    """Router logits [T, E] and their softmax top-k (renormalised), as a decode batch has."""
    g = torch.Generator(device=device).manual_seed(seed)
    logits = torch.randn(T, E, generator=g, device=device) * 1.5  # [T, E]
    weights, ids = torch.softmax(logits, -1).topk(k)  # [T, k]
    return logits.bfloat16(), ids.int(), weights / weights.sum(-1, keepdim=True)


def time_us(fn: Callable[[], object], iters: int) -> float:
    """Median microseconds of fn() between CUDA events (after warm-up)."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


def graphed(fn: Callable[[], object], copies: int) -> Optional[Callable[[], None]]:
    """fn captured `copies` times back to back in one CUDA graph; None if capture fails."""
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(copies):
                fn()
        return graph.replay
    except Exception as e:  # a backend that cannot be captured: report, do not fail the bench
        print(f"  (graph capture failed: {type(e).__name__}: {e})", file=sys.stderr)
        return None


def moe_forward(E: int, k: int, H: int, inter: int):
    """One MoE layer's expert computation, as SGLang runs it (falls back to the torch loop)."""
    w13 = torch.randn(E, 2 * inter, H, device="cuda", dtype=torch.bfloat16) * 0.02  # [E, 2I, H]
    w2 = torch.randn(E, H, inter, device="cuda", dtype=torch.bfloat16) * 0.02  # [E, H, I]
    try:
        from sglang.srt.layers.moe.fused_moe_triton import fused_experts
        from sglang.srt.layers.moe.moe_runner import MoeRunnerConfig
        from sglang.srt.layers.moe.topk import StandardTopKOutput

        cfg = MoeRunnerConfig(
            num_experts=E, num_local_experts=E, hidden_size=H,
            intermediate_size_per_partition=inter, top_k=k, params_dtype=torch.bfloat16,
            inplace=False, gate_up_interleaved=False,
        )  # fmt: skip

        def run(x, ids, weights, logits):
            return fused_experts(x, w13, w2, StandardTopKOutput(weights, ids, logits), cfg)

        return "sglang-fused-moe", run
    except Exception as e:  # no usable SGLang: the plain loop, labelled as such
        print(f"  (SGLang fused MoE unavailable: {e}; timing the torch loop)", file=sys.stderr)
        from lynx_sglang.moe import fused_moe_ref

        return "torch-loop", lambda x, ids, weights, logits: fused_moe_ref(x, w13, w2, ids, weights)


def measure(batches, iters: int, models) -> list[dict]:
    """One row per (model, batch), printed as it is measured."""
    rows = []
    for name in models:
        E, k, H, inter = MODELS[name]
        moe_kind, moe = moe_forward(E, k, H, inter)
        for T in batches:
            rows.append(measure_batch(name, T, moe_kind, moe, iters))
            print(format_row(rows[-1]), flush=True)
        del moe  # free this model's expert weights before the next
        torch.cuda.empty_cache()
    return rows


def measure_batch(name: str, T: int, moe_kind: str, moe, iters: int) -> dict:
    """The timings described in the module docstring for one model and decode batch size."""
    from lynx_sglang.kernels.selection import select_experts_triton
    from lynx_sglang.selection import SelectionParams, distinct_experts, select_experts_ref

    E, k, H, inter = MODELS[name]
    params = SelectionParams()
    logits, ids, weights = routing(T, E, k, seed=T, device="cuda")
    num_valid = torch.tensor([T], dtype=torch.int32, device="cuda")
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)  # [T, H]
    sel = select_experts_triton(logits, ids, weights, params, num_valid)

    def select():
        return select_experts_triton(logits, ids, weights, params, num_valid)

    def ref():
        return select_experts_ref(logits, ids, weights, params, T)

    def stock_moe():
        return moe(x, ids, weights, logits)

    def lynx_moe():
        return moe(x, sel.topk_ids, sel.topk_weights, logits)

    select_g = graphed(select, GRAPH_COPIES)
    moe_g, lynx_g = graphed(stock_moe, 1), graphed(lynx_moe, 1)
    row = {
        "model": name, "E": E, "k": k, "H": H, "I": inter, "batch": T, "moe": moe_kind,
        "select_us": time_us(select, iters),
        "select_graph_us": time_us(select_g, iters) / GRAPH_COPIES if select_g else None,
        "ref_us": time_us(ref, iters),
        "moe_graph_us": time_us(moe_g or stock_moe, iters),
        "lynx_moe_graph_us": time_us(lynx_g or lynx_moe, iters),
        "moe_graphed": moe_g is not None and lynx_g is not None,
        "experts_before": int(distinct_experts(ids, E)),
        "experts_after": int(distinct_experts(sel.topk_ids, E)),
    }  # fmt: skip
    row["overhead_pct"] = 100.0 * (row["select_graph_us"] or row["select_us"]) / row["moe_graph_us"]
    return row


HEADER = (
    f"{'model':<15}{'T':>4} {'select':>8} {'sel.graph':>9} {'ref':>8} {'moe.graph':>10} "
    f"{'lynx moe':>9} {'overhead':>9} {'experts':>9}"
)


def format_row(r: dict) -> str:
    def us(v):
        return f"{v:8.1f}" if v is not None else f"{'-':>8}"

    return (
        f"{r['model']:<15}{r['batch']:>4} {us(r['select_us'])} {us(r['select_graph_us']):>9} "
        f"{us(r['ref_us'])} {us(r['moe_graph_us']):>10} {us(r['lynx_moe_graph_us']):>9} "
        f"{r['overhead_pct']:8.2f}% {r['experts_before']:>4}->{r['experts_after']:<4}"
    )


def smoke() -> list[dict]:
    """Kernels == reference on a few small batches, under the Triton interpreter (CPU)."""
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported
    from lynx_sglang.kernels.selection import interpreted, select_experts_triton
    from lynx_sglang.selection import SelectionParams, select_experts_ref

    if not interpreted():
        return [{"ok": False, "why": "triton was imported before TRITON_INTERPRET was set"}]
    out = []
    for name in MODELS:
        E, k, _, _ = MODELS[name]
        logits, ids, weights = routing(6, E, k, seed=0, device="cpu")
        nv = torch.tensor(5)
        a = select_experts_triton(logits, ids, weights, SelectionParams(), nv)
        b = select_experts_ref(logits, ids, weights, SelectionParams(), nv)
        ok = (
            torch.equal(a.topk_ids, b.topk_ids)
            and torch.equal(a.keep, b.keep)
            and torch.allclose(a.topk_weights, b.topk_weights, rtol=1e-5, atol=1e-6)
        )
        out.append({"model": name, "T": 6, "E": E, "k": k, "ok": bool(ok)})
        print(f"  smoke {name:<15} T=6 E={E:<4} k={k}: {'ok' if ok else 'MISMATCH'}")
    return out


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default=",".join(map(str, BATCHES)))
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument(
        "--models", default=",".join(MODELS), help="comma-separated: " + ", ".join(MODELS)
    )
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench.kernels: timings need a CUDA GPU; running a CPU correctness smoke test.")
        checks = smoke()
        print(json.dumps({"measured": False, "device": "cpu", "smoke": checks, "rows": []}))
        return 0 if all(c["ok"] for c in checks) else 1
    device = torch.cuda.get_device_name()
    print(f"bench.kernels on {device}: microseconds per call, median of {args.iters}")
    print(HEADER)
    batches = [int(b) for b in args.batches.split(",")]
    rows = measure(batches, args.iters, args.models.split(","))
    print(json.dumps({"measured": True, "device": device, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
