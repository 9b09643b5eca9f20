"""The routing rule selection follows (``lynx_sglang.selection.routing``), on random inputs:
the policy's logits keep the model's choice order, weights follow the model's rule, fused shared
columns travel untouched, and the cross-layer prediction chooses the way the model does."""

from __future__ import annotations

import pytest
import torch

from lynx_sglang.selection.routing import (
    SOFTMAX_TOPK,
    Routing,
    model_weights,
    reweigh,
    selection_logits,
    split_shared,
)
from lynx_sglang.step import predict_votes

E, K, T = 32, 6, 24


def logits_and_bias(seed: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(T, E, generator=g).to(dtype), torch.randn(E, generator=g) * 0.3


def test_softmax_without_bias_keeps_its_own_logits():
    logits, _ = logits_and_bias(0, torch.bfloat16)
    assert selection_logits(logits, SOFTMAX_TOPK) is logits
    assert not SOFTMAX_TOPK.reweighs("lynx")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scoring", ["sigmoid", "softmax"])
def test_selection_logits_order_and_distribution_are_the_models(scoring, dtype):
    """Top-k of the policy's logits = top-k of score + bias; their softmax = the biased scores
    normalised per token (for positive biased scores)."""
    logits, bias = logits_and_bias(1, dtype)
    routing = Routing(scoring=scoring, correction_bias=bias)
    score = logits.float().sigmoid() if scoring == "sigmoid" else logits.float().softmax(-1)
    choice = score + bias
    got = selection_logits(logits, routing)
    assert torch.equal(got.topk(K, -1).indices, choice.topk(K, -1).indices)
    positive = (choice > 0).all(-1)
    want = choice / choice.sum(-1, keepdim=True)
    torch.testing.assert_close(got.softmax(-1)[positive], want[positive])
    assert torch.isfinite(got).all()


@pytest.mark.parametrize("renormalize", [True, False])
def test_model_weights_follow_the_rule(renormalize):
    logits, _ = logits_and_bias(2)
    ids = torch.randperm(E, generator=torch.Generator().manual_seed(2))[:K].expand(T, K)
    routing = Routing(scoring="sigmoid", renormalize=renormalize, weight_scale=2.5)
    s = logits.sigmoid().gather(1, ids)
    want = (s / s.sum(-1, keepdim=True) if renormalize else s) * 2.5
    torch.testing.assert_close(model_weights(logits, ids, routing), want)


def test_reweigh_changes_only_changed_rows():
    logits, bias = logits_and_bias(3)
    routing = Routing(scoring="sigmoid", correction_bias=bias)
    before = (logits.sigmoid() + bias).topk(K, -1).indices
    w_before = model_weights(logits, before, routing)
    after = before.clone()
    after[::2, -1] = (before[::2, -1] + 1) % E  # may collide within a row: irrelevant here
    w_after = torch.full_like(w_before, 7.0)
    out = reweigh(logits, before, w_before, after, w_after, routing)
    assert torch.equal(out[1::2], w_before[1::2])  # bit for bit
    torch.testing.assert_close(out[::2], model_weights(logits, after, routing)[::2])
    assert routing.reweighs("lynx") and routing.reweighs("oea")
    assert not routing.reweighs("drop") and not routing.reweighs("similar")


def test_shared_columns_split_and_join_untouched():
    ids = torch.arange(T * (K + 1)).view(T, K + 1) % E
    w = torch.rand(T, K + 1)
    cols = split_shared(ids, w, Routing(shared_columns=1))
    assert cols.ids.shape == (T, K) and torch.equal(cols.shared_ids, ids[:, K:])
    new_ids, new_w = cols.join(cols.ids + 1, cols.weights * 2)
    assert torch.equal(new_ids[:, K:], ids[:, K:]) and torch.equal(new_w[:, K:], w[:, K:])
    plain = split_shared(ids, w, SOFTMAX_TOPK)
    assert plain.ids is ids and plain.join(ids, w) == (ids, w)
    with pytest.raises(ValueError, match="shared columns"):
        split_shared(ids[:, :1], w[:, :1], Routing(shared_columns=1))
    with pytest.raises(ValueError, match="scoring"):
        Routing(scoring="sqrtsoftplus")


def test_cross_layer_prediction_chooses_by_the_next_layers_rule():
    """The prefetch votes of a DeepSeek-style next layer: its top-k by sigmoid score + bias."""
    g = torch.Generator().manual_seed(4)
    x, router = torch.randn(T, 16, generator=g), torch.randn(E, 16, generator=g)
    bias = torch.randn(E, generator=g)
    routing = Routing(scoring="sigmoid", correction_bias=bias)
    votes = predict_votes(x, router, K, None, _eager(), None, routing)
    ids = ((x @ router.t()).sigmoid() + bias).topk(K, -1).indices
    want = torch.zeros(E).index_add_(0, ids.reshape(-1), torch.ones(T * K))
    assert torch.equal(votes, want)
    plain = predict_votes(x, router, K, None, _eager())
    assert not torch.equal(plain, votes)  # the bias changes what is predicted


def _eager():
    from lynx_sglang.step import NOT_DECODE

    return NOT_DECODE
