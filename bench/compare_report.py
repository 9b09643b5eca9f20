"""The readable side of bench/compare_offload.py: the stdout table and the two plots."""

from __future__ import annotations

from pathlib import Path

from bench.figures import save_png
from bench.projection import Hardware

PATHS = {"CUDA graph": "G", "bound": "-"}  # any other path: "E" (eager)


def print_rows(rows: list[dict]) -> None:
    """One line per row, at most 100 characters; every field is in the JSON."""
    cols = (f"{'system':<29}{'B':>4}{'K':>4} {'evict':<7}{'dist':>6}{'hit%':>6}{'MB/tok':>8}"
            f"{'host µs':>8} {'p'}{'ms/step':>9}{'tok/s':>8}{'Δppl':>8}")  # fmt: skip
    print(cols)
    print("-" * len(cols))
    for r in rows:
        name = r["system"][:29]
        if r["status"] != "ok":
            print(f"{name:<29}{r['batch']:>4}{r['slots']:>4}  {r['status'][:58]}")
            continue
        print(f"{name:<29}{r['batch']:>4}{r['slots']:>4} {r['eviction'][:7]:<7}"
              f"{r['distinct_per_layer_step']:>6.1f}{100 * r['hit_rate']:>6.1f}"
              f"{r['h2d_bytes_per_token'] / 1e6:>8.1f}{r['host_us_per_layer_step']:>8.0f} "
              f"{PATHS.get(r['server_path'], 'E')}{r['decode_ms_per_step']:>9.2f}"
              f"{r['tokens_per_s']:>8.0f}{r['ppl_rel_increase']:>+8.4f}")  # fmt: skip
    print("p: the server's path for these decode steps: G captured CUDA graph (no host planning), "
          "E eager\n   (host planning charged per layer-step, measured here), - offline bound")


def quality_text(row: dict) -> str:
    """Δppl and Δacc with their 95 % intervals and the gate's verdict on the bounds."""
    ci = row.get("ci95")
    if not ci:
        return f"Δppl {row['ppl_rel_increase']:+.4f}, Δacc {row['accuracy_delta_points']:+.2f} pt (exact)"
    (pl, ph), (al, ah) = ci["ppl_rel_increase"], ci["accuracy_delta_points"]
    return (f"Δppl {100 * row['ppl_rel_increase']:+.2f} % [{100 * pl:+.2f}, {100 * ph:+.2f}], "
            f"Δacc {row['accuracy_delta_points']:+.2f} pt [{al:+.2f}, {ah:+.2f}]: "
            f"{row['quality_verdict']}")  # fmt: skip


def print_report(result: dict) -> None:
    """The rows, the speedups of the product and the goal; times labelled as what they are."""
    label = "measured" if result["measured"] else "PROJECTED"
    hw = "" if result["measured"] else f" ({Hardware(**_hw(result)).describe()})"
    print(f"\nrows at {result['shape']} expert size ({result['expert_bytes'] / 1e6:.2f} MB); "
          f"counters exact; times {label}\n{hw.strip(' ()')}")  # fmt: skip
    print_rows(result["rows"])
    kf = result["primary_k_fraction"]
    print(f"\nthe product (fastest lynx+offload row meeting the quality goal on its 95 % bound)\nover the best "
          f"offloading-alone row (ours or SGLang's), K={kf:g}·E ({label}):")  # fmt: skip
    for B, s in result["speedup_lynx_offload_vs_offload"].items():
        p, fast = result["product"][B], result["speedup_ignoring_quality"][B]
        miss = "" if p["meets_quality_goal"] else " (no lynx+offload row met the gate on its bound)"
        print(f"  batch {B:>3}: {s:5.2f}x  {p['system']} ({p['eviction']}/{p['prefetch']}), "
              f"{quality_text(p)}{miss}")
        print(f"             fastest regardless of quality {fast['speedup']:.2f}x "
              f"({fast['system']}, agreement {fast['agreement']:.4f})")  # fmt: skip
    print("\nthe same, by K (* = no Lynx setting met the quality goal there: offloading alone;\n"
          "the other --budgets run at the primary K only):")  # fmt: skip
    for f, at in result["speedup_by_k"].items():
        cells = "".join(f"  B={B} {s['speedup']:.2f}{'' if s['meets_quality_goal'] else '*'}"
                        for B, s in at.items())  # fmt: skip
        print(f"  K={float(f):g}·E:{cells}")
    if result["by_shape"]:
        bs = list(result["speedup_lynx_offload_vs_offload"])
        print(f"\nthe same counters projected at other expert sizes (product over offload (ours),\n"
              f"K={kf:g}·E):")  # fmt: skip
        print(
            f"  {'shape':<19}{'MB/expert':>10}{'layers':>7}" + "".join(f"{'B=' + b:>8}" for b in bs)
        )
        for name, e in result["by_shape"].items():
            sp = "".join(f"{e['speedup'][b]:>8.2f}" for b in bs)
            print(f"  {name:<19}{e['expert_bytes'] / 1e6:>10.2f}{e['layers']:>7}{sp}")
    print_formats(result.get("formats"))
    g = result["goal"]
    print(f"\ngoal: >= {g['speedup']}x at batch {g['batches']} within the quality goal, "
          f"{g['on']}: {'met' if g['met'] else 'NOT met'}")
    print(f"quality goal {g['quality']}; {result['seconds']} s")  # fmt: skip


