"""`make gpu-check`: every GPU test and benchmark in one command, for a GPU machine with only
torch and triton (no SGLang), in at most 8 minutes on one H200; results under bench/results/gpu/.

    PYTHONPATH=. python -m bench.gpu_check [--out bench/results/gpu] [--budget-s 480]

Steps, each with its own time limit (the budget is split so that every step gets its turn):
  1. pytest -m gpu on the core's tests (kernels vs references, cache exactness and the hybrid
     path captured in a CUDA graph, bit-for-bit against eager and the resident layer);
  2. bench.transfer (pinned copy engine, pageable copy, UVA gather bandwidth per expert size);
  3. bench.kernels (selection kernels' time per decode batch);
  4. bench.host_overhead (host time per layer-step: selection, each executor, graph replay);
  5. bench.compare_offload --quick at Qwen3-30B-A3B's expert size (measured, CUDA events).
Each step's output goes to <out>/<step>.txt, and <out>/gpu_check.json records the device, the
versions, every command, its exit code and seconds. A step that fails is reported, not hidden;
the script exits non-zero if any did.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STEPS = (  # (name, command, share of the time budget)
    ("tests", [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
               "tests"], 0.30),  # fmt: skip
    ("transfer", [sys.executable, "-m", "bench.transfer", "--quick"], 0.12),
    ("kernels", [sys.executable, "-m", "bench.kernels", "--iters", "50"], 0.12),
    ("host_overhead", [sys.executable, "-m", "bench.host_overhead"], 0.16),
    ("compare_offload", [sys.executable, "-m", "bench.compare_offload", "--quick", "--device",
                         "cuda", "--shape", "qwen3-30b-a3b", "--out-dir", "{out}",
                         "--name", "compare_offload_gpu"], 0.30),  # fmt: skip
)


def device_facts() -> dict:
    import torch
    import triton

    cuda = torch.cuda.is_available()
    return {
        "device": torch.cuda.get_device_name() if cuda else None,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "host": platform.node(),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "gpu"))
    ap.add_argument("--budget-s", type=float, default=480.0, help="all steps together")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    facts = device_facts()
    print(f"gpu_check: {facts}")
    if facts["device"] is None:
        print("gpu_check: no CUDA device here; nothing measured")
        return 2
    runs, t_all = [], time.monotonic()
    for name, cmd, share in STEPS:
        cmd = [c.format(out=out) for c in cmd]
        limit = share * args.budget_s
        t0 = time.monotonic()
        try:
            done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=limit)
            rc, text = done.returncode, done.stdout + done.stderr
        except subprocess.TimeoutExpired as e:
            rc, text = 124, f"{e.stdout or ''}{e.stderr or ''}\ntimed out after {limit:.0f} s"
        seconds = round(time.monotonic() - t0, 1)
        (out / f"{name}.txt").write_text(text if isinstance(text, str) else text.decode())
        runs.append({"step": name, "command": " ".join(cmd), "rc": rc, "seconds": seconds})
        print(f"  {name:<16} rc={rc:<4} {seconds:>7.1f} s")
    result = {"bench": "gpu_check", **facts, "steps": runs,
              "seconds": round(time.monotonic() - t_all, 1)}  # fmt: skip
    (out / "gpu_check.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))
    return 0 if all(r["rc"] == 0 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
