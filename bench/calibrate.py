"""Per-layer budgets calibrated on data, not guessed: a preset for ``--lynx-layer-budgets``.

    python -m bench.calibrate [--models lynx-moe-tiny lynx-moe-e128] [--batch 16]
                              [--targets experts bytes] [--grid 0.8,0.6,0.5,0.4]

The held-out code is cut into windows of B sequences; the first half of the windows is the
**calibration split**, the second half the disjoint **evaluation split** (other files of the
held-out text). Per model and target:
  experts  Lynx's selection, every expert resident: maximise the reduction of distinct experts
           per layer-step;
  bytes    miss-aware selection in front of a cache of K = E/2 slots per layer (the budget
           applies to the experts a step would copy): maximise the reduction of host->GPU bytes.
Search (on the calibration split only): each layer alone is measured down ``--grid`` (the
others keep all their experts) until its perplexity cost leaves the gate: its reduction and its
Δ log-likelihood. Moves (one layer one notch down) are then taken greedily by reduction gained
per perplexity spent, while the layers' summed cost stays inside ``--margin`` of the gate; the
combination is measured and, while its 95 % interval is not inside the gate (Δppl <= +0.5 %,
Δacc >= -0.5 pt), the last move is undone. A single budget for every layer is measured too (down
the grid until it leaves the gate); the preset is the better of the two on the calibration split.
It is then measured once on the evaluation split, and on out-of-domain prose, beside the
uncalibrated default and the best single budget, all with intervals and the gate's verdict.
Writes ``<out-dir>/calibrate.json``; the last line is compact JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import replace
from pathlib import Path

from bench import quality
from bench.quality import DEFAULT, Setting, gate_verdict, paired_intervals
from lynx_sglang import SHIPPED_MODEL, SHIPPED_MODELS
from lynx_sglang.model.qwen3_moe import MoEModel

RESULTS = Path(__file__).parent / "results"
GATE = quality.GOAL["ppl_rel_increase"]


def setting(target: str, budgets: dict[int, float], uniform: float = 1.0) -> Setting:
    """Lynx at per-layer ``budgets`` (the others at ``uniform``); "bytes": miss-aware, K = E/2."""
    lb = ",".join(f"{layer}:{b:g}" for layer, b in sorted(budgets.items()))
    if target == "experts":
        p = replace(DEFAULT, budget=uniform, layer_budgets=lb, miss_budget=0.0)
        return Setting(f"lynx layers={lb or '-'} b={uniform:g}", p)
    p = replace(DEFAULT, budget=uniform, layer_budgets=lb, miss_budget=uniform)
    return Setting(f"lynx+miss@2 layers={lb or '-'} b={uniform:g}", p, fraction=2)


class Split:
    """One split's windows, its base run, and measurements of settings on it."""

    def __init__(self, model: MoEModel, windows: list, prefill: int, warmup: int):
        self.model, self.windows, self.prefill, self.warmup = model, windows, prefill, warmup
        self.E = model.config.num_experts
        self.base, _, _, _ = quality.evaluate(model, windows, prefill, [], fractions=(2,),
                                              warmup=warmup)  # fmt: skip
        self.evaluations = 0

    def measure(self, st: Setting) -> dict:
        _, (r,), _, _ = quality.evaluate(self.model, self.windows, self.prefill, [st],
                                         fractions=(2,), warmup=self.warmup)  # fmt: skip
        self.evaluations += 1
        ci = paired_intervals(r, self.base)
        return {"setting": st.name, "layer_budgets": st.params.layer_budgets,
                "budget": st.params.budget,
                "expert_reduction": round(1 - r.distinct / self.base.distinct, 4),
                "bytes_reduction_e2": quality.bytes_reduction(r, self.base, self.E // 2),
                "d_nll": (r.nll_sum - self.base.nll_sum) / r.count,
                "ppl_rel_increase": round(r.ppl / self.base.ppl - 1, 5),
                "accuracy_delta_points": round(100 * (r.accuracy - self.base.accuracy), 3),
                "ci95": ci, "verdict": gate_verdict(ci), "tokens": r.count}  # fmt: skip


def key_of(target: str) -> str:
    return "expert_reduction" if target == "experts" else "bytes_reduction_e2"


def calibrate(cal: Split, target: str, L: int, grid: list[float], margin: float) -> dict:
    """The greedy per-layer search on the calibration split; returns the preset and its trail."""
    key = key_of(target)
    alone = {}  # (layer, budget) -> measurement of that layer alone at that budget
    for layer in range(L):
        for b in grid:  # descending: past the first budget outside the gate, lower ones cost more
            alone[(layer, b)] = m = cal.measure(setting(target, {layer: b}))
            if math.expm1(m["d_nll"]) > GATE:
                break
    budgets = dict.fromkeys(range(L), 1.0)

    def gain(layer: int, b: float) -> tuple[float, float]:
        if b >= 1.0:
            return 0.0, 0.0
        m = alone.get((layer, b))
        if m is None:  # not measured: past this layer's first budget outside the gate
            return 0.0, math.inf
        return (m[key] or 0.0), max(m["d_nll"], 0.0)

    moves = []
    while True:
        cost = sum(gain(layer, b)[1] for layer, b in budgets.items())
        best = None
        for layer, b in budgets.items():
            nxt = [g for g in grid if g < b]
            if not nxt:
                continue
            r1, c1 = gain(layer, nxt[0])
            r0, c0 = gain(layer, b)
            if math.expm1(cost - c0 + c1) > margin * GATE:  # the layers' summed cost, with room
                continue                                        # for the interval
            ratio = (r1 - r0) / max(c1 - c0, 1e-6)
            if r1 > r0 and (best is None or ratio > best[0]):
                best = (ratio, layer, nxt[0])
        if best is None:
            break
        budgets[best[1]] = best[2]
        moves.append({"layer": best[1], "budget": best[2]})
    trail = []
    while True:  # verify the combination on the calibration split; undo moves until inside
        m = cal.measure(setting(target, {ly: b for ly, b in budgets.items() if b < 1.0}))
        trail.append(m)
        if m["verdict"] == "met" or not moves:
            break
        last = moves.pop()
        prev = [g for g in [1.0, *grid] if g > last["budget"]]
        budgets[last["layer"]] = prev[-1]
    preset = ",".join(f"{ly}:{b:g}" for ly, b in budgets.items())
    return {"preset": preset, "moves": moves, "verify": trail,
            "alone": [{"layer": ly, "budget": b, key: m[key], "d_nll": round(m["d_nll"], 6)}
                      for (ly, b), m in alone.items()]}  # fmt: skip


def best_uniform(cal: Split, target: str, grid: list[float]) -> dict | None:
    """The best single budget for every layer on the calibration split (met on the bound)."""
    met = []
    for b in grid:  # descending: the first budget that does not meet the gate ends the sweep
        m = cal.measure(setting(target, {}, uniform=b))
        if m["verdict"] != "met":
            break
        met.append(m)
    return max(met, key=lambda m: m[key_of(target)] or 0.0, default=None)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    names = [m.name for m in SHIPPED_MODELS]
    ap.add_argument("--models", nargs="+", default=names)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--targets", nargs="+", choices=("experts", "bytes"), default=["experts", "bytes"])
    ap.add_argument("--grid", default="0.9,0.8,0.7,0.6,0.5", help="budgets a layer may take")
    ap.add_argument("--margin", type=float, default=1.0,
                    help="the greedy search spends at most this share of the gate (point estimate)")
    ap.add_argument("--prefill", type=int, default=64)
    ap.add_argument("--decode", type=int, default=192)
    ap.add_argument("--warmup", type=int, default=16)
    ap.add_argument("--max-windows", type=int, default=0, help="windows in all (0: all held-out)")
    ap.add_argument("--out-dir", default=str(RESULTS))
    ap.add_argument("--name", default="calibrate")
    args = ap.parse_args(argv)
    grid = sorted((float(g) for g in args.grid.split(",") if g), reverse=True)
    t0 = time.time()
    out = {"bench": "calibrate", "batch": args.batch, "grid": grid, "gate": quality.GOAL,
           "prefill": args.prefill, "decode": args.decode, "models": {}}  # fmt: skip
    for name in args.models:
        path = Path(name) if "/" in name else SHIPPED_MODEL.parent / name
        model = MoEModel.from_pretrained(path)
        L = model.config.num_hidden_layers
        ids = quality.load_heldout_ids(path)
        wins = quality.make_batches(ids, args.batch, args.prefill + args.decode,
                                    args.max_windows or 10**9)  # fmt: skip
        half = len(wins) // 2
        if half < 1:
            raise SystemExit(f"{path.name}: held-out text too short for two splits at batch {args.batch}")
        cal = Split(model, wins[:half], args.prefill, args.warmup)
        ev = Split(model, wins[half : 2 * half], args.prefill, args.warmup)
        prose_ids = quality.load_heldout_ids(path, "prose")
        prose_wins = quality.make_batches(prose_ids, args.batch, args.prefill + args.decode, half)
        prose = Split(model, prose_wins, args.prefill, args.warmup) if prose_wins else None
        entry = {"windows": {"calibration": half, "evaluation": half,
                             "prose": len(prose_wins)}, "targets": {}}  # fmt: skip
        print(f"\n== {path.name}, batch {args.batch}: {half} calibration and {half} evaluation "
              f"windows ({cal.base.count} and {ev.base.count} decode tokens) ==", flush=True)
        for target in args.targets:
            key = key_of(target)
            found = calibrate(cal, target, L, grid, args.margin)
            uni = best_uniform(cal, target, grid)
            greedy = found["verify"][-1]
            if uni is not None and (uni[key] or 0) > (greedy[key] or 0):
                # a single budget for every layer is a per-layer assignment too: keep the better
                found["preset"] = ",".join(f"{ly}:{uni['budget']:g}" for ly in range(L))
                found["chosen"] = "best single budget (the greedy search found less)"
            else:
                found["chosen"] = "greedy per-layer search"
            default = (Setting("default", replace(DEFAULT, miss_budget=0.0)) if target == "experts"
                       else Setting("default", DEFAULT, fraction=2))  # fmt: skip
            rows = {"calibrated": setting(target, {int(ly): float(b) for ly, b in (
                        p.split(":") for p in found["preset"].split(",")) if float(b) < 1.0}),
                    "default": default}  # fmt: skip
            if uni is not None:
                rows["best single budget"] = setting(target, {}, uniform=uni["budget"])
            evals = {}
            for label, st in rows.items():
                evals[label] = {"evaluation": ev.measure(st),
                                "prose": prose.measure(st) if prose else None}
            entry["targets"][target] = {"preset": found["preset"], "search": found,
                                        "best_uniform_on_calibration": uni, "rows": evals}  # fmt: skip
            print(f"  {target}: preset --lynx-layer-budgets {found['preset']} ({found['chosen']})"
                  f"{' (with the cache: --lynx-miss-budget on)' if target == 'bytes' else ''}")
            for label, e in evals.items():
                for split, m in e.items():
                    if m is None:
                        continue
                    (pl, ph) = m["ci95"]["ppl_rel_increase"]
                    print(f"    {label:<19}{split:<11}{key} {m[key]:.3f}  Δppl "
                          f"{100 * m['ppl_rel_increase']:+.2f} % [{100 * pl:+.2f}, {100 * ph:+.2f}]"
                          f"  Δacc {m['accuracy_delta_points']:+.2f} pt: {m['verdict']}")  # fmt: skip
        entry["evaluations"] = cal.evaluations + ev.evaluations + (prose.evaluations if prose else 0)
        out["models"][path.name] = entry
    out["seconds"] = round(time.time() - t0, 1)
    path = Path(args.out_dir) / f"{args.name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps({"bench": "calibrate", "out": str(path), "seconds": out["seconds"],
                      "presets": {m: {t: v["preset"] for t, v in e["targets"].items()}
                                  for m, e in out["models"].items()}}))  # fmt: skip
    return out


if __name__ == "__main__":
    main()
