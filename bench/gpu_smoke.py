"""The first minute on a GPU machine: device facts, pinned host->GPU bandwidth at one expert size,
and one selection kernel against its reference. Small on purpose: it must bring back a number
even when the machine is taken away after a minute.

    PYTHONPATH=. python -m bench.gpu_smoke [--out bench/results/gpu/smoke.json]

Writes its JSON to ``--out`` (and prints it as the last line) as soon as it is done. Without
CUDA it reports the facts, runs the same kernel check under the Triton interpreter and says
that no bandwidth was measured, so the step can be rehearsed on a CPU machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

EXPERT = ("qwen3-30b-a3b", 8)  # one expert size of bench.transfer, experts moved per copy


def facts() -> dict:
    """Device and versions: what every GPU result is kept with."""
    import torch
    import triton

    cuda = torch.cuda.is_available()
    out = {
        "device": torch.cuda.get_device_name() if cuda else None,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "host": platform.node(),
    }
    if cuda:
        p = torch.cuda.get_device_properties(0)
        out.update(capability=f"{p.major}.{p.minor}", gpu_memory_gib=round(p.total_memory / 2**30, 1),
                   sms=p.multi_processor_count)  # fmt: skip
    return out


def pinned_bandwidth() -> dict:
    """Pinned copy-engine, pageable and UVA-gather host->GPU rates at one expert size."""
    from bench import transfer

    model, n = EXPERT
    rows = transfer.measure(model, n, warmup=1, repeats=3)
    return {r["path"]: {"gbps": round(r["gbps"], 2), "correct": r["correct"],
                        "expert_mb": round(r["expert_mb"], 2), "experts": n} for r in rows}  # fmt: skip


def selection_check(device: str) -> dict:
    """select_experts_triton == select_experts_ref on one decode batch (T=16, E=128, top-8)."""
    import torch

    from bench.kernels import routing
    from lynx_sglang.kernels.selection import select_experts_triton
    from lynx_sglang.selection import SelectionParams, select_experts_ref

    logits, ids, weights = routing(16, 128, 8, seed=0, device=device)
    t0 = time.perf_counter()
    a = select_experts_triton(logits, ids, weights, SelectionParams())
    b = select_experts_ref(logits, ids, weights, SelectionParams())
    ok = (torch.equal(a.topk_ids, b.topk_ids) and torch.equal(a.keep, b.keep)
          and torch.allclose(a.topk_weights, b.topk_weights, rtol=1e-5, atol=1e-6))  # fmt: skip
    return {"T": 16, "E": 128, "k": 8, "device": device, "equal_to_reference": bool(ok),
            "first_call_s": round(time.perf_counter() - t0, 2)}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "gpu" / "smoke.json"))
    args = ap.parse_args(argv)
    t0 = time.monotonic()
    import torch

    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels module imports triton
    result: dict = {"bench": "gpu_smoke", **facts()}
    print(f"gpu_smoke: {result}")
    if cuda:
        result["h2d"] = pinned_bandwidth()
        for path, r in result["h2d"].items():
            print(f"  {path:<20} {r['gbps']:7.2f} GB/s at {r['expert_mb']} MB/expert "
                  f"x {r['experts']} {'ok' if r['correct'] else 'WRONG'}")  # fmt: skip
    else:
        result["h2d"] = None
        print("  no CUDA device: no bandwidth measured (the kernel check runs interpreted)")
    result["selection"] = sel = selection_check("cuda" if cuda else "cpu")
    print(f"  selection kernel vs reference: {'equal' if sel['equal_to_reference'] else 'DIFFERENT'}")
    result["seconds"] = round(time.monotonic() - t0, 1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))
    ok = sel["equal_to_reference"] and all(r["correct"] for r in (result["h2d"] or {}).values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
