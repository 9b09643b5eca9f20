"""A model's routing rule, as far as selection must follow it (imports only torch).

The Lynx policy (``policy.select_experts_ref``) is written for softmax routers: it reads the
router logits, ranks a token's choices by them, scores experts by softmax probability and
weighs a moved choice by the probability renormalised over the row. Other routers choose and
weigh differently, and selection must follow the model's own rule:

- DeepSeek-V2/V3/V3.2, Kimi K2 and GLM-4.5 score experts with a sigmoid, *choose* them by the
  score plus an ``e_score_correction_bias`` (within the best expert groups), and *weigh* the
  chosen ones by the unbiased score, renormalised over the row (``norm_topk_prob``) and, where
  SGLang folds it into the top-k output, multiplied by ``routed_scaling_factor``;
- Qwen2-MoE-style routers that do not renormalise (``norm_topk_prob: false``) weigh a choice by
  its softmax probability over all experts;
- fused shared experts (SGLang's ``num_fused_shared_experts``) are extra top-k columns at the
  end of every row, which selection never reads, remaps or counts.

``Routing`` states the rule. ``selection_logits`` gives the policy logits whose order is the
model's choice order and whose softmax is the model's choice distribution (the policy's scores
and confidences then come from the scores that chose the experts); ``model_weights`` weighs any
choices by the model's rule, which ``reweigh`` applies to the rows selection changed.

Group limits (grouped top-k) are not applied to moved choices: they bound a token's spread over
devices under expert parallelism, which the plugin does not run; the kept set is batch-wide.

Named dimensions: T tokens, E routed experts, k routed top-k, s fused shared columns.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple, Optional

import torch

SCORINGS = ("softmax", "sigmoid")
# Policies whose moved choices are weighed by router score (drop and similar have their own rule).
SCORE_WEIGHTED_POLICIES = ("lynx", "oea")


@dataclass(frozen=True)
class Routing:
    """How one MoE layer's router turns logits [T, E] into its top-k ids and weights."""

    scoring: str = "softmax"  # the router's score function over logits: "softmax" | "sigmoid"
    renormalize: bool = True  # the chosen scores are divided by their sum
    # [E]: added to the scores to choose, not to weigh (the model's own parameter, by reference)
    correction_bias: Optional[torch.Tensor] = field(default=None, repr=False, compare=False)
    weight_scale: float = 1.0  # on the routed weights of the top-k output (folded scaling)
    shared_columns: int = 0  # s: trailing top-k columns naming fused shared experts

    def __post_init__(self) -> None:
        if self.scoring not in SCORINGS:
            raise ValueError(f"router scoring must be one of {SCORINGS}, got {self.scoring!r}")
        if self.shared_columns < 0:
            raise ValueError(f"shared_columns must be >= 0, got {self.shared_columns}")

    @property
    def is_softmax_topk(self) -> bool:
        """The rule the policy itself implements: softmax, renormalised, unbiased, unscaled."""
        return (
            self.scoring == "softmax"
            and self.renormalize
            and self.correction_bias is None
            and self.weight_scale == 1.0
        )

    def reweighs(self, policy: str) -> bool:
        """Whether moved choices must be re-weighed by this rule after the policy ran."""
        return policy in SCORE_WEIGHTED_POLICIES and not self.is_softmax_topk

    def describe(self) -> str:
        parts = [self.scoring, "renormalised" if self.renormalize else "not renormalised"]
        if self.correction_bias is not None:
            parts.append("bias-chosen")
        if self.weight_scale != 1.0:
            parts.append(f"x{self.weight_scale:g}")
        if self.shared_columns:
            parts.append(f"{self.shared_columns} fused shared")
        return ", ".join(parts)


SOFTMAX_TOPK = Routing()


def router_scores(router_logits: torch.Tensor, routing: Routing) -> torch.Tensor:
    """The unbiased scores that weigh choices: [T, E] float32 (softmax or sigmoid)."""
    logits = router_logits.float()
    if routing.scoring == "sigmoid":
        return logits.sigmoid()
    return logits.softmax(-1)


def selection_logits(router_logits: torch.Tensor, routing: Routing) -> torch.Tensor:
    """Logits for the policy: [T, E]. Their order is the model's choice order and their softmax
    its choice scores normalised per token: log(score + bias), floored just above 0 (an expert
    whose biased score is not positive is chosen by no token before every positive one).
    A softmax router without bias keeps its own logits, unchanged."""
    if routing.scoring == "softmax" and routing.correction_bias is None:
        return router_logits
    choice = router_scores(router_logits, routing)
    if routing.correction_bias is not None:
        choice = choice + routing.correction_bias.to(device=choice.device, dtype=torch.float32)
    return choice.clamp(min=torch.finfo(torch.float32).tiny).log()


def model_weights(router_logits: torch.Tensor, ids: torch.Tensor, routing: Routing) -> torch.Tensor:
    """The weights the model gives the routed choices ``ids`` [T, k]: [T, k] float32."""
    w = router_scores(router_logits, routing).gather(-1, ids.long())
    if routing.renormalize:
        total = w.sum(-1, keepdim=True)
        w = w / torch.where(total > 0, total, 1.0)
    if routing.weight_scale != 1.0:
        w = w * routing.weight_scale
    return w


def reweigh(
    router_logits: torch.Tensor,
    ids_before: torch.Tensor,
    weights_before: torch.Tensor,
    ids_after: torch.Tensor,
    weights_after: torch.Tensor,
    routing: Routing,
) -> torch.Tensor:
    """Weights of the rows selection changed, by the model's rule; unchanged rows keep theirs
    bit for bit. ids, weights: [T, k] routed columns -> [T, k] in weights_after's dtype."""
    changed = (ids_after != ids_before).any(-1, keepdim=True)  # [T, 1]
    own = model_weights(router_logits, ids_after, routing).to(weights_after.dtype)
    return torch.where(changed, own, weights_before)


class Columns(NamedTuple):
    """A top-k output split into routed columns [T, k] and fused shared ones [T, s]."""

    ids: torch.Tensor
    weights: torch.Tensor
    shared_ids: Optional[torch.Tensor]
    shared_weights: Optional[torch.Tensor]

    def join(self, ids: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """New routed columns with the shared columns appended back, untouched."""
        if self.shared_ids is None:
            return ids, weights
        return torch.cat([ids, self.shared_ids], -1), torch.cat([weights, self.shared_weights], -1)


def split_shared(topk_ids: torch.Tensor, topk_weights: torch.Tensor, routing: Routing) -> Columns:
    """Split off the trailing fused shared-expert columns (none: views of the inputs)."""
    s = routing.shared_columns
    if s == 0:
        return Columns(topk_ids, topk_weights, None, None)
    if topk_ids.shape[-1] <= s:
        raise ValueError(
            f"a top-k output of {topk_ids.shape[-1]} columns cannot hold {s} shared columns "
            "and a routed choice"
        )
    return Columns(
        topk_ids[..., :-s], topk_weights[..., :-s], topk_ids[..., -s:], topk_weights[..., -s:]
    )
