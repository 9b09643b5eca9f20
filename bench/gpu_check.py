"""`make gpu-check`: every GPU test and benchmark in one command, for a GPU machine with only
torch and triton (no SGLang), in at most 8 minutes on one H200; results under bench/results/gpu/
and, when $OUT is set (the device tool's folder of files that come back), copied there too.

    PYTHONPATH=. python -m bench.gpu_check [--out bench/results/gpu] [--budget-s 480]
    PYTHONPATH=. python -m bench.gpu_check --rehearse   # every step's CPU variant: starts, imports

Steps, in order, each with its own time limit, each writing its result file as it finishes (and
gpu_check.json rewritten after every step), so a machine taken away mid-run loses one step only:
  1. smoke: device facts, pinned H2D bandwidth at one expert size, one selection kernel against
     its reference (bench.gpu_smoke; at most 60 s);
  2. tests: pytest -m gpu on the core's tests (kernels vs references, cache exactness and the
     hybrid path captured in a CUDA graph, bit-for-bit against eager and the resident layer);
  3. transfer: bench.transfer (pinned copy engine, pageable copy, UVA gather per expert size);
  4. kernels: bench.kernels (selection kernels' time per decode batch);
  5. host_overhead: bench.host_overhead (host time per layer-step: selection, executors, replay);
  6. compare_offload: bench.compare_offload --quick at Qwen3-30B-A3B's expert size (measured,
     CUDA events; SGLang's paged-experts rows from the counters a CPU run recorded, labelled).
At most 8 files come back from the GPU machine (16 MiB each): gpu_check.json, one <step>.txt per
step and compare_offload_gpu.json. The script exits non-zero if any step failed.

``--rehearse`` runs each step's CPU variant instead (pytest only collects; the benchmarks take
their CPU paths and smallest slices): what a CPU test runs with SGLang made unimportable, so a
step that would crash on the GPU machine fails CI first.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
MAX_FILES_BACK = 8  # what the device tool brings back from $OUT


SMOKE_S = 60.0


@dataclass(frozen=True)
class Check:
    name: str
    gpu: tuple[str, ...]  # the command on the GPU machine ({out}: the results folder)
    cpu: tuple[str, ...]  # its rehearsal on a CPU machine: the same module, its cheapest path
    share: float  # of the time budget left after the fixed limits
    result: str = ""  # a result file the step writes under {out}, besides its stdout
    fixed_s: float = 0.0  # a fixed time limit instead of a share (the smoke step)
CO_SLICE = ("--batches", "1,16", "--k-fractions", "0.25", "--prefill", "16", "--decode", "12",
            "--warmup", "2", "--max-batches", "1", "--quality-windows", "1",
            "--quality-sequences", "0", "--evictions", "lru", "--budgets=")  # fmt: skip
CHECKS = (
    Check("smoke", (PY, "-m", "bench.gpu_smoke", "--out", "{out}/smoke.json"),
          (PY, "-m", "bench.gpu_smoke", "--out", "{out}/smoke.json"), 0.0, fixed_s=SMOKE_S),
    Check("tests", (PY, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests"),
          (PY, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "--co", "tests"), 0.30),
    Check("transfer", (PY, "-m", "bench.transfer", "--quick"),
          (PY, "-m", "bench.transfer", "--quick"), 0.12),
    Check("kernels", (PY, "-m", "bench.kernels", "--iters", "50"),
          (PY, "-m", "bench.kernels", "--iters", "5"), 0.12),
    Check("host_overhead", (PY, "-m", "bench.host_overhead", "--out", "{out}/host_overhead.json"),
          (PY, "-m", "bench.host_overhead", "--quick", "--device", "cpu", "--out",
           "{out}/host_overhead.json"), 0.16),
    Check("compare_offload",
          (PY, "-m", "bench.compare_offload", "--quick", "--device", "cuda", "--shape",
           "qwen3-30b-a3b", "--out-dir", "{out}", "--name", "compare_offload_gpu", "--no-plot"),
          (PY, "-m", "bench.compare_offload", *CO_SLICE, "--device", "cpu", "--shape",
           "qwen3-30b-a3b", "--out-dir", "{out}", "--name", "compare_offload_gpu", "--no-plot"),
          0.30, result="compare_offload_gpu.json"),
)  # fmt: skip


def last_json(text: str) -> dict | None:
    """A step's last stdout line when it is a JSON object of at most 4 KB (its summary)."""
    lines = text.strip().splitlines()
    if not lines or len(lines[-1]) > 4096:
        return None
    try:
        value = json.loads(lines[-1])
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "gpu"))
    ap.add_argument("--budget-s", type=float, default=480.0, help="all steps together")
    ap.add_argument("--rehearse", action="store_true", help="every step's CPU variant (no GPU)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    back = Path(os.environ["OUT"]) if os.environ.get("OUT") else None
    from bench.gpu_smoke import facts as device_facts

    facts = device_facts()
    print(f"gpu_check{' (rehearsal)' if args.rehearse else ''}: {facts}")
    if facts["device"] is None and not args.rehearse:
        print("gpu_check: no CUDA device here; nothing measured (--rehearse runs the CPU variants)")
        return 2
    result = {"bench": "gpu_check", "rehearsal": args.rehearse, **facts, "steps": []}
    t_all = time.monotonic()

    def publish(*files: Path) -> None:
        """gpu_check.json now, and the files to $OUT (what comes back from a GPU machine)."""
        result["seconds"] = round(time.monotonic() - t_all, 1)
        (out / "gpu_check.json").write_text(json.dumps(result, indent=1) + "\n")
        if back is not None:
            back.mkdir(parents=True, exist_ok=True)
            for f in (*files, out / "gpu_check.json"):
                if f.exists() and f.resolve() != (back / f.name).resolve():
                    shutil.copyfile(f, back / f.name)

    rest = args.budget_s - sum(c.fixed_s for c in CHECKS)
    for check in CHECKS:
        cmd = [c.format(out=out) for c in (check.cpu if args.rehearse else check.gpu)]
        limit = check.fixed_s or check.share * rest
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH", ""), str(ROOT)) if p)
        t0 = time.monotonic()
        try:
            done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=limit,
                                  env=env)  # fmt: skip
            rc, text = done.returncode, done.stdout + done.stderr
            summary = last_json(done.stdout)
        except subprocess.TimeoutExpired as e:
            def text_of(b):
                return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")

            rc, summary = 124, None
            text = f"{text_of(e.stdout)}{text_of(e.stderr)}\ntimed out after {limit:.0f} s"
        seconds = round(time.monotonic() - t0, 1)
        log = out / f"{check.name}.txt"
        log.write_text(f"$ {' '.join(cmd)}\n{text}")
        result["steps"].append({"step": check.name, "command": " ".join(cmd), "rc": rc,
                                "seconds": seconds, "limit_s": round(limit), "summary": summary})  # fmt: skip
        publish(log, *([out / check.result] if check.result else []))
        print(f"  {check.name:<16} rc={rc:<4} {seconds:>7.1f} s", flush=True)
    print(json.dumps({k: v for k, v in result.items() if k != "steps"}
                     | {"rc": {s["step"]: s["rc"] for s in result["steps"]}}))  # fmt: skip
    return 0 if all(s["rc"] == 0 for s in result["steps"]) else 1


if __name__ == "__main__":
    sys.exit(main())
