"""Round-to-nearest expert quantisers on random inputs: error bounds, exact round trips of values
already on the grid, and the real bytes of each format."""

import math

import pytest
import torch

from lynx_sglang.offload.quantize import (
    FORMATS,
    FP8,
    bytes_per_expert,
    dequantize_block_fp8,
    dequantize_group_int,
    fake_quantize,
    quantize_block_fp8,
    quantize_group_int,
)

SHAPES = [(64, 64), (96, 200), (3, 130, 70), (2, 256, 129)]  # [..., N, K], K not a group multiple


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits", [4, 3, 2])
def test_group_int_error_is_at_most_half_a_step_of_its_group(shape, dtype, bits):
    g = torch.Generator().manual_seed(sum(shape) + bits)
    w = (torch.randn(*shape, generator=g) * 0.02).to(dtype)
    w[..., 0, :5] = 0  # a partly zero group
    q, s = quantize_group_int(w, bits, 64)
    qmax = 2 ** (bits - 1) - 1
    assert q.dtype == torch.int8 and q.shape == w.shape
    assert s.dtype == torch.float16 and s.shape == (*shape[:-1], math.ceil(shape[-1] / 64))
    assert int(q.abs().max()) <= qmax
    err = (dequantize_group_int(q, s, 64) - w.float()).abs()
    step = s.float().repeat_interleave(64, -1)[..., : shape[-1]]
    assert bool((err <= step / 2 * (1 + 1e-6)).all())
    # every group's largest weight sits at qmax (or one below, where the fp16 scale rounded up)
    pad = torch.zeros(*shape[:-1], s.shape[-1] * 64, dtype=torch.int8)
    pad[..., : shape[-1]] = q.abs()
    assert bool((pad.unflatten(-1, (-1, 64)).amax(-1) >= qmax - 1).all())


@pytest.mark.parametrize("bits", [4, 3, 2, 8])
def test_group_int_values_on_the_grid_round_trip_exactly(bits):
    g = torch.Generator().manual_seed(bits)
    qmax = 2 ** (bits - 1) - 1
    N, K = 48, 192
    q = torch.randint(-qmax, qmax + 1, (N, K), generator=g, dtype=torch.int8)
    q[:, ::64] = qmax  # every group reaches qmax, so its absmax scale is the one it was made with
    s = (torch.rand(N, K // 64, generator=g) * 0.01 + 1e-3).to(torch.float16)
    w = q.float() * s.float().repeat_interleave(64, -1)
    q2, s2 = quantize_group_int(w, bits, 64)
    assert torch.equal(s2, s) and torch.equal(q2, q)
    assert torch.equal(dequantize_group_int(q2, s2, 64), w)


@pytest.mark.parametrize("shape", [(128, 128), (200, 300), (2, 256, 130)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_block_fp8_error_is_e4m3_rounding_relative_to_each_weight(shape, dtype):
    g = torch.Generator().manual_seed(sum(shape))
    w = (torch.randn(*shape, generator=g) * 0.02).to(dtype)
    q, s = quantize_block_fp8(w)
    assert q.dtype == FP8 and s.shape == (
        *shape[:-2],
        math.ceil(shape[-2] / 128),
        math.ceil(shape[-1] / 128),
    )
    d = dequantize_block_fp8(q, s)
    err = (d - w.float()).abs()
    # e4m3: 3 mantissa bits -> relative error <= 2^-4 for normals; subnormal spacing is 2^-9
    # of the scale, so an absolute 2^-10 x scale below 2^-6 x scale
    scale = s.repeat_interleave(128, -2).repeat_interleave(128, -1)[..., : shape[-2], : shape[-1]]
    bound = torch.maximum(w.float().abs() / 16, scale * 2**-10)
    assert bool((err <= bound * (1 + 1e-6)).all())
    assert float(err.max()) > 0  # random weights are not on the grid


def test_block_fp8_values_on_the_grid_round_trip_exactly():
    g = torch.Generator().manual_seed(1)
    q = (torch.randn(256, 384, generator=g) * 100).clamp(-448, 448).to(FP8)
    q[::128, ::128] = 448.0  # each block's absmax
    s = 2.0 ** torch.randint(-12, -4, (2, 3), generator=g).float()  # powers of two: exact
    w = dequantize_block_fp8(q, s)
    q2, s2 = quantize_block_fp8(w)
    assert torch.equal(s2, s) and torch.equal(q2.view(torch.uint8), q.view(torch.uint8))


def test_bytes_per_expert_are_the_formats_real_bytes():
    H, I = 4096, 1536  # noqa: E741  Qwen3-235B-A22B
    n = 3 * H * I
    assert bytes_per_expert("bf16", H, I) == 2 * n
    # block FP8: a byte per weight, 4 B per 128 x 128 block: w13 24 x 32 + w2 32 x 12 blocks
    assert bytes_per_expert("fp8", H, I) == n + 4 * (24 * 32 + 32 * 12)
    # int4 g64: half a byte per weight plus an fp16 scale per 64 weights
    assert bytes_per_expert("int4", H, I) == n // 2 + 2 * n // 64
    assert bytes_per_expert("int4", H, I) / bytes_per_expert("bf16", H, I) == 0.265625
    assert bytes_per_expert("int3", H, I) == 3 * n // 8 + 2 * n // 64
    assert bytes_per_expert("int2", H, I) == n // 4 + 2 * n // 64
    # partial blocks and groups count whole: H=192, I=24 -> w2 rows of 24 weights, one group
    assert bytes_per_expert("int4", 192, 24) == 48 * 192 // 2 + 2 * 48 * 3 + 192 * 24 // 2 + 2 * 192
    assert bytes_per_expert("fp8", 192, 24) == 3 * 192 * 24 + 4 * (1 * 2 + 2 * 1)
    with pytest.raises(ValueError, match="one of bf16"):
        bytes_per_expert("mxfp4", H, I)


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_fake_quantize_keeps_shape_and_dtype_and_is_a_projection(fmt):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(4, 128, 192, generator=g) * 0.02
    d = fake_quantize(w, fmt)
    assert d.shape == w.shape and d.dtype == w.dtype
    assert torch.equal(fake_quantize(d, fmt), d)  # weights already in the format stay as they are


def test_fake_quantize_error_grows_as_bits_shrink():
    g = torch.Generator().manual_seed(4)
    w = torch.randn(8, 128, 256, generator=g) * 0.02
    rms = {f: float((fake_quantize(w, f) - w).pow(2).mean().sqrt()) for f in FORMATS}
    assert rms["bf16"] < rms["fp8"] < rms["int4"] < rms["int3"] < rms["int2"]
    with pytest.raises(ValueError, match="expert format"):
        fake_quantize(w, "nf4")
