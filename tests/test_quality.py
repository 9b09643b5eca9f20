"""The quality harness on a small slice of the shipped model's held-out text."""

from dataclasses import replace

import pytest
import torch

from bench import quality
from lynx_sglang import SHIPPED_MODEL
from lynx_sglang.model.qwen3_moe import MoEModel
from lynx_sglang.selection.policy import SelectionParams, select_experts_ref

pytestmark = pytest.mark.skipif(
    not (SHIPPED_MODEL / "model.safetensors").exists(), reason="shipped model not trained yet"
)


@pytest.fixture(scope="module")
def setup():
    model = MoEModel.from_pretrained(SHIPPED_MODEL)
    ids = quality.load_heldout_ids(SHIPPED_MODEL)
    return model, quality.make_batches(ids, 8, 48, 1)


def test_full_budget_is_exactly_the_base_model(setup):
    model, batches = setup
    base, rows, _, _ = quality.evaluate(model, batches, 16, [SelectionParams(budget=1.0)])
    assert rows[0].nll_sum == base.nll_sum
    assert rows[0].agree == rows[0].count
    assert rows[0].distinct == base.distinct
    assert rows[0].correct == base.correct and abs(rows[0].kl) < 1e-3  # bf16-stored base


def test_accuracy_is_against_the_true_next_token_and_kl_against_the_base(setup):
    """Top-1 accuracy counts argmax == the next token of the text; the KL of a setting from the
    unmodified model grows when selection removes more experts; the bf16 floor row is there."""
    model, batches = setup
    base, rows, _, _ = quality.evaluate(
        model, batches, 16, [SelectionParams(budget=0.8), SelectionParams(budget=0.3)], floor=True
    )
    x = batches[0]
    with torch.no_grad():
        logits = model(x).logits[:, 16:-1]
    truth = int((logits.argmax(-1) == x[:, 17:]).sum())
    assert 0 < base.correct and (len(batches) > 1 or base.correct == truth)
    assert 0.0 < base.accuracy < 1.0
    floor, mild, strong = rows
    assert floor.name.startswith("base in bf16") and floor.kl < mild.kl < strong.kl


def test_smaller_budget_touches_fewer_experts_at_some_quality_cost(setup):
    model, batches = setup
    every_layer = [SelectionParams(budget=b, layer_budgets="") for b in (0.8, 0.4)]
    base, rows, _, _ = quality.evaluate(model, batches, 16, every_layer)
    assert base.distinct > rows[0].distinct > rows[1].distinct
    assert rows[1].ppl >= base.ppl * 0.99  # removing experts does not make the model better
    assert rows[1].agree < rows[1].count


def test_hook_groups_decode_positions_and_leaves_prefill_alone(setup):
    model, batches = setup
    x = batches[0]
    params = replace(quality.DEFAULT, budget=0.4, layer_budgets="0:1.0")
    hook = quality.DecodePolicyHook(params, prefill=16, num_experts=64)
    logits = torch.randn(x.shape[0], x.shape[1], 64)
    ids, w = torch.softmax(logits, -1).topk(8, -1)[::-1]
    layer0, _ = hook(0, logits, ids, w / w.sum(-1, keepdim=True))
    assert torch.equal(layer0, ids)  # the first MoE layer's own budget keeps every expert
    new_ids, new_w = hook(1, logits, ids, w / w.sum(-1, keepdim=True))
    assert torch.equal(new_ids[:, :16], ids[:, :16])  # prefill untouched
    # position 20 of every sequence is one decode batch: the policy applied to exactly that batch
    ref = select_experts_ref(logits[:, 20], ids[:, 20], (w / w.sum(-1, keepdim=True))[:, 20],
                             hook.params)
    assert torch.equal(new_ids[:, 20], ref.topk_ids)


def test_main_quick_writes_the_frontier(capsys, tmp_path):
    out = quality.main(["--quick", "--budgets", "0.6", "--out-dir", str(tmp_path), "--no-plot"])
    for key in ("batch", "setting", "expert_reduction", "ppl_rel_increase", "accuracy_delta_points",
                "kl", "agreement", "agreement_bf16_floor", "runs", "goal"):  # fmt: skip
        assert key in out
    (run,) = out["runs"]
    assert run["model_digest"] == quality.model_digest(SHIPPED_MODEL)  # which weights it measured
    lines = {p["line"] for p in run["points"]}
    assert lines == {"lynx", "drop", "lynx+miss@2", "default"}
    for p in run["points"]:
        assert p["meets_quality"] == quality.meets_quality(p)
        e2 = p["bytes_reduction_e2"]
        assert e2 is not None and 0.0 < e2 < 1.0  # every point is measured at K = E/2
        assert (p["bytes_reduction_e4"] is None) == (p["line"] == "lynx+miss@2")
    assert set(run["goals"]) == {"expert_reduction", "bytes_reduction_e2"}
    assert (tmp_path / "frontier_quick.json").exists()
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("{") and '"expert_reduction"' in last


