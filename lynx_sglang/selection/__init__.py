"""Batch-aware expert selection (the Lynx policy): params, torch reference, dispatch."""

from lynx_sglang.selection.policy import (
    SelectionParams,
    SelectionResult,
    distinct_experts,
    select_experts,
    select_experts_ref,
)

__all__ = [
    "SelectionParams",
    "SelectionResult",
    "distinct_experts",
    "select_experts",
    "select_experts_ref",
]
