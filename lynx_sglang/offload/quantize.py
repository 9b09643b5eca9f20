"""Round-to-nearest expert quantisers and their dequantisers, in the layouts SGLang's fused-MoE
methods load (imports only torch; no calibration data).

- block FP8: e4m3 weights with one float32 scale per 128 x 128 block, stored as its inverse
  ("weight_scale_inv", what DeepSeek-V3's and Qwen's FP8 checkpoints ship): w ~= q * s;
- per-channel int8 / FP8 (W8A8): one float32 scale per output row ("weight_scale", [N, 1]).

Each works on one expert's [N, K] matrix, or a stack [..., N, K].
"""

from __future__ import annotations

import math

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
BLOCK = (128, 128)


def quantize_block_fp8(
    w: torch.Tensor, block: tuple[int, int] = BLOCK
) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., N, K] float -> (q [..., N, K] e4m3, scale_inv [..., ceil(N/bn), ceil(K/bk)] f32)."""
    *lead, N, K = w.shape
    bn, bk = block
    nb, kb = math.ceil(N / bn), math.ceil(K / bk)
    padded = torch.zeros(*lead, nb * bn, kb * bk, dtype=torch.float32, device=w.device)
    padded[..., :N, :K] = w.float()
    blocks = padded.unflatten(-2, (nb, bn)).unflatten(-1, (kb, bk))  # [..., nb, bn, kb, bk]
    amax = blocks.abs().amax(dim=(-3, -1))  # [..., nb, kb]
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (blocks / scale[..., :, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    q = q.flatten(-2, -1).flatten(-3, -2)[..., :N, :K].contiguous()
    return q, scale


def dequantize_block_fp8(
    q: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = BLOCK
) -> torch.Tensor:
    """The float32 weights of ``quantize_block_fp8``'s output."""
    *_, N, K = q.shape
    s = scale_inv.repeat_interleave(block[0], -2).repeat_interleave(block[1], -1)
    return q.float() * s[..., :N, :K]


def quantize_channel(w: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., N, K] float -> (q [..., N, K] int8 or e4m3, scale [..., N, 1] f32), per row."""
    top = 127.0 if dtype == torch.int8 else FP8_MAX
    amax = w.float().abs().amax(-1, keepdim=True)
    scale = torch.where(amax > 0, amax / top, torch.ones_like(amax))
    q = (w.float() / scale).clamp(-top, top)
    return (q.round().to(dtype) if dtype == torch.int8 else q.to(dtype)), scale


def dequantize_channel(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale
