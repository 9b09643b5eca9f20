"""Shared pieces of the tests that run SGLang's real MoE layers (imported by test modules;
pytest puts tests/ on the path)."""

import contextlib


@contextlib.contextmanager
def kernel_calls(moe):
    """Record the TopK output of every call of the layer's fused kernel (its base method)."""
    base = moe.quant_method.base_method
    calls, original = [], base.apply

    def apply(layer, dispatch_output):
        calls.append(dispatch_output.topk_output)
        return original(layer, dispatch_output)

    base.apply = apply
    try:
        yield calls
    finally:
        del base.apply
