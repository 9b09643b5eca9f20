"""Graph-safe pieces: the Triton gather kernel (interpreted on CPU) and the device-planned executor."""

from __future__ import annotations

import math

import pytest
import torch
from offload_helpers import INTER, H, forward, make_store, one_thread  # noqa: F401 (autouse fixture)

from lynx_sglang.kernels.offload_gather import offload_gather, offload_gather_ref
from lynx_sglang.moe import fused_moe_ref
from lynx_sglang.offload import ExpertCache


def ids(*rows: list[int]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.int32)


# ---------------------------------------------------------------- the kernel
@pytest.mark.parametrize(
    "dtype,shape,offset",
    [(torch.bfloat16, (6, 8), 256), (torch.float32, (5,), 4), (torch.uint8, (7,), 3),
     (torch.float8_e4m3fn, (4, 16), 32), (torch.int8, (3, 5), 17)],  # fmt: skip
)
def test_gather_kernel_matches_ref_under_triton_interpret(monkeypatch, dtype, shape, offset):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    g = torch.Generator().manual_seed(0)
    src = torch.randint(0, 256, (10, 512), dtype=torch.uint8, generator=g)  # [R, B]
    dst = torch.randint(0, 100, (5, *shape), generator=g).to(dtype)  # [K, *shape]
    rows = torch.tensor([7, -1, 2, 9], dtype=torch.int32)
    slots = torch.tensor([4, 1, 0, 2], dtype=torch.int64)
    want = dst.clone()
    offload_gather_ref(src, offset, want, rows, slots)
    offload_gather(src, offset, dst, rows, slots, block_bytes=64)  # small blocks: several chunks
    assert torch.equal(dst.view(torch.uint8), want.view(torch.uint8))
    nbytes = math.prod(shape) * dst.element_size()
    assert torch.equal(dst[4].reshape(-1).view(torch.uint8), src[7, offset : offset + nbytes])
    assert not torch.equal(want[1].view(torch.uint8).reshape(-1), src[0, :nbytes])  # -1: untouched


def test_gather_rejects_a_segment_outside_the_block():
    src = torch.zeros(2, 64, dtype=torch.uint8)
    with pytest.raises(ValueError, match="outside"):
        offload_gather(
            src,
            60,
            torch.zeros(2, 8),
            torch.zeros(1, dtype=torch.int32),
            torch.zeros(1, dtype=torch.int32),
        )


# ---------------------------------------------------------------- the graph-safe executor
def test_graph_executor_runs_the_triton_kernel_exactly():
    store, weights = make_store(num_layers=2)
    cache = ExpertCache(store, 4, "cpu", 2, executor="graph", gather_backend="triton")
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        for layer in range(2):
            topk_ids = torch.randperm(12, generator=g)[:4].view(2, 2).to(torch.int32)
            topk_w = torch.rand(2, 2, generator=g)
            x = torch.randn(2, H, generator=g)
            out = forward(cache, layer, x, topk_ids, topk_w)
            assert torch.allclose(
                out, fused_moe_ref(x, *weights[layer], topk_ids, topk_w), rtol=1e-5, atol=1e-4
            )


