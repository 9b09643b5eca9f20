"""Round-to-nearest expert quantisers and their dequantisers, in the layouts SGLang's fused-MoE
methods load (imports only torch; no calibration data).

- block FP8: e4m3 weights with one float32 scale per 128 x 128 block, stored as its inverse
  ("weight_scale_inv", what DeepSeek-V3's and Qwen's FP8 checkpoints ship): w ~= q * s;
- per-channel int8 / FP8 (W8A8): one float32 scale per output row ("weight_scale", [N, 1]);
- symmetric group int-b (the w4a16 layout of GPTQ/AWQ-style checkpoints: b-bit values, one fp16
  scale per 64 weights along the input dim K; int4, and int3/int2 as stress points). The values
  are held one per int8 (unpacked: enough to measure quality); ``bytes_per_expert`` counts the
  packed bytes a real checkpoint of the format holds.

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


def quantize_group_int(
    w: torch.Tensor, bits: int = 4, group: int = 64, scale_dtype: torch.dtype = torch.float16
) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., N, K] float -> (q [..., N, K] int8 in [-qmax, qmax], scale [..., N, ceil(K/group)]
    in ``scale_dtype``), qmax = 2^(bits-1) - 1, one absmax scale per ``group`` weights along K
    (the input dim).

    The scale is rounded up where rounding it to its dtype would have put the group's largest
    weight past qmax, so every weight is within scale / 2 of its dequantised value (no
    clipping)."""
    if not 2 <= bits <= 8:
        raise ValueError(f"group int quantisation: bits in 2..8, got {bits}")
    *lead, N, K = w.shape
    qmax = 2 ** (bits - 1) - 1
    g = math.ceil(K / group)
    padded = torch.zeros(*lead, N, g * group, dtype=torch.float32, device=w.device)
    padded[..., :K] = w.float()
    groups = padded.unflatten(-1, (g, group))  # [..., N, g, group]
    amax = groups.abs().amax(-1)  # [..., N, g]
    scale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax)).to(scale_dtype)
    short = scale.float() * qmax < amax  # rounding to the dtype went down: one step up
    scale = torch.where(short, torch.nextafter(scale, torch.full_like(scale, math.inf)), scale)
    q = (groups / scale.float()[..., None]).round().clamp(-qmax, qmax).to(torch.int8)
    return q.flatten(-2)[..., :K].contiguous(), scale


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """[..., N, K] int4 values in [-8, 7] -> [..., N, K/2] uint8 as SGLang's w4a16 kernel reads
    them (moe_wna16's layout): value + 8, the even k in the low nibble."""
    u = (q.to(torch.int16) + 8).to(torch.uint8)
    return u[..., 0::2] | (u[..., 1::2] << 4)


def dequantize_group_int(q: torch.Tensor, scale: torch.Tensor, group: int = 64) -> torch.Tensor:
    """The float32 weights of ``quantize_group_int``'s output."""
    K = q.shape[-1]
    return q.float() * scale.float().repeat_interleave(group, -1)[..., :K]


# Expert formats a bf16 checkpoint can be sent as (transfer-time quantisation): name -> layout.
FORMATS = {
    "bf16": "bf16 (2 B/weight)",
    "fp8": "block FP8 e4m3, 128x128 blocks, fp32 scale_inv",
    "int4": "int4 symmetric, group 64 along the input dim, fp16 scales (w4a16)",
    "int3": "int3 symmetric, group 64, fp16 scales (stress point)",
    "int2": "int2 symmetric, group 64, fp16 scales (stress point)",
}
INT_BITS = {"int4": 4, "int3": 3, "int2": 2}
GROUP = 64


def fake_quantize(w: torch.Tensor, fmt: str) -> torch.Tensor:
    """``w`` [..., N, K] (input dim last) quantised to ``fmt`` round-to-nearest with no
    calibration, then dequantised, in w's dtype: what a kernel on that format computes with.
    The source is rounded to bf16 first (the checkpoint a format is made from)."""
    src = w.to(torch.bfloat16)
    if fmt == "bf16":
        out = src
    elif fmt == "fp8":
        out = dequantize_block_fp8(*quantize_block_fp8(src))
    elif fmt in INT_BITS:
        out = dequantize_group_int(*quantize_group_int(src, INT_BITS[fmt], GROUP), GROUP)
    else:
        raise ValueError(f"expert format {fmt!r}: one of {', '.join(FORMATS)}")
    return out.to(w.dtype)


def bytes_per_expert(fmt: str, H: int, I: int) -> int:  # noqa: E741
    """One routed expert's real bytes in ``fmt``: w13 [2I, H] and w2 [H, I] (rows N x input K),
    the weights packed as the format stores them plus every scale.

      bf16:  2 B x 3HI
      fp8:   1 B x 3HI + 4 B x (ceil(2I/128) ceil(H/128) + ceil(H/128) ceil(I/128))   fp32 scale_inv
      int-b: ceil(2I H b / 8) + ceil(H I b / 8) + 2 B x (2I ceil(H/64) + H ceil(I/64))  fp16 scales

    (int4 at H, I multiples of 64: 0.5 + 2/64 = 0.53125 B/weight, 0.266x bf16.)"""
    mats = ((2 * I, H), (H, I))  # (N, K) of w13 and w2
    if fmt == "bf16":
        return 2 * 3 * H * I
    if fmt == "fp8":
        bn, bk = BLOCK
        return 3 * H * I + 4 * sum(math.ceil(n / bn) * math.ceil(k / bk) for n, k in mats)
    if fmt in INT_BITS:
        b = INT_BITS[fmt]
        return sum(math.ceil(n * k * b / 8) + 2 * n * math.ceil(k / GROUP) for n, k in mats)
    raise ValueError(f"expert format {fmt!r}: one of {', '.join(FORMATS)}")
