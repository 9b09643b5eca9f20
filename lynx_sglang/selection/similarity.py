"""Expert similarity from the expert weights alone (no calibration data), for the "similar"
policy (after SERE, arXiv 2602.07616): which expert can stand in for which.

Two experts are similar when they compute similar functions. Comparing flattened weights says
little (an expert's intermediate neurons can come in any order), so each expert is run on the
same fixed random probes and the cosine similarity of the concatenated outputs is taken. An
expert whose best peer falls below the threshold has no stand-in and is never moved (SERE's
critical experts). Named dimensions: E experts, I intermediate, H hidden, P probes.
"""

from __future__ import annotations

import torch

from lynx_sglang.selection.types import ExpertSimilarity

PROBES = 64  # probe inputs per layer: enough for a stable ranking of E <= 256 peers


def expert_outputs(
    w13: torch.Tensor, w2: torch.Tensor, probes: torch.Tensor, device=None
) -> torch.Tensor:
    """Each expert's SwiGLU output on the probes, flattened: [E, P * H] float32 on ``device``
    (default: the weights'). w13: [E, 2I, H] (gate rows, then up rows, as SGLang loads them);
    w2: [E, H, I]; probes: [P, H]. Experts are moved to ``device`` one at a time."""
    E, two_i, H = w13.shape
    inter = two_i // 2
    device = w13.device if device is None else torch.device(device)
    out = torch.empty(E, probes.shape[0] * H, dtype=torch.float32, device=device)
    x = probes.to(device=device, dtype=torch.float32)
    for e in range(E):  # one expert at a time: bounded memory for any model
        gu = x @ w13[e].to(device, torch.float32).t()  # [P, 2I]
        h = torch.nn.functional.silu(gu[:, :inter]) * gu[:, inter:]  # [P, I]
        out[e] = (h @ w2[e].to(device, torch.float32).t()).reshape(-1)  # [P * H]
    return out


def expert_similarity(
    w13: torch.Tensor,
    w2: torch.Tensor,
    threshold: float,
    device=None,
    probes: int = PROBES,
    seed: int = 0,
) -> ExpertSimilarity:
    """One layer's similarity [E, E] and critical experts [E] from its expert weights, on
    ``device`` (default: the weights').

    The probes are unit-RMS Gaussian inputs (an MoE layer's input follows an RMS norm), drawn
    from ``seed`` so every process computes the same matrix."""
    H = w13.shape[-1]
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(probes, H, generator=gen)
    y = expert_outputs(w13, w2, x, device)  # [E, P * H]
    y = y / y.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    sim = (y @ y.t()).clamp(-1.0, 1.0)  # [E, E]
    sim.fill_diagonal_(1.0)
    peer = sim.clone().fill_diagonal_(float("-inf")).amax(-1)  # [E] best other expert
    return ExpertSimilarity(sim.contiguous(), peer < threshold)