def test_graph_executor_flags_a_step_whose_misses_exceed_free_slots():
    store, weights = make_store(num_layers=1)
    cache = ExpertCache(store, 4, "cpu", 2, executor="graph")
    cache.prepare(0, ids([0, 1], [2, 3]))
    cache.check_overflow()  # 4 distinct experts fit 4 slots
    topk_ids = ids([0, 1], [4, 5], [6, 7])  # 6 distinct experts, 4 slots
    topk_w = torch.full((3, 2), 0.5)
    x = torch.randn(3, H)
    plan = cache.prepare(0, topk_ids)
    mask = plan.weight_mask
    assert torch.isnan(mask).any() and not torch.isnan(mask[0]).any()  # expert 0/1 hits: served
    served = ~torch.isnan(mask)
    w13 = cache.slot_weights(0)["w13"]
    assert torch.equal(w13[plan.slot_ids.long()][served], weights[0][0][topk_ids.long()][served])
    with pytest.raises(RuntimeError, match="--lynx-slots"):
        cache.check_overflow()
    assert cache.counters()["total"]["overflow"] == 1
    out = forward(cache, 0, x, topk_ids, topk_w)  # never silently wrong
    bad_rows = torch.isnan(out).any(-1)
    ok_rows = ~bad_rows
    assert bad_rows.any()
    ref = fused_moe_ref(x, *weights[0], topk_ids, topk_w)
    assert torch.allclose(out[ok_rows], ref[ok_rows], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("eviction", ["lru", "score"])
def test_graph_and_eager_executors_make_the_same_decisions(eviction):
    store, _ = make_store(num_layers=2)
    eager = ExpertCache(store, 4, "cpu", 2, eviction=eviction)
    graph = ExpertCache(store, 4, "cpu", 2, eviction=eviction, executor="graph")
    g = torch.Generator().manual_seed(2)
    for _ in range(10):
        for layer in range(2):
            topk_ids = torch.randperm(12, generator=g)[:4].view(2, 2).to(torch.int32)
            scores = torch.rand(12, generator=g)
            a = eager.prepare(layer, topk_ids, scores=scores).slot_ids
            b = graph.prepare(layer, topk_ids, scores=scores).slot_ids
            assert torch.equal(a, b)
            assert torch.equal(eager.resident_mask(layer), graph.resident_mask(layer))
    ca, cb = eager.counters()["total"], graph.counters()["total"]
    assert {k: ca[k] for k in ("hits", "misses", "bytes_h2d")} == {
        k: cb[k] for k in ("hits", "misses", "bytes_h2d")
    }


def test_graph_executor_counts_prefetch_hits():
    store, _ = make_store(num_layers=1)
    cache = ExpertCache(store, 4, "cpu", 2, executor="graph")
    cache.prefetch(0, torch.tensor([5, 6]))
    cache.prepare(0, ids([5, 6]))
    cache.prepare(0, ids([1, 2]))
    c = cache.counters()["total"]
    assert (c["prefetch_fills"], c["prefetch_hits"], c["misses"], c["hits"]) == (2, 2, 2, 2)


# ---------------------------------------------------------------- GPU
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@cuda
def test_uva_gather_reads_pinned_host_memory():
    store, _ = make_store(num_layers=2)
    assert store.pinned
    src = store.buffer.view(-1, store.block_bytes)
    seg = store.segment("w13")
    dst = torch.zeros(4, 2 * INTER, H, device="cuda")
    rows = torch.tensor([3, -1, 13, 0], dtype=torch.int32, device="cuda")
    slots = torch.tensor([0, 1, 2, 3], dtype=torch.int32, device="cuda")
    offload_gather(src, seg.offset, dst, rows, slots)
    want = torch.zeros_like(dst)
    offload_gather_ref(src, seg.offset, want, rows, slots)
    assert torch.equal(dst, want)


def dense_moe(x, slot_ids, weights, experts):
    """A capturable MoE kernel (no host reads): gathers each choice's expert weights."""
    w13, w2 = experts["w13"], experts["w2"]
    inter = w2.shape[-1]
    a = w13[slot_ids.long()]  # [T, k, 2I, H]
    h = torch.einsum("tkoh,th->tko", a, x)
    h = torch.nn.functional.silu(h[..., :inter]) * h[..., inter:]
    y = torch.einsum("tkhi,tki->tkh", w2[slot_ids.long()], h)
    return (y * weights.unsqueeze(-1)).sum(1)


@pytest.mark.gpu
@cuda
def test_graph_executor_step_captures_in_a_cuda_graph():
    store, weights = make_store(num_layers=1)
    cache = ExpertCache(store, 4, "cuda", 2, executor="graph")
    x = torch.randn(2, H, device="cuda")
    topk_ids = ids([0, 1], [2, 3]).cuda()
    topk_w = torch.full((2, 2), 0.5, device="cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        forward(cache, 0, x, topk_ids, topk_w, kernel=dense_moe)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = forward(cache, 0, x, topk_ids, topk_w, kernel=dense_moe)
    for new in ([4, 5], [6, 7]), ([0, 4], [8, 9]):
        topk_ids.copy_(ids(*new))
        graph.replay()
        ref = fused_moe_ref(x.cpu(), weights[0][0], weights[0][1], topk_ids.cpu(), topk_w.cpu())
        assert torch.allclose(out.cpu(), ref, rtol=1e-4, atol=1e-4)
    cache.check_overflow()
