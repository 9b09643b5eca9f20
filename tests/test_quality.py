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
    base, rows, _, _ = quality.evaluate(
        model, batches, 16, [SelectionParams(budget=0.8), SelectionParams(budget=0.4)]
    )
    assert base.distinct > rows[0].distinct > rows[1].distinct
    assert rows[1].ppl >= base.ppl * 0.99  # removing experts does not make the model better
    assert rows[1].agree < rows[1].count


def test_hook_groups_decode_positions_and_leaves_prefill_alone(setup):
    model, batches = setup
    x = batches[0]
    hook = quality.DecodePolicyHook(replace(quality.DEFAULT, budget=0.4), prefill=16, num_experts=64)
    logits = torch.randn(x.shape[0], x.shape[1], 64)
    ids, w = torch.softmax(logits, -1).topk(8, -1)[::-1]
    new_ids, new_w = hook(0, logits, ids, w / w.sum(-1, keepdim=True))
    assert torch.equal(new_ids[:, :16], ids[:, :16])  # prefill untouched
    # position 20 of every sequence is one decode batch: the policy applied to exactly that batch
    ref = select_experts_ref(logits[:, 20], ids[:, 20], (w / w.sum(-1, keepdim=True))[:, 20],
                             hook.params)
    assert torch.equal(new_ids[:, 20], ref.topk_ids)


def test_main_quick_prints_json_with_the_required_keys(capsys):
    out = quality.main(["--quick", "--max-batches", "1", "--budgets", "0.6"])
    for key in ("batch", "distinct_experts_base", "distinct_experts_lynx", "expert_reduction",
                "ppl_base", "ppl_lynx", "ppl_rel_increase", "agreement", "accuracy_delta_points",
                "kl", "accuracy_delta_points_bf16_floor", "kl_bf16_floor"):
        assert key in out
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("{") and '"expert_reduction"' in last


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
