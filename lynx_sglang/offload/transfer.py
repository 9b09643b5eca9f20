"""Host->slot copies on a dedicated CUDA stream, one event per slot fill; plain ``copy_`` on CPU.

Ordering rules (why no synchronize is needed):
- each batch of fills first makes the copy stream wait for the work already queued on the
  compute stream, so a slot is never overwritten while an earlier kernel may still read it;
- the compute stream waits only on the events of the slots a step uses.
"""

from __future__ import annotations

import torch


class TransferEngine:
    """Issues expert fills and tracks, per slot, the event of its latest fill."""

    def __init__(self, device: torch.device, num_slots: int) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device=device) if self.cuda else None
        # One reusable event per slot (re-recorded by every fill of that slot).
        self.events = [torch.cuda.Event() for _ in range(num_slots)] if self.cuda else []
        self._pending = [False] * num_slots  # filled since the compute stream last waited

    def begin(self) -> None:
        """Order the next fills after everything already queued on the compute stream."""
        if self.cuda:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))

    def fill(self, slot: int, dst: list[torch.Tensor], src: list[torch.Tensor]) -> None:
        """Copy one expert (one host view per named tensor) into its slot views."""
        if not self.cuda:
            for d, s in zip(dst, src):
                d.copy_(s)
            return
        with torch.cuda.stream(self.stream):
            for d, s in zip(dst, src):
                d.copy_(s, non_blocking=True)
            self.events[slot].record(self.stream)
        self._pending[slot] = True

    def wait(self, slots: list[int]) -> None:
        """Make the compute stream wait for the fills of these slots (only those still pending)."""
        if not self.cuda:
            return
        compute = torch.cuda.current_stream(self.device)
        for s in slots:
            if self._pending[s]:
                compute.wait_event(self.events[s])
                self._pending[s] = False

    def in_flight(self, slot: int) -> bool:
        """True while a fill of ``slot`` may still be running (non-blocking query)."""
        return self.cuda and not self.events[slot].query()
