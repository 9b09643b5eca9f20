"""Host expert store: every expert of every MoE layer in (page-locked) host memory.

Layout: one uint8 buffer [L, E, B] where B is the byte size of one expert's block; each named
tensor (w13, w2, scales, ...) sits at a fixed, 256-byte-aligned offset inside the block, so one
contiguous copy of B bytes moves a whole expert and each tensor is a strided view of the buffer.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import torch

_ALIGN = 256  # bytes; keeps every segment aligned for 16-byte vector loads and int64 words
_GIB = float(1 << 30)
_CUDA_HOST_REGISTER_PORTABLE_MAPPED = 1 | 2  # mapped: the GPU can read it through UVA


class HostMemoryError(MemoryError):
    """Too little free host memory for the expert store; the message is one line."""


@dataclass(frozen=True)
class Segment:
    """Where one named per-expert tensor lives inside an expert's block."""

    name: str
    offset: int  # bytes from the block start
    nbytes: int
    shape: tuple[int, ...]
    dtype: torch.dtype


def available_host_bytes() -> int:
    """MemAvailable from /proc/meminfo (bytes); what the kernel says can be allocated now."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _align(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def plan_segments(
    tensor_shapes: dict[str, tuple[int, ...]],
    dtype: torch.dtype,
    tensor_dtypes: dict[str, torch.dtype] | None = None,
) -> tuple[list[Segment], int]:
    """Lay the named tensors out in one expert block; returns (segments, block bytes)."""
    if not tensor_shapes:
        raise ValueError("tensor_shapes is empty: an expert needs at least one tensor")
    tensor_dtypes = tensor_dtypes or {}
    segments, offset = [], 0
    for name, shape in tensor_shapes.items():
        dt = tensor_dtypes.get(name, dtype)
        nbytes = math.prod(shape) * torch.empty((), dtype=dt).element_size()
        segments.append(Segment(name, offset, nbytes, tuple(int(s) for s in shape), dt))
        offset = _align(offset + nbytes)
    return segments, max(offset, _ALIGN)


def _pin(buf: torch.Tensor) -> None:
    """Page-lock ``buf`` in place at its exact size (torch's pinned allocator may round up)."""
    err = int(
        torch.cuda.cudart().cudaHostRegister(
            buf.data_ptr(), buf.numel() * buf.element_size(), _CUDA_HOST_REGISTER_PORTABLE_MAPPED
        )
    )
    if err != 0:
        raise RuntimeError(f"cudaHostRegister of the expert store failed with CUDA error {err}")


def _unpin(ptr: int, _keepalive: torch.Tensor) -> None:
    try:
        torch.cuda.cudart().cudaHostUnregister(ptr)
    except Exception:  # interpreter shutdown: the driver may already be gone
        pass


class HostExpertStore:
    """All experts of all MoE layers on the host, one contiguous block per expert."""

    def __init__(
        self,
        num_layers: int,
        num_experts: int,
        tensor_shapes: dict[str, tuple[int, ...]],
        dtype: torch.dtype,
        pin: bool | None = None,
        headroom_gib: float = 2.0,
        tensor_dtypes: dict[str, torch.dtype] | None = None,
    ) -> None:
        if num_layers < 1 or num_experts < 1:
            raise ValueError(f"need >= 1 layer and expert, got {num_layers} x {num_experts}")
        self.num_layers = num_layers
        self.num_experts = num_experts
        self.dtype = dtype
        self.segments, self.block_bytes = plan_segments(tensor_shapes, dtype, tensor_dtypes)
        self.names = [s.name for s in self.segments]
        # Bytes one expert fill moves host->device (payload only, without alignment padding).
        self.nbytes_per_expert = sum(s.nbytes for s in self.segments)
        cuda = torch.cuda.is_available()
        if pin and not cuda:
            raise ValueError("pin=True needs CUDA; on a CPU-only machine leave pin=None")
        self.pinned = bool(cuda if pin is None else pin)
        total = num_layers * num_experts * self.block_bytes
        check_host_memory(total, headroom_gib)
        # buffer: [L, E, B] uint8
        self.buffer = torch.zeros(num_layers, num_experts, self.block_bytes, dtype=torch.uint8)
        if self.pinned:
            _pin(self.buffer)
            weakref.finalize(self, _unpin, self.buffer.data_ptr(), self.buffer)
        self._views = {s.name: self._segment_view(s) for s in self.segments}
        self._segment = {s.name: s for s in self.segments}

    @staticmethod
    def required_bytes(
        num_layers: int,
        num_experts: int,
        tensor_shapes: dict[str, tuple[int, ...]],
        dtype: torch.dtype,
        tensor_dtypes: dict[str, torch.dtype] | None = None,
    ) -> int:
        """Host bytes the store will allocate (blocks include alignment padding)."""
        _, block = plan_segments(tensor_shapes, dtype, tensor_dtypes)
        return num_layers * num_experts * block

    def _segment_view(self, s: Segment) -> torch.Tensor:
        # [L, E, *shape], strided over the [L, E, B] buffer (a scalar per expert: [L, E])
        raw = self.buffer[:, :, s.offset : s.offset + s.nbytes].view(s.dtype)
        return raw.unflatten(2, s.shape) if s.shape else raw.squeeze(2)

    def segment(self, name: str) -> Segment:
        """Layout of the named tensor inside an expert block."""
        return self._segment[name]

    def tensor(self, layer: int, name: str) -> torch.Tensor:
        """All experts of one named tensor of a layer: [E, *shape] view (strided)."""
        return self._views[name][layer]

    def load_layer(self, layer: int, tensors: dict[str, torch.Tensor]) -> None:
        """Copy a layer's weights ({name: [E, *shape]}, any device) into the store."""
        if not 0 <= layer < self.num_layers:
            raise IndexError(f"layer {layer} outside 0..{self.num_layers - 1}")
        missing = set(self.names) - set(tensors)
        extra = set(tensors) - set(self.names)
        if missing or extra:
            raise ValueError(f"load_layer: missing {sorted(missing)}, unexpected {sorted(extra)}")
        for name, t in tensors.items():
            view = self._views[name][layer]
            if tuple(t.shape) != tuple(view.shape):
                raise ValueError(
                    f"load_layer: {name} is {tuple(t.shape)}, expected {tuple(view.shape)}"
                )
            view.copy_(t.to(dtype=view.dtype))

    def expert(self, layer: int, expert: int) -> dict[str, torch.Tensor]:
        """Views of one expert's tensors, all inside its contiguous block."""
        return {name: v[layer, expert] for name, v in self._views.items()}

    def block(self, layer: int, expert: int) -> torch.Tensor:
        """The expert's whole block: [B] uint8 (what one copy moves)."""
        return self.buffer[layer, expert]


def check_host_memory(nbytes: int, headroom_gib: float) -> None:
    """Raise HostMemoryError unless ``nbytes`` plus the headroom fits in available host memory."""
    avail = available_host_bytes()
    need = nbytes + headroom_gib * _GIB
    if need > avail:
        raise HostMemoryError(
            f"expert store needs {nbytes / _GIB:.2f} GiB of host memory plus "
            f"{headroom_gib:.2f} GiB headroom (--lynx-host-headroom-gib), but only "
            f"{avail / _GIB:.2f} GiB is available (MemAvailable)"
        )
