"""Expert gather: copy host expert blocks into GPU slots with a kernel, planned on the device.

The kernel reads the page-locked host store through its device (UVA) address, so neither the
copy list nor its length ever crosses to the host: a step that uses it can be captured in a
CUDA graph. Under ``TRITON_INTERPRET=1`` (or for CPU tensors) it runs on the CPU, where the
"host pointer" is just the CPU tensor.

Shapes (one named tensor at a time):
    src:     [R, B] uint8   expert blocks (R = layers * experts rows of B bytes)
    dst:     [K, ...]       contiguous slot tensor; one slot row has D bytes
    rows:    [M] int        source row per copy, -1 = no copy (fixed M keeps shapes static)
    slots:   [M] int        destination slot per copy
    dst[slots[i]] = src[rows[i], offset : offset + D] viewed as dst.dtype
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


@triton.jit
def _gather_kernel(
    src_ptr,
    dst_ptr,
    rows_ptr,
    slots_ptr,
    src_row_words,
    src_offset_words,
    n_words,
    BLOCK: tl.constexpr,
):
    copy = tl.program_id(0)
    chunk = tl.program_id(1)
    row = tl.load(rows_ptr + copy).to(tl.int64)
    slot = tl.load(slots_ptr + copy).to(tl.int64)
    if row >= 0:
        offs = chunk * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n_words
        vals = tl.load(src_ptr + row * src_row_words + src_offset_words + offs, mask=mask)
        tl.store(dst_ptr + slot * n_words + offs, vals, mask=mask)


_WORDS = (torch.int64, torch.int32, torch.int16, torch.uint8)


def _word_dtype(*nbytes: int) -> torch.dtype:
    """The widest integer word that divides every byte count (vector-friendly copies)."""
    for dt in _WORDS:
        size = torch.empty((), dtype=dt).element_size()
        if all(n % size == 0 for n in nbytes):
            return dt
    return torch.uint8


def _interpret_mode() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


_interpreted = None


def _kernel_for(device: torch.device):
    """The jit kernel on a GPU; on CPU tensors the Triton interpreter runs the same body
    (built here so it works even when TRITON_INTERPRET was set after this module loaded)."""
    global _interpreted
    if device.type != "cpu":
        return _gather_kernel
    from triton.runtime.interpreter import InterpretedFunction

    if isinstance(_gather_kernel, InterpretedFunction):
        return _gather_kernel
    if _interpreted is None:
        _interpreted = InterpretedFunction(_gather_kernel.fn)
    return _interpreted


def _check(
    src: torch.Tensor, offset: int, dst: torch.Tensor, rows: torch.Tensor, slots: torch.Tensor
) -> int:
    if src.dtype != torch.uint8 or src.dim() != 2 or not src.is_contiguous():
        raise ValueError(
            f"src must be a contiguous [R, B] uint8 tensor, got {src.dtype} {tuple(src.shape)}"
        )
    if not dst.is_contiguous():
        raise ValueError("dst slot tensor must be contiguous")
    if rows.shape != slots.shape or rows.dim() != 1:
        raise ValueError(
            f"rows {tuple(rows.shape)} and slots {tuple(slots.shape)} must be equal 1-D"
        )
    row_bytes = dst[0].numel() * dst.element_size()
    if offset < 0 or offset + row_bytes > src.shape[1]:
        raise ValueError(
            f"segment [{offset}, {offset + row_bytes}) outside a {src.shape[1]}-byte block"
        )
    return row_bytes


def offload_gather(
    src: torch.Tensor,
    offset: int,
    dst: torch.Tensor,
    rows: torch.Tensor,
    slots: torch.Tensor,
    block_bytes: int = 32768,
    interpret_cpu: bool | None = None,
) -> None:
    """dst[slots[i]] = src[rows[i], offset:offset+D] for rows[i] >= 0; no host sync.

    On CPU tensors the Triton interpreter runs the kernel when ``interpret_cpu`` (default: the
    TRITON_INTERPRET variable); otherwise the torch reference does the copy.
    """
    row_bytes = _check(src, offset, dst, rows, slots)
    if rows.numel() == 0 or row_bytes == 0:
        return
    if interpret_cpu is None:
        interpret_cpu = _interpret_mode()
    if dst.device.type == "cpu" and not interpret_cpu:
        offload_gather_ref(src, offset, dst, rows, slots)
        return
    word = _word_dtype(src.shape[1], offset, row_bytes)
    wsize = torch.empty((), dtype=word).element_size()
    n_words = row_bytes // wsize
    block = max(16, min(block_bytes // wsize, triton.next_power_of_2(n_words)))
    grid = (rows.numel(), triton.cdiv(n_words, block))
    _kernel_for(dst.device)[grid](
        src.view(word),
        dst.view(-1).view(torch.uint8).view(word),
        rows,
        slots,
        src.shape[1] // wsize,
        offset // wsize,
        n_words,
        BLOCK=block,
    )


def offload_gather_ref(
    src: torch.Tensor, offset: int, dst: torch.Tensor, rows: torch.Tensor, slots: torch.Tensor
) -> None:
    """Torch reference of ``offload_gather`` (reads the copy list on the host: not graph-safe)."""
    row_bytes = _check(src, offset, dst, rows, slots)
    dst_bytes = dst.view(dst.shape[0], -1).view(torch.uint8)  # [K, D]
    for r, s in zip(rows.tolist(), slots.tolist()):
        if r >= 0:
            dst_bytes[s].copy_(src[r, offset : offset + row_bytes].to(dst.device))
