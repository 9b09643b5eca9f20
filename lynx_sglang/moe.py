"""Plain-torch MoE expert computation in SGLang's weight layout: the oracle for every fast path.

Layout (as SGLang's ``FusedMoE`` stores unquantised weights):
    w13: [E, 2I, H]  gate projection rows first, then up projection rows
    w2:  [E, H, I]
    out[t] = sum_j topk_weights[t, j] * w2[e] @ (silu(w13[e, :I] @ x[t]) * (w13[e, I:] @ x[t]))
             with e = topk_ids[t, j]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def fused_moe_ref(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
) -> torch.Tensor:
    """Reference MoE forward. x: [T, H], topk_ids/topk_weights: [T, k] -> [T, H] in x.dtype.

    Loops over the experts the batch uses (readable, not fast). Accumulates in float32.
    """
    T, H = x.shape
    inter = w2.shape[-1]
    out = torch.zeros(T, H, dtype=torch.float32, device=x.device)
    flat_ids = topk_ids.reshape(-1).long()
    flat_w = topk_weights.reshape(-1).float()
    token_of = torch.arange(T, device=x.device).repeat_interleave(topk_ids.shape[1])
    for e in torch.unique(flat_ids).tolist():
        sel = flat_ids == e
        tok = token_of[sel]
        xe = x[tok].float()
        gate_up = xe @ w13[e].float().t()  # [n, 2I]
        h = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]
        ye = h @ w2[e].float().t()  # [n, H]
        out.index_add_(0, tok, ye * flat_w[sel, None])
    return out.to(x.dtype)


def reference_kernel(w13: torch.Tensor | None, w2: torch.Tensor | None):
    """A ``lynx_sglang.step.Kernel`` built on ``fused_moe_ref``: over the given resident weights
    (w13 [E, 2I, H], w2 [E, H, I]) when the step has no cache, else over the cache's slots."""

    def kernel(x, ids, weights, experts):
        a, b = (w13, w2) if experts is None else (experts["w13"], experts["w2"])
        return fused_moe_ref(x, a, b, ids, weights)

    return kernel
