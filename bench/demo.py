"""`make demo`: the main job on the shipped model, on any machine (CPU-only included).

1. Quality: distinct experts per decode step and the quality cost of batch-aware selection at
   batch 16 (``bench.quality --quick``).
2. Offload: resident, offloading alone (ours and SGLang's paged experts, replayed through its own
   code), Lynx, Lynx + our cache and Belady's MIN on the same routing, with exact counters
   (``bench.compare_offload --quick``; times measured on a GPU, projected on a CPU).

Prints the two tables and a short verdict; both runs' full JSON goes to
``bench/results/demo_quick.json``; the last line is a compact JSON summary.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path

from bench import compare_offload, quality
from bench.compare_report import print_rows, quality_text

RESULTS = Path(__file__).parent / "results"
SHOWN_BATCH = 16  # the offload table's batch size (the quick run covers 1 to 64)


def main(argv: list[str] | None = None) -> int:
    out_dir = Path((argv or [str(RESULTS)])[0])
    rule = "=" * 80
    print(rule)
    print("lynx-sglang demo 1/2: quality cost of batch-aware expert selection (shipped model)")
    print(rule)
    q_text, q = _quiet(quality.main, ["--quick", "--no-plot", "--out-dir", str(out_dir)])
    print("\n".join(q_text.splitlines()[:-1]))  # the table (its JSON line is in the file)

    print()
    print(rule)
    print("lynx-sglang demo 2/2: Lynx + expert cache vs offloading alone (shipped model's routing)")
    print(rule)
    args = ["--quick", "--no-plot", "--out-dir", str(out_dir), "--name", "demo_offload_quick"]
    _, c = _quiet(compare_offload.main, args)
    K = c["slots"][str(c["primary_k_fraction"])]
    rows = [r for r in c["rows"] if r["batch"] == SHOWN_BATCH and r["slots"] in (K, c["num_experts"])]
    print(f"batch {SHOWN_BATCH}, K = {K} of {c['num_experts']} slots per layer; bytes and times "
          f"at {c['shape']} expert size;\ntimes {c['time_source'].upper()}")  # fmt: skip
    print_rows(rows)

    speed = c["speedup_lynx_offload_vs_offload"]
    product = c["product"]
    print(f"\nverdict ({c['time_source']}): lynx+offload over the best offloading-alone row")
    for B, x in speed.items():
        p = product[B]
        print(f"  batch {B:>3}: {x:5.2f}x  {p['system']}; {quality_text(p)}")
    g = c["goal"]
    print(f"  goal >= {g['speedup']}x at batch {g['batches']} within the quality goal: "
          f"{'met' if g['met'] else 'not met'}")

    summary = {
        "demo": "lynx-sglang",
        "quality": {k: q[k] for k in ("batch", "setting", "expert_reduction", "ppl_rel_increase",
                                      "accuracy_delta_points", "kl", "agreement",
                                      "agreement_bf16_floor")},  # fmt: skip
        "offload": {"time_source": c["time_source"], "shape": c["shape"], "slots": K,
                    "speedup_lynx_offload_vs_offload": speed, "goal_met": g["met"]},  # fmt: skip
        "full_results": str(out_dir / "demo_quick.json"),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "demo_quick.json").write_text(json.dumps({"quality": q, "offload": c}) + "\n")
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
