"""bench/compare_offload.py on a tiny slice of the shipped model: the proof's JSON says what it measured."""

from __future__ import annotations

import json

import pytest
import torch

from bench import compare_offload, quality
from lynx_sglang import SHIPPED_MODEL

pytestmark = pytest.mark.skipif(
    not (SHIPPED_MODEL / "model.safetensors").exists(), reason="the shipped model is not trained"
)
# Two batch sizes, one K, one eviction, a dozen decode steps: the whole pipeline in seconds.
SLICE = (
    "--batches 1,16 --k-fractions 0.25 --prefill 16 --decode 12 --warmup 2 --max-batches 1 "
    "--quality-windows 2 --quality-sequences 0 "
    "--evictions lru --prefetches cross-layer --budgets= --no-plot --name test "
    "--formats= --device-shapes= --frontier="
).split()


@pytest.fixture(scope="module")
def result(tmp_path_factory) -> tuple[dict, str]:
    """One CPU run of the slice: (its JSON, its stdout)."""
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        res = compare_offload.main(
            SLICE + ["--device", "cpu", "--out-dir", str(tmp_path_factory.mktemp("co"))]
        )
    return res, out.getvalue()


def rows_of(res: dict, system: str, batch: int) -> list[dict]:
    return [r for r in res["rows"] if r["system"] == system and r["batch"] == batch]


def test_last_stdout_line_is_compact_json_naming_the_full_results(result):
    res, stdout = result
    line = stdout.strip().splitlines()[-1]
    last = json.loads(line)
    assert len(line.encode()) <= 2048
    assert last["measured"] is False and last["rows"] == len(res["rows"])
    assert set(last["product"]) == set(res["speedup_lynx_offload_vs_offload"])
    full = json.loads(open(last["out"]).read())
    for key in ("measured", "device", "rows", "speedup_lynx_offload_vs_offload", "hardware",
                "by_shape"):  # fmt: skip
        assert key in full
    assert full["rows"] == json.loads(json.dumps(res["rows"]))


def test_quality_carries_intervals_and_the_gate_is_read_on_the_bound(result):
    """Rows whose selection reads the cache are measured on the replayed windows (1 here), the
    others on the larger quality sample (2 windows)."""
    res, _ = result
    sel = [r for r in res["rows"] if r["status"] == "ok" and r["ci95"]]
    assert sel
    for r in sel:
        reads_cache = "resident masks" in r["quality_source"]
        assert r["quality_sequences"] == r["batch"] * (1 if reads_cache else 2)
    for r in sel:
        (lo, hi) = r["ci95"]["ppl_rel_increase"]
        assert lo <= r["ppl_rel_increase"] + 1e-9 and r["ppl_rel_increase"] <= hi + 1e-9
        assert r["quality_verdict"] == quality.gate_verdict(r["ci95"])
        assert compare_offload.meets_goal(r) == (r["quality_verdict"] == "met")
    for B, p in res["product"].items():
        if p["meets_quality_goal"]:  # the fastest lynx+offload row inside the gate on its bound
            assert p["system"].startswith("lynx+offload")
            assert p["quality_verdict"] in ("met", "exact")
        else:  # none inside: the product is offloading alone, never an out-of-gate row
            assert p["system"].startswith("offload") and p["quality_verdict"] == "exact"
            assert res["speedup_lynx_offload_vs_offload"][B] == 1.0


def _frontier_of(tmp_path, name, change=None):
    """The shipped frontier's tiny-model run at batch 16, optionally changed, as a file."""
    full = json.loads((quality.RESULTS / "frontier.json").read_text())
    run = next(r for r in full["runs"] if (r["model"], r["text"], r["batch"]) == ("lynx-moe-tiny", "code", 16))
    if change:
        change(run)
    path = tmp_path / name
    path.write_text(json.dumps({"runs": [run]}))
    return path, run


