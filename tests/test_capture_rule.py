"""The capture rule: which decode batches may run inside a CUDA graph with offload on, for every
mode and batch size, applied to SGLang's real CUDA-graph config; and the structural guarantee
behind it: at every batch up to the cap (and every real count a padded graph replays), a step's
distinct experts after selection fit the K slots, so the device-side executor serves it whole."""

from __future__ import annotations

import pytest
import torch

from lynx_sglang.config import LynxConfig, SelectionParams
from lynx_sglang.selection import distinct_experts, select_experts_ref
from lynx_sglang.step import bounded_selection, decode_capture_cap

E, TOP_K = 64, 8  # the shipped model's routing shape
SGLANG_DECODE_SIZES = [1, 2, 4, 8, 12, 16, 24, 32, 40, 48, 56, 64, 96, 128, 160, 256]


def routing(batch: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, E, generator=g) * 2.0
    w, ids = torch.softmax(logits, -1).topk(TOP_K)
    return logits, ids, w / w.sum(-1, keepdim=True)


@pytest.mark.parametrize("slots", [16, 32, 48, 64])
def test_cap_per_mode(slots):
    sel = bounded_selection(SelectionParams(), slots, E)
    assert decode_capture_cap(None, slots, TOP_K, E) == (None if slots == E else slots // TOP_K)
    with_sel = decode_capture_cap(sel, slots, TOP_K, E)
    assert with_sel == (None if slots == E else slots)  # protect_top 1: K tokens
    # settings whose kept set is not bounded fall back to the peer's rule
    loose = bounded_selection(SelectionParams(protect_p=0.5), slots, E)
    assert decode_capture_cap(loose, slots, TOP_K, E) == decode_capture_cap(None, slots, TOP_K, E)
    if slots < E:  # batches below min_batch keep their routing: (min_batch - 1) * k must fit
        late = bounded_selection(SelectionParams(min_batch=slots // TOP_K + 2), slots, E)
        assert decode_capture_cap(late, slots, TOP_K, E) == slots // TOP_K


@pytest.mark.parametrize("mode", ["lynx", "offload", "lynx+offload"])
@pytest.mark.parametrize("slots", [16, 32])
def test_runtime_caps_sglangs_decode_graph_sizes(mode, slots):
    """Through SGLang's real CudaGraphConfig: capture sizes above the cap are dropped, the cap
    itself captured; a capture beyond it is refused in one line (never served with NaN)."""
    pytest.importorskip("sglang")
    from sglang.srt.model_executor.cuda_graph_config import CudaGraphConfig

    from lynx_sglang.sglang.hooks import cap_decode_graphs
    from lynx_sglang.sglang.runtime import CaptureTooLarge, LynxRuntime, ModelFacts

    model = ModelFacts(E, TOP_K, 32, 16, (0,), torch.float32)
    default = LynxRuntime(LynxConfig(mode=mode, slots=slots), model, torch.device("cpu"))
    # the defaults: captured steps select as configured, so graphs stop at K // top_k
    assert default.capture_cap == {"lynx": None, "offload": slots // TOP_K,
                                   "lynx+offload": slots // TOP_K}[mode]  # fmt: skip
    # a kept set bounded at K (--lynx-max-experts K): graphs capture up to K tokens
    runtime = LynxRuntime(LynxConfig(mode=mode, slots=slots, max_experts=slots), model,
                          torch.device("cpu"))  # fmt: skip
    expected = {"lynx": None, "offload": slots // TOP_K, "lynx+offload": slots}[mode]
    assert runtime.capture_cap == expected
    config = CudaGraphConfig.from_dict({"decode": {"backend": "full", "bs": SGLANG_DECODE_SIZES}})
    if expected is not None:
        cap_decode_graphs(config, expected)
        assert max(config.decode.bs) == expected == config.decode.max_bs
        assert config.decode.bs == sorted({b for b in SGLANG_DECODE_SIZES if b <= expected})
    for size in SGLANG_DECODE_SIZES:
        if expected is not None and size > expected:
            with pytest.raises(CaptureTooLarge) as err:
                runtime.capture_step(size)
            assert "\n" not in str(err.value) and "--cuda-graph-max-bs-decode" in str(err.value)
        else:
            assert runtime.capture_step(size).captured


@pytest.mark.parametrize("slots", [16, 32])
@pytest.mark.parametrize("policy", ["lynx", "oea"])
def test_every_batch_up_to_the_cap_fits_the_slots(slots, policy):
    """The guarantee the cap relies on, on random routing: at each graph size B <= cap and each
    real count n <= B, selection leaves at most K distinct experts."""
    sel = bounded_selection(SelectionParams(policy=policy, budget=0.9), slots, E)
    cap = decode_capture_cap(sel, slots, TOP_K, E)
    assert cap >= slots // TOP_K
    for B in sorted({1, 2, cap // 2, cap}):
        for seed in range(4):
            logits, ids, w = routing(B, seed)
            for n in sorted({1, max(1, B // 2), B}):
                if n < sel.min_batch:
                    after = ids  # too small a batch for selection: its routing as it is
                else:
                    after = select_experts_ref(logits, ids, w, sel, num_valid=n).topk_ids
                assert int(distinct_experts(after, E, n)) <= slots, (B, n, seed)
