"""Batch-aware expert selection (the Lynx policy): torch reference (the spec) and dispatch.

The parameters are the selection section of the config (``SelectionParams``); the result and
row-count types live in ``selection.types``, shared with the Triton kernels.
"""

from lynx_sglang.config import SelectionParams
from lynx_sglang.selection.policy import distinct_experts, select_experts, select_experts_ref
from lynx_sglang.selection.types import SelectionResult

__all__ = [
    "SelectionParams",
    "SelectionResult",
    "distinct_experts",
    "select_experts",
    "select_experts_ref",
]