def test_a_plain_selection_row_takes_the_frontiers_point_for_the_same_weights(tmp_path):
    """Where the frontier measured the same setting on the same weights, text and batch within
    ±0.2 % Δppl, compare_offload's plain selection row carries that measurement, and only then."""
    path, run = _frontier_of(tmp_path, "frontier.json")
    params = compare_offload.replace(quality.DEFAULT, miss_budget=0.0)
    found = quality.frontier_point(path, SHIPPED_MODEL, "code", 16, params, compare_offload.REUSE_HALF_WIDTH)
    assert found is not None and found[1]["line"] == "lynx" and found[1]["budget"] == params.budget
    assert quality.frontier_point(path, SHIPPED_MODEL, "code", 32, params, 0.002) is None  # batch
    assert quality.frontier_point(path, SHIPPED_MODEL, "prose", 16, params, 0.002) is None  # text
    other = compare_offload.replace(params, budget=0.55)  # a budget the frontier did not run
    assert quality.frontier_point(path, SHIPPED_MODEL, "code", 16, other, 0.002) is None
    assert quality.frontier_point(path, SHIPPED_MODEL, "code", 16, params, 1e-5) is None  # too wide

    def retrained(r):
        r["model_digest"] = "0" * 16

    moved, _ = _frontier_of(tmp_path, "retrained.json", retrained)
    assert quality.frontier_point(moved, SHIPPED_MODEL, "code", 16, params, 0.002) is None

    slice16 = [a if a != "1,16" else "16" for a in SLICE if a != "--frontier="]
    res = compare_offload.main(slice16 + ["--device", "cpu", "--out-dir", str(tmp_path),
                                          "--frontier", str(path)])  # fmt: skip
    (lynx,) = rows_of(res, "lynx", 16)
    pt = found[1]
    assert "frontier.json" in lynx["quality_source"]
    assert lynx["ppl_rel_increase"] == pt["ppl_rel_increase"] and lynx["ci95"] == pt["ci95"]
    assert lynx["quality_sequences"] == run["sequences"] == 64
    res = compare_offload.main(slice16 + ["--device", "cpu", "--out-dir", str(tmp_path),
                                          "--frontier", str(moved)])  # fmt: skip
    (lynx,) = rows_of(res, "lynx", 16)
    assert lynx["quality_source"] == "bench/quality.py at this batch" and lynx["quality_sequences"] == 32


def test_every_row_has_the_fields_and_cpu_times_are_projected(result):
    res, _ = result
    assert res["measured"] is False and res["time_source"] == "projected"
    assert res["hardware"]["pcie_h2d_gbps"] == 50.0 and res["hardware"]["hbm_tbps"] == 3.0
    fields = (
        "distinct_per_layer_step",
        "hit_rate",
        "h2d_bytes_per_token",
        "decode_ms_per_step",
        "tokens_per_s",
        "expert_gpu_bytes",
        "ppl_rel_increase",
        "agreement",
    )
    systems = set()
    for r in res["rows"]:
        systems.add(r["system"])
        assert all(f in r for f in fields)
        if r["status"] == "ok":
            assert r["time_source"] == "projected"
            assert 0.0 <= r["hit_rate"] <= 1.0
            assert r["tokens_per_s"] > 0 and r["decode_ms_per_step"] > 0
    assert {
        "resident",
        "lynx",
        "offload (ours)",
        "lynx+offload",
        "lynx+offload +aware",
        "lynx+offload +miss",
        "lynx+offload +aware +prefetch",
    } <= systems
    # miss-aware rows: quality measured with the resident masks the replay's selection saw
    miss = [r for r in res["rows"] if r["system"] == "lynx+offload +miss" and r["status"] == "ok"]
    assert miss and all("resident masks" in r["quality_source"] for r in miss)


def test_accelerate_offload_is_placed_by_its_own_code_with_exact_counters(result):
    """accelerate's infer_auto_device_map places whole layers (on meta tensors here); an offloaded
    layer copies every expert at every step, a resident one none."""
    res, _ = result
    rows = [r for r in res["rows"] if r["system"] == compare_offload.ACCEL_PEER]
    assert rows
    E, L = res["num_experts"], 4
    for r in rows:
        assert r["status"] == "ok" and r["time_source"] == "projected"
        on_gpu = int(r["prefetch"].split()[1].split("/")[0])  # "device_map: G/L on GPU"
        assert 0 <= on_gpu < L  # K < E: not every layer fits
        assert r["misses_per_layer_step"] == pytest.approx(E * (L - on_gpu) / L)
        (ours,) = [o for o in rows_of(res, "offload (ours)", r["batch"]) if o["slots"] == r["slots"]]
        assert r["h2d_bytes_per_token"] > ours["h2d_bytes_per_token"]


