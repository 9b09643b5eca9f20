"""Shared test set-up: `gpu`-marked tests are skipped where CUDA is not available; the SGLang
runtime context for building SGLang's real layers on CPU, with our hooks installed."""

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def sglang_layers():
    """SGLang's runtime context for building layers on CPU (DESIGN.md's recipe), with our hooks
    installed; returns SGLang's (FusedMoE, TopK) classes."""
    pytest.importorskip("sglang")
    from sglang.srt.runtime_context import reset_context
    from sglang.srt.server_args import ServerArgs
    from sglang.test.parallel_groups import publish

    from lynx_sglang.sglang import hooks, plugin

    reset_context()
    publish(ServerArgs(model_path="dummy"), role="test")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LYNX_SGLANG_MODE", "off")  # register() acts only when our settings exist
        plugin.install()
    assert not hooks.missing_hooks()
    from sglang.srt.layers.moe.fused_moe_triton.layer import FusedMoE
    from sglang.srt.layers.moe.topk import TopK

    return FusedMoE, TopK
