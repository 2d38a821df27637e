"""Pinned staging buffers and the pipeline that moves copy plans into CUDA parameters.

The Rust copy threads fill staging buffers from the checkpoint in the background (GIL
released), a few windows ahead, while filled buffers are copied to the GPU asynchronously on
a dedicated stream. A CUDA event per buffer keeps a fill from overwriting a buffer whose
transfer is still running. Host memory beyond the pool stays constant, whatever the
checkpoint size.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from . import _fastmoe_load as native
from ._fastmoe_load import RequestError
from .progress import Progress

# Plans cut their work into operations of at most 1 MiB; a window holds at least one.
MIN_BUFFER_BYTES = 1 << 20
DEFAULT_BUFFER_BYTES = 64 << 20
DEFAULT_BUFFER_COUNT = 6


# Windows that share a buffer start on this boundary, which transfers prefer.
_ALIGN = 512


@dataclass(frozen=True)
class Destination:
    """One parameter to fill and the plan that fills it. A plan in the stored order of a
    transposed group (`stored` = "w13", "w13_pairs" or "w2", see `loader._transpose_stored`)
    lands in scratch memory on the destination's device and is transposed there; so does a
    plan whose bytes are of another dtype (`cast_from`, the checkpoint's), converted there."""

    name: str
    tensor: torch.Tensor
    plan: native.CopyPlan
    stored: str | None = None
    cast_from: torch.dtype | None = None
    # gate and up rows alternate in the destination (a stored-order w13 only).
    interleaved: bool = False


@dataclass
class _Batch:
    """A staging buffer and the windows filled into it, each bound for its destination."""

    buffer: torch.Tensor
    event: torch.cuda.Event
    used: int = 0
    parts: list[tuple[Any, torch.Tensor, torch.Tensor]] = field(default_factory=list)


class StagingPool:
    """`count` pinned host buffers of `buffer_bytes` each, allocated on first use and reused
    across loads and layers until `close()`."""

    def __init__(
        self, buffer_bytes: int = DEFAULT_BUFFER_BYTES, count: int = DEFAULT_BUFFER_COUNT
    ) -> None:
        if buffer_bytes < MIN_BUFFER_BYTES or count < 2:
            raise RequestError(
                f"a staging pool needs at least 2 buffers of at least {MIN_BUFFER_BYTES} bytes, "
                f"got {count} of {buffer_bytes}"
            )
        self.buffer_bytes = buffer_bytes
        self.count = count
        self._buffers: list[torch.Tensor] = []
        self._events: list[torch.cuda.Event] = []
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self._next = 0

    @property
    def nbytes(self) -> int:
        """Pinned host memory held now."""
        return sum(b.numel() for b in self._buffers)

    def _stream(self, device: torch.device) -> torch.cuda.Stream:
        stream = self._streams.get(device)
        if stream is None:
            stream = self._streams[device] = torch.cuda.Stream(device)
        return stream

    def _acquire(self) -> tuple[torch.Tensor, torch.cuda.Event]:
        if not self._buffers:
            self._buffers = [
                torch.empty(self.buffer_bytes, dtype=torch.uint8, pin_memory=True)
                for _ in range(self.count)
            ]
            self._events = [torch.cuda.Event() for _ in range(self.count)]
        k = self._next
        self._next = (k + 1) % self.count
        self._events[k].synchronize()  # the transfer that last read this buffer is done
        return self._buffers[k], self._events[k]

    def fill(self, destinations: Sequence[Destination], progress: Progress | None = None) -> None:
        """Executes the plans into CUDA destinations. On return the work is queued so that
        the caller's current stream sees the finished parameters. `progress` advances as
        each buffer's fills complete."""
        device = destinations[0].tensor.device
        caller = torch.cuda.current_stream(device)
        stream = self._stream(device)
        stream.wait_stream(caller)  # destinations may still be in use on the caller's stream
        # Fills run on the copy threads in the background, up to count - 1 buffers ahead of
        # the transfers, so that the threads go from one window to the next without waiting
        # for this loop. Small windows (small tensors) share a buffer. A buffer is refilled
        # only once the transfers that read it are done.
        pending: deque[_Batch] = deque()
        batch: _Batch | None = None

        def transfer_oldest() -> None:
            oldest = pending.popleft()
            for ticket, source, _ in oldest.parts:
                ticket.wait()
                if progress is not None:
                    progress.advance(source.numel())
            with torch.cuda.stream(stream):
                for _, source, target in oldest.parts:
                    target.copy_(source, non_blocking=True)
                oldest.event.record(stream)

        for d in destinations:
            dst = d.tensor.view(-1).view(torch.uint8)
            for start, end in d.plan.windows(self.buffer_bytes):
                if batch is None or batch.used + (end - start) > self.buffer_bytes:
                    if batch is not None:
                        pending.append(batch)
                        if len(pending) >= self.count - 1:
                            transfer_oldest()
                    batch = _Batch(*self._acquire())
                at = batch.used
                ticket = d.plan.submit(batch.buffer.data_ptr() + at, start, end, batch.buffer)
                batch.parts.append((ticket, batch.buffer[at : at + end - start], dst[start:end]))
                batch.used = -(-(at + end - start) // _ALIGN) * _ALIGN
            # Keep the caching allocator from reusing the parameter's memory before the
            # copies on our stream are done, should the caller free it early.
            d.tensor.record_stream(stream)
        if batch is not None:
            pending.append(batch)
        while pending:
            transfer_oldest()
        caller.wait_stream(stream)

    def close(self) -> None:
        """Waits for transfers in flight and frees the pinned memory."""
        for event in self._events:
            event.synchronize()
        self._buffers, self._events, self._streams = [], [], {}