def test_sglang_paged_experts_row_is_exact_and_min_bounds_every_eviction(result):
    """SGLang's own residency code replays the same routing (exact counters, its capture cap
    decides graph or eager), and Belady's MIN loads no more than any eviction policy."""
    res, _ = result
    for B in (1, 16):
        (peer,) = rows_of(res, compare_offload.SGLANG_PEER, B)
        (ours,) = rows_of(res, "offload (ours)", B)
        (bound,) = rows_of(res, compare_offload.MIN_BOUND, B)
        (bound_lynx,) = rows_of(res, compare_offload.MIN_LYNX, B)
        (lynx,) = rows_of(res, "lynx+offload", B)
        assert (
            peer["status"] == "ok"
            and peer["distinct_per_layer_step"] == ours["distinct_per_layer_step"]
        )
        assert bound["misses_per_layer_step"] <= min(
            peer["misses_per_layer_step"], ours["misses_per_layer_step"]
        )
        assert bound_lynx["misses_per_layer_step"] <= lynx["misses_per_layer_step"]
        cap = 16 // 8  # K = 16 of 64 slots, top-8: SGLang captures decode up to K // top_k
        assert peer["server_path"] == ("CUDA graph" if B <= cap else "eager (B > 2)")
        assert (peer["host_us_per_layer_step"] == 0) == (B <= cap)


def test_each_row_takes_the_servers_path_and_pays_its_host_time(result):
    """The hybrid cache: decode batches up to the capture cap run in a CUDA graph (no host
    planning); larger ones host-planned, their measured planning charged. K = 16 of 64, top-8:
    the cap is 2 tokens without selection, 16 with it (the kept set capped at K)."""
    res, _ = result
    for r in res["rows"]:
        if r["status"] != "ok":
            continue
        if r["system"].startswith(("offload (ours)", "lynx+offload")):
            cap = 16 if r["selection"] and "no cap" not in r["system"] else 2
            if r["batch"] <= cap:
                assert r["server_path"] == "CUDA graph" and r["host_us_per_layer_step"] == 0
            else:
                assert r["server_path"] == f"eager (B > {cap})"
                assert r["host_us_per_layer_step"] > 0
        if r["system"] in ("resident", "lynx") or r["system"].startswith("bound"):
            assert r["host_us_per_layer_step"] == 0


def test_resident_moves_no_bytes(result):
    res, _ = result
    for r in res["rows"]:
        if r["system"] in ("resident", "lynx"):
            assert r["h2d_bytes_per_token"] == 0.0 and r["hit_rate"] == 1.0


def test_selection_cuts_host_to_gpu_bytes_at_batch_16(result):
    res, _ = result
    (lynx,) = rows_of(res, "lynx+offload", 16)  # prefetch off
    (off,) = rows_of(res, "offload (ours)", 16)
    same = [s for s in off["swept"] if s["eviction"] == lynx["eviction"] and s["prefetch"] == "off"]
    assert lynx["slots"] == off["slots"]
    assert lynx["distinct_per_layer_step"] < off["distinct_per_layer_step"]
    assert lynx["h2d_bytes_per_token"] <= same[0]["h2d_bytes_per_token"]


def test_speedups_keyed_by_batch(result):
    res, _ = result
    assert set(res["speedup_lynx_offload_vs_offload"]) == {"1", "16"}
    assert all(v > 0 for v in res["speedup_lynx_offload_vs_offload"].values())
    for each in res["speedup_vs_each"].values():
        assert each[compare_offload.SGLANG_PEER] > 0 and each[compare_offload.ACCEL_PEER] > 0
    for entry in res["by_shape"].values():
        assert set(entry["speedup"]) == {"1", "16"}


def test_by_shape_projects_every_shape_with_its_shared_experts(result):
    """Every --shape, at its expert size and depth; the routing stays the shipped model's."""
    res, _ = result
    assert set(res["by_shape"]) == {"shipped", *compare_offload.SHAPES}
    for name, sh in compare_offload.SHAPES.items():
        entry = res["by_shape"][name]
        assert entry["expert_bytes"] == sh.expert_bytes and entry["layers"] == sh.layers
        assert entry["shared_bytes"] == sh.shared_bytes
        assert entry["routing"].startswith(f"the shipped model's (E={res['num_experts']}")
    assert res["by_shape"]["shipped"]["shared_bytes"] == 0
    assert res["by_shape"]["deepseek-v3"]["shared_bytes"] > 0


@pytest.mark.gpu
def test_gpu_times_are_measured(tmp_path):
    res = compare_offload.main(
        SLICE
        + ["--device", "cuda", "--shape", "shipped", "--repeats", "1", "--out-dir", str(tmp_path)]
    )
    assert res["measured"] is True and torch.cuda.is_available()
    assert all(r["time_source"] == "measured" for r in res["rows"] if r["status"] == "ok")