def test_frontier_lines_parse_into_settings():
    st = quality.parse_line("drop+l0+miss@4", 0.5)
    assert (st.params.policy, st.params.budget, st.params.layer_budgets) == ("drop", 0.5, "0:1.0")
    assert st.params.miss_budget == 0.5 and st.fraction == 4 and st.name == "drop+l0+miss@4 b=0.5"
    assert quality.parse_line("similar+t=0.2", 0.8).params.similar_threshold == 0.2
    with pytest.raises(ValueError, match="options are"):
        quality.parse_line("lynx+l1", 0.5)


def test_bytes_are_exact_at_full_budget_and_fall_with_selection(setup):
    """Budget 1 changes nothing, so its replayed and its live (miss-aware) caches copy exactly
    what the base run's cache copies; a smaller budget copies less."""
    model, batches = setup
    settings = [quality.parse_line(line, b) for line in ("lynx", "lynx+miss@2") for b in (1.0, 0.4)]
    base, rows, _, _ = quality.evaluate(model, batches, 16, settings, fractions=(2,), warmup=4)
    K = model.config.num_experts // 2
    assert base.misses[K] > 0
    full, low, full_live, low_live = rows
    assert full.misses[K] == full_live.misses[K] == base.misses[K]
    assert low.misses[K] < base.misses[K] and low_live.misses[K] < base.misses[K]
    # miss-aware keeps what is resident: fewer distinct experts removed than plain Lynx
    assert low_live.distinct > low.distinct


