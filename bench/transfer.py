"""Host->GPU expert copy bandwidth: pinned copy engine vs pageable copy vs Triton UVA gather.

    python -m bench.transfer [--quick] [--experts N]

Each measurement moves N whole experts (w13 [2I, H] + w2 [H, I], bf16) into GPU slots on a side
stream, timed with CUDA events after warm-up; the median of the repeats is reported, and each
path's efficiency is relative to the pinned copy engine measured in the same run. Needs CUDA;
on a CPU-only machine it says so and prints JSON with "measured": false.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from lynx_sglang.kernels.offload_gather import offload_gather
from lynx_sglang.offload import HostExpertStore

# (hidden H, intermediate I) of one expert.
SHAPES = {
    "mixtral-8x7b": (4096, 14336),
    "qwen3-30b-a3b": (2048, 768),
    "olmoe": (2048, 1024),
    "gpt-oss-20b": (2880, 2880),
    "deepseek-v2-lite": (2048, 1408),
}
MAX_BYTES = 4 << 30  # per measurement, so the largest experts still fit host memory comfortably


def _time(fn, stream: torch.cuda.Stream, warmup: int, repeats: int) -> float:
    """Median milliseconds of ``fn`` queued on ``stream``, from CUDA events."""
    times = []
    for i in range(warmup + repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(stream):
            start.record(stream)
            fn()
            end.record(stream)
        end.synchronize()
        if i >= warmup:
            times.append(start.elapsed_time(end))
    return statistics.median(times)


def measure(model: str, experts: int, warmup: int, repeats: int) -> list[dict]:
    """Bytes/s of the three copy paths for ``experts`` experts of ``model``."""
    hidden, inter = SHAPES[model]
    shapes = {"w13": (2 * inter, hidden), "w2": (hidden, inter)}
    store = HostExpertStore(1, experts, shapes, torch.bfloat16, headroom_gib=1.0)
    for name in store.names:
        store.tensor(0, name).normal_()
    host = [store.tensor(0, n) for n in store.names]  # pinned: [N, *shape] each
    pageable = [t.clone() for t in host]  # plain malloc'd copies
    dst = [torch.empty(t.shape, dtype=t.dtype, device="cuda") for t in host]  # [N, *shape] slots
    src_rows = store.buffer.view(-1, store.block_bytes)  # [N, B] uint8
    rows = torch.arange(experts, dtype=torch.int32, device="cuda")
    segments = [store.segment(n) for n in store.names]

    def engine(srcs):
        def run():
            for e in range(experts):
                for d, s in zip(dst, srcs):
                    d[e].copy_(s[e], non_blocking=True)

        return run

    def uva():
        for d, seg in zip(dst, segments):
            offload_gather(src_rows, seg.offset, d, rows, rows)

    stream = torch.cuda.Stream()
    nbytes = experts * store.nbytes_per_expert
    out = []
    for path, fn in (
        ("pinned copy engine", engine(host)),
        ("pageable copy", engine(pageable)),
        ("triton uva gather", uva),
    ):
        for d in dst:
            d.zero_()
        ms = _time(fn, stream, warmup, repeats)
        ok = all(torch.equal(d[experts - 1].cpu(), h[experts - 1]) for d, h in zip(dst, host))
        out.append(
            dict(
                model=model,
                path=path,
                experts=experts,
                expert_mb=store.nbytes_per_expert / 1e6,
                ms=ms,
                gbps=nbytes / ms / 1e6,
                correct=ok,
            )
        )
    pinned = out[0]["gbps"]
    for row in out:
        row["efficiency_vs_pinned"] = row["gbps"] / pinned
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats")
    ap.add_argument(
        "--experts", type=int, default=32, help="experts moved per measurement (capped at 4 GiB)"
    )
    ap.add_argument("--models", default=",".join(SHAPES), help="comma-separated subset")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("no GPU: transfer bandwidth needs CUDA")
        result = dict(bench="transfer", measured=False, reason="no CUDA device")
        print(json.dumps(result))
        return result
    warmup, repeats = (1, 3) if args.quick else (3, 10)
    rows = []
    print(
        f"device: {torch.cuda.get_device_name()}; bf16 experts; median of {repeats} after {warmup} warm-up"
    )
    head = f"{'model':18} {'expert MB':>9} {'N':>3} {'path':20} {'ms':>8} {'GB/s':>7} {'vs pinned':>9} ok"
    print(head)
    print("-" * len(head))
    for model in args.models.split(","):
        hidden, inter = SHAPES[model]
        n = max(1, min(args.experts, MAX_BYTES // (3 * hidden * inter * 2)))
        for row in measure(model, n, warmup, repeats):
            rows.append(row)
            print(
                f"{model:18} {row['expert_mb']:9.1f} {n:3d} {row['path']:20} {row['ms']:8.2f} "
                f"{row['gbps']:7.1f} {row['efficiency_vs_pinned']:9.2f} {'yes' if row['correct'] else 'NO'}"
            )
        torch.cuda.empty_cache()
    result = dict(
        bench="transfer",
        measured=True,
        device=torch.cuda.get_device_name(),
        warmup=warmup,
        repeats=repeats,
        rows=rows,
    )
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