# The memory-budget section: one batch, two formats, one device shape.
FORMATS_SLICE = (
    "--batches 16 --k-fractions 0.25 --prefill 16 --decode 12 --warmup 2 --max-batches 1 "
    "--quality-windows 2 --quality-sequences 0 --evictions lru --prefetches= --budgets= "
    "--no-plot --name formats "
    "--formats bf16,int4 --expert-memory 0.25 --device-shapes deepseek-v3-fp8"
).split()


@pytest.fixture(scope="module")
def formats_result(tmp_path_factory) -> dict:
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        return compare_offload.main(
            FORMATS_SLICE + ["--device", "cpu", "--out-dir", str(tmp_path_factory.mktemp("cf"))]
        )


def test_a_smaller_format_buys_more_slots_and_moves_its_own_bytes(formats_result):
    from bench.projection import SHAPES
    from lynx_sglang.offload.quantize import bytes_per_expert

    fm = formats_result["formats"]
    sh = SHAPES["qwen3-30b-a3b"]
    E = formats_result["num_experts"]
    b16, b4 = (bytes_per_expert(f, sh.hidden, sh.inter) for f in ("bf16", "int4"))
    at = fm["budgets"]["0.25 x bf16 experts"]
    assert at["K"] == {"bf16": E // 4, "int4": min(E, int(0.25 * E * b16 / b4))}
    rows = [r for r in fm["rows"] if r["memory"] == "0.25 x bf16 experts" and r["status"] == "ok"]
    for r in rows:
        eb = bytes_per_expert(r["format"], sh.hidden, sh.inter)
        assert r["slots"] == at["K"][r["format"]]
        assert r["expert_gpu_bytes"] == r["slots"] * eb * sh.layers  # the format's real bytes
        moved = r["h2d_bytes_per_token"] / eb  # expert copies per token, any format
        assert moved >= 0 and r["time_source"] == "projected"
    ours = {r["format"]: r for r in rows if r["system"] == compare_offload.OURS}
    assert ours["int4"]["hit_rate"] > ours["bf16"]["hit_rate"]  # more slots, more hits
    assert {r["system"] for r in rows} >= {compare_offload.OURS, compare_offload.PRODUCT,
                                           "lynx+offload +miss"}  # fmt: skip


def test_format_rows_carry_both_qualities_and_the_headline_keeps_the_format(formats_result):
    fm = formats_result["formats"]
    for r in fm["rows"]:
        if r["status"] != "ok":
            continue
        sent = r["sent_from_bf16"]
        if r["system"] == compare_offload.OURS:  # the cache is lossless in its own format
            assert r["quality_verdict"] == "exact"
            assert (sent["quality_verdict"] == "exact") == (r["format"] == "bf16")
        if r["format"] != "bf16":  # a format change is gated on quality like a selection
            assert sent["ci95"] is not None
    at = fm["budgets"]["0.25 x bf16 experts"]["by_batch"]["16"]
    for f, v in at["formats"].items():  # the speedup over offloading alone at the same format
        rows = [r for r in fm["rows"] if r["format"] == f and r["memory"].startswith("0.25")
                and r["system"].startswith("offload")]  # fmt: skip
        assert v["speedup_same_format"] == round(v["product"] / max(r["tokens_per_s"] for r in rows), 3)
    view = at["bf16_checkpoint"]
    picked = next(r for r in fm["rows"] if r["system"] == view["system"] and r["format"] == view["format"]
                  and r["memory"].startswith("0.25"))  # fmt: skip
    assert picked["sent_from_bf16"]["quality_verdict"] in ("exact", "met")


def test_a_budget_too_small_for_top_k_is_refused_not_projected(formats_result):
    rows = [r for r in formats_result["formats"]["rows"] if r["memory"] == "one H200 at deepseek-v3-fp8"]
    bf16 = [r for r in rows if r["format"] == "bf16"]
    assert bf16 and all(r["status"].startswith("does not fit") for r in bf16)  # 0.076 x 64 < top-8
    assert any(r["format"] == "int4" and r["status"] == "ok" for r in rows)


def test_last_line_with_formats_stays_compact(formats_result, capsys):
    line = json.dumps(compare_offload.compact(formats_result, compare_offload.Path("x.json")))
    assert len(line) <= 2048 and '"same_format"' in line