def test_out_of_domain_prose_is_shipped_and_not_in_the_training_split():
    """The prose is CPython's idlelib notes (*.txt); training reads only *.py files."""
    from lynx_sglang.model.corpus import split_corpus

    prose = quality.PROSE.read_text()
    assert len(prose) > 50_000
    train, held = split_corpus()
    windows = [prose[i : i + 200] for i in range(0, len(prose) - 200, len(prose) // 25)]
    assert not any(w in train or w in held for w in windows)
    ids = quality.load_heldout_ids(SHIPPED_MODEL, "prose")
    assert ids.numel() > 10_000


def test_the_readme_domain_is_split_by_package_and_holds_none_of_the_prose():
    """The second training domain (bench.train_model --docs-fraction): the installed packages'
    read-mes, each whole in one split, and none of the out-of-domain prose among them."""
    from lynx_sglang.model.corpus import split_readmes

    train, held = split_readmes()
    assert len(train) > 500_000 and held and held not in train
    prose = quality.PROSE.read_text()
    windows = [prose[i : i + 200] for i in range(0, len(prose) - 200, len(prose) // 25)]
    assert not any(w in train or w in held for w in windows)


def test_per_sequence_rows_are_each_sequences_own_nll_and_hits(setup):
    """One row per sequence, in batch order: its summed NLL and top-1 hits against the true next
    token, computed here from the model's logits without the harness."""
    model, batches = setup
    base, _, _, _ = quality.evaluate(model, batches, 16, [])
    x = batches[0]
    with torch.no_grad():
        logits = model(x).logits[:, 16:-1].float()  # predicts x[:, 17:]
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), x[:, 17:], reduction="none")
    rows = base.per_seq[: len(x)]
    assert len(base.per_seq) == sum(len(b) for b in batches)
    torch.testing.assert_close(torch.from_numpy(rows[:, 0]), nll.double().sum(1), rtol=1e-5, atol=1e-4)
    assert (rows[:, 1] == (logits.argmax(-1) == x[:, 17:]).sum(1).numpy()).all()
    assert (rows[:, 3] == x.shape[1] - 17).all() and (rows[:, 2] == 0).all()  # the base: no KL
    assert base.count == sum(b.shape[0] * (b.shape[1] - 17) for b in batches)


def test_paired_intervals_hold_the_estimate_and_vanish_for_an_identical_setting(setup):
    model, batches = setup
    base, (same, cut), _, _ = quality.evaluate(
        model, batches, 16, [SelectionParams(budget=1.0), SelectionParams(budget=0.4)]
    )
    zero = quality.paired_intervals(same, base)
    assert zero["ppl_rel_increase"] == [0.0, 0.0] and zero["accuracy_delta_points"] == [0.0, 0.0]
    ci = quality.paired_intervals(cut, base)
    lo, hi = ci["ppl_rel_increase"]
    assert lo < cut.ppl / base.ppl - 1 < hi
    lo, hi = ci["accuracy_delta_points"]
    assert lo <= 100 * (cut.accuracy - base.accuracy) <= hi
    assert ci == quality.paired_intervals(cut, base)  # seeded: the same run, the same interval
    with pytest.raises(ValueError, match="not paired"):
        quality.paired_intervals(replace(cut, per_seq=cut.per_seq[:-1]), base)


@pytest.mark.parametrize(
    "ppl, acc, verdict",
    [
        ((0.001, 0.004), (-0.2, 0.3), "met"),
        ((-0.002, 0.005), (-0.5, 0.1), "met"),  # bounds on the gate count as inside
        ((0.001, 0.007), (-0.2, 0.3), "unresolved"),  # the estimate may be inside: not met
        ((0.001, 0.004), (-0.8, 0.3), "unresolved"),
        ((0.006, 0.012), (-0.2, 0.3), "failed"),
        ((0.001, 0.004), (-1.2, -0.6), "failed"),
    ],
)
def test_the_gate_is_read_on_the_bound(ppl, acc, verdict):
    ci = {"ppl_rel_increase": list(ppl), "accuracy_delta_points": list(acc), "kl": [0, 0]}
    assert quality.gate_verdict(ci) == verdict
    assert quality.meets_quality({"ci95": ci}) == (verdict == "met")


def test_format_rows_quantise_every_expert_and_nothing_else(setup):
    """A format row is the model with each expert weight quantised RTN then dequantised; the
    router and the rest are the model's own; bf16 < fp8 < int4 < int2 in KL from the model."""
    from lynx_sglang.offload.quantize import fake_quantize

    model, batches = setup
    q = quality.quantized_model(model, "int4")
    g0, w13, w2 = model.expert_weights(1)
    qg, qw13, qw2 = q.expert_weights(1)
    assert torch.equal(qg, g0) and torch.equal(qw13, fake_quantize(w13, "int4"))
    assert torch.equal(qw2, fake_quantize(w2, "int4")) and not torch.equal(qw2, w2)
    assert torch.equal(model.expert_weights(1)[2], w2)  # the model itself is untouched
    settings = [st for f in ("bf16", "fp8", "int4", "int2") for st in quality.parse_format(f, [0.8])]
    base, rows, _, _ = quality.evaluate(model, batches, 16, settings)
    assert [r.name for r in rows] == ["bf16 experts", "fp8 experts", "int4 experts", "int2 experts"]
    kl = [r.kl for r in rows]
    assert kl == sorted(kl) and kl[-1] > 10 * kl[0]
    assert all(r.fmt and r.budget == 1.0 for r in rows)


def test_formats_parse_alone_and_under_a_line():
    (alone,) = quality.parse_format("int4", [0.8, 0.6])
    assert (alone.params, alone.fmt, alone.name) == (None, "int4", "int4 experts")
    (d,) = quality.parse_format("fp8+default", [0.8, 0.6])
    assert d.params == quality.DEFAULT and d.fmt == "fp8"
    lines = quality.parse_format("int3+lynx+l0", [0.8, 0.6])
    assert [st.params.budget for st in lines] == [0.8, 0.6] and lines[0].params.layer_budgets == "0:1.0"
    with pytest.raises(ValueError, match="one of bf16"):
        quality.parse_format("nf4", [0.8])


def test_main_writes_format_points_beside_the_floor_with_their_bf16_intervals(tmp_path):
    out = quality.main(["--quick", "--lines", "--formats", "bf16,int4", "--out-dir", str(tmp_path),
                        "--no-plot", "--name", "f"])  # fmt: skip
    (run,) = out["runs"]
    pts = {p["setting"]: p for p in run["points"]}
    assert set(pts) == {"default b=0.9", "bf16 experts", "int4 experts"}
    assert pts["int4 experts"]["format"] == "int4" and "vs_bf16" in pts["int4 experts"]
    assert pts["int4 experts"]["vs_bf16"]["verdict"] in ("met", "unresolved", "failed")
    assert "vs_bf16" not in pts["bf16 experts"] and pts["default b=0.9"]["format"] == ""
    assert run["goals"]["expert_reduction"]["best_within_quality"] in (None,) or \
        run["goals"]["expert_reduction"]["best_within_quality"]["setting"] == "default b=0.9"  # fmt: skip