def print_formats(fm: dict | None) -> None:
    """The memory-budget section: per budget, batch and format, K and tokens/s of offloading
    alone (ours, SGLang) and of the product, its speedup at the same format (* = no lynx+offload
    row met the gate there), then the bf16 checkpoint's fastest row inside the gate."""
    if not fm or not fm.get("budgets"):
        return
    print("\nexpert formats at a fixed GPU budget for experts (K from the format's bytes; "
          "same-format speedups):")  # fmt: skip
    for label, e in fm["budgets"].items():
        print(f"  {label} (projected at {e['shape']}): K " +
              ", ".join(f"{f} {k}" for f, k in e["K"].items()))  # fmt: skip
        for B, at in e["by_batch"].items():
            cells = "  ".join(
                f"{f} {v['offload_ours']:.0f}/{v['sglang'] or 0:.0f}->{v['product']:.0f} "
                f"{v['speedup_same_format']:.2f}x{'' if v['meets_quality_goal'] else '*'}"
                for f, v in at["formats"].items())  # fmt: skip
            print(f"    B={B:<3} ours/sglang->product tok/s: {cells}")
            v = at["bf16_checkpoint"]
            if v:
                vs = (f", {v['speedup_vs_sglang_best']:.2f}x SGLang at {v['sglang_best_format']}"
                      if "speedup_vs_sglang_best" in v else "")  # fmt: skip
                print(f"          bf16 checkpoint: {v['system']} as {v['format']} "
                      f"({v['sent_from_bf16']['quality_verdict']} vs bf16) {v['tokens_per_s']:.0f} tok/s{vs}")


def _hw(result: dict) -> dict:
    return {k: v for k, v in result["hardware"].items() if k != "model"}


def plot(result: dict, path: Path, goal: dict) -> list[str]:
    """tokens/s vs batch (one line per system, primary K) and distinct experts vs quality."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    label = "measured" if result["measured"] else "projected"
    kf = result["primary_k_fraction"]
    ok = [r for r in result["rows"] if r["status"] == "ok"]
    rows = [r for r in ok if r["k_fraction"] in (kf, 1.0) and " b=" not in r["system"]]
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for system in dict.fromkeys(r["system"] for r in rows):
        pts = sorted((r["batch"], r["tokens_per_s"]) for r in rows if r["system"] == system)
        ls = "--" if system in ("resident", "lynx") else "-"
        ax.plot(*zip(*pts), marker="o", ls=ls, label=system)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("decode batch size")
    ax.set_ylabel(f"tokens/s ({label})")
    ax.set_title(f"{result['shape']} experts, K={kf:g}·E slots per layer ({label})", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out = [str(path.with_suffix(".png"))]
    save_png(fig, out[0], dpi=120)
    plt.close(fig)

    # distinct experts vs quality, per batch: the base model and every selection row
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    qrows = [r for r in ok if r["selection"] or r["system"] == "resident"]
    for ax, key in zip(axes, ("ppl_rel_increase", "accuracy_delta_points")):
        for i, B in enumerate(dict.fromkeys(r["batch"] for r in qrows)):
            at = [r for r in qrows if r["batch"] == B]
            base = [(r["distinct_per_layer_step"], r[key]) for r in at if not r["selection"]]
            sel = [(r["distinct_per_layer_step"], r[key]) for r in at if r["selection"]]
            ax.scatter(*zip(*base), marker="s", color=f"C{i}", s=30, label=f"B={B}")
            if sel:
                ax.scatter(*zip(*sel), marker="o", color=f"C{i}", s=14, alpha=0.7)
        ax.axhline(goal[key], color="r", lw=0.8, ls=":")
        ax.set_xlabel("distinct experts per layer per step")
        ax.set_ylabel(f"{key} (goal dotted)")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.suptitle("distinct experts vs quality: squares = base model, dots = Lynx settings "
                 "(every budget, cache-aware or not)", fontsize=9)  # fmt: skip
    fig.tight_layout()
    out.append(str(path.with_name(path.stem + "_quality.png")))
    save_png(fig, out[1], dpi=120)
    plt.close(fig)
    return out
