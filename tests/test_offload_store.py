"""Host expert store: layout, loading, pinning and the host memory check."""

from __future__ import annotations

import pytest
import torch

from lynx_sglang.offload import store as store_mod
from lynx_sglang.offload.store import HostExpertStore, HostMemoryError

SHAPES = {"w13": (2 * 6, 8), "w2": (8, 6)}  # I=6, H=8


def test_one_contiguous_block_per_expert():
    s = HostExpertStore(2, 5, SHAPES, torch.bfloat16, headroom_gib=0)
    for layer in range(2):
        for e in range(5):
            block = s.block(layer, e)
            lo, hi = block.data_ptr(), block.data_ptr() + block.numel()
            assert block.is_contiguous() and block.numel() == s.block_bytes
            for t in s.expert(layer, e).values():
                assert lo <= t.data_ptr() and t.data_ptr() + t.numel() * t.element_size() <= hi
    assert s.nbytes_per_expert == (12 * 8 + 8 * 6) * 2


def test_load_layer_round_trips_every_expert():
    s = HostExpertStore(2, 4, SHAPES, torch.float32, headroom_gib=0)
    w13, w2 = torch.randn(4, 12, 8), torch.randn(4, 8, 6)
    s.load_layer(1, {"w13": w13, "w2": w2})
    for e in range(4):
        got = s.expert(1, e)
        assert torch.equal(got["w13"], w13[e]) and torch.equal(got["w2"], w2[e])
    assert torch.count_nonzero(s.tensor(0, "w13")) == 0  # other layers untouched


def test_load_layer_rejects_wrong_shapes():
    s = HostExpertStore(1, 4, SHAPES, torch.float32, headroom_gib=0)
    with pytest.raises(ValueError, match="w2"):
        s.load_layer(0, {"w13": torch.zeros(4, 12, 8), "w2": torch.zeros(4, 6, 8)})


def test_scales_may_have_their_own_dtype():
    shapes = {"w13": (12, 8), "w2": (8, 6), "w13_scale": (12,), "w2_scale": (8,)}
    dtypes = {"w13_scale": torch.float32, "w2_scale": torch.float32}
    s = HostExpertStore(1, 3, shapes, torch.int8, tensor_dtypes=dtypes, headroom_gib=0)
    assert s.expert(0, 2)["w13_scale"].dtype == torch.float32
    assert s.expert(0, 2)["w13"].dtype == torch.int8
    assert HostExpertStore.required_bytes(1, 3, shapes, torch.int8, dtypes) == s.buffer.numel()



def test_a_scalar_per_expert_is_a_tensor_of_one_row_per_expert():
    """Per-tensor scales (SGLang's online FP8: one float per expert) lay out as [E]."""
    shapes = {"w13": (12, 8), "w13_weight_scale": ()}
    s = HostExpertStore(2, 3, shapes, torch.float8_e4m3fn, headroom_gib=0,
                        tensor_dtypes={"w13_weight_scale": torch.float32})  # fmt: skip
    scale = s.tensor(1, "w13_weight_scale")
    assert scale.shape == (3,) and scale.dtype == torch.float32
    scale.copy_(torch.tensor([0.5, 2.0, 4.0]))
    assert s.expert(1, 2)["w13_weight_scale"].item() == 4.0
    assert s.tensor(0, "w13_weight_scale").abs().sum() == 0  # the other layer untouched
    assert s.nbytes_per_expert == 12 * 8 + 4

@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only behaviour")
def test_cpu_store_is_plain_memory_and_says_so():
    s = HostExpertStore(1, 2, SHAPES, torch.float32, headroom_gib=0)
    assert s.pinned is False
    with pytest.raises(ValueError, match="CUDA"):
        HostExpertStore(1, 2, SHAPES, torch.float32, pin=True, headroom_gib=0)


def test_host_memory_check_fails_with_a_clear_message(monkeypatch):
    monkeypatch.setattr(store_mod, "available_host_bytes", lambda: 2 << 30)
    with pytest.raises(HostMemoryError) as err:
        HostExpertStore(1, 4, SHAPES, torch.float32, headroom_gib=2.5)
    msg = str(err.value)
    assert "\n" not in msg
    assert (
        "2.50 GiB headroom" in msg
        and "--lynx-host-headroom-gib" in msg
        and "2.00 GiB is available" in msg
    )


def test_available_host_bytes_reads_meminfo():
    assert store_mod.available_host_bytes() > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_store_is_pinned():
    s = HostExpertStore(1, 2, SHAPES, torch.bfloat16, headroom_gib=0)
    assert s.pinned and s.buffer.is_pinned()
