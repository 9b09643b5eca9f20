"""`make demo`: the main job on the shipped model, on any machine (CPU-only included).

One run of ``bench.compare_offload --quick`` (a few more windows for the quality sample):
resident, offloading alone (ours and SGLang's paged experts, replayed through its own code),
Lynx, Lynx + our cache and Belady's MIN on the same routing, with exact counters (times measured
on a GPU, projected on a CPU). Then three views of that one run, so they cannot disagree:
1. quality: at batch 16, each selection row's distinct experts, Δppl and Δ top-1 accuracy with
   their 95 % intervals and the gate's verdict read on the bounds;
2. offload: the same rows' bytes, loads and tokens/s beside offloading alone;
3. the verdict: the fastest row meeting the gate on its bound, per batch size.
The run's full JSON goes to ``bench/results/demo_quick.json``; the last line is compact JSON.

    python -m bench.demo [OUT_DIR] [extra bench.compare_offload flags]
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path

from bench import compare_offload
from bench.compare_report import print_rows, quality_text

RESULTS = Path(__file__).parent / "results"
SHOWN_BATCH = 16  # the tables' batch size (the quick run covers 1 to 64)
QUALITY = ["--quality-windows", "8", "--max-batches", "2"]  # a sample the gate can be read on


def main(argv: list[str] | None = None) -> int:
    argv = list(argv or [])
    out_dir = Path(argv.pop(0)) if argv and not argv[0].startswith("-") else RESULTS
    rule = "=" * 80
    args = ["--quick", *QUALITY, "--no-plot", "--out-dir", str(out_dir), "--name",
            "demo_offload_quick", *argv]  # fmt: skip
    _, c = _quiet(compare_offload.main, args)
    K = c["slots"][str(c["primary_k_fraction"])]
    E = c["num_experts"]
    at = [r for r in c["rows"] if r["batch"] == SHOWN_BATCH and r["slots"] in (K, E)]
    ok = [r for r in at if r["status"] == "ok"]

    print(rule)
    print(f"lynx-sglang demo 1/2: quality cost of batch-aware expert selection, batch "
          f"{SHOWN_BATCH} (shipped model)")  # fmt: skip
    print(rule)
    base = next(r for r in ok if r["system"] == "resident")
    print(f"{'system':<34}{'experts':>8}{'fewer':>7}  quality (95 % intervals; gate Δppl <= "
          f"+0.5 %, Δacc >= -0.5 pt on the bound)")  # fmt: skip
    for r in ok:
        if r["system"] != "resident" and not r["selection"]:
            continue
        fewer = 1 - r["distinct_per_layer_step"] / base["distinct_per_layer_step"]
        n = r.get("quality_sequences")
        print(f"{r['system'][:34]:<34}{r['distinct_per_layer_step']:>8.1f}{fewer:>7.1%}  "
              f"{quality_text(r)}{'' if n is None else f' ({n} sequences)'}")  # fmt: skip

    print()
    print(rule)
    print("lynx-sglang demo 2/2: Lynx + expert cache vs offloading alone (shipped model's routing)")
    print(rule)
    print(f"batch {SHOWN_BATCH}, K = {K} of {E} slots per layer; bytes and times at {c['shape']} "
          f"expert size;\ntimes {c['time_source'].upper()}")  # fmt: skip
    print_rows(at)

    speed = c["speedup_lynx_offload_vs_offload"]
    product = c["product"]
    print(f"\nverdict ({c['time_source']}): the fastest lynx+offload row meeting the quality gate "
          f"on its bound,\nover the best offloading-alone row (the rows above, one run)")  # fmt: skip
    for B, x in speed.items():
        p = product[B]
        shown = "" if p["meets_quality_goal"] else "; no lynx+offload row met the gate"
        print(f"  batch {B:>3}: {x:5.2f}x  {p['system']}; {quality_text(p)}{shown}")
    g = c["goal"]
    print(f"  goal >= {g['speedup']}x at batch {g['batches']} within the quality goal: "
          f"{'met' if g['met'] else 'not met'}")

    summary = {
        "demo": "lynx-sglang",
        "time_source": c["time_source"], "shape": c["shape"], "slots": K,
        "product": {B: {"system": p["system"], "speedup": speed[B],
                        "quality_verdict": p["quality_verdict"]} for B, p in product.items()},
        "goal_met": g["met"],
        "full_results": str(out_dir / "demo_quick.json"),
    }  # fmt: skip
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "demo_quick.json").write_text(json.dumps({"offload": c}) + "\n")
    print(json.dumps(summary))
    return 0


def _quiet(fn, argv: list[str]) -> tuple[str, dict]:
    """Run a benchmark's main with its stdout captured: (what it printed, what it returned)."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        result = fn(argv)
    return buf.getvalue(), result


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
