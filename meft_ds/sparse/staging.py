"""Host staging of the sparse adapter's transfers, so the compute device never waits.

Every copy between the host and a CUDA device goes through a pinned staging buffer on a
side stream, ``non_blocking``, and is ordered by events, never by a host wait on the
compute thread:

- device -> host (a layer's hidden states and expert ids for selection, the rows'
  gradient in backward): :meth:`Staging.to_host` queues the copies behind the compute
  stream's work so far and returns a :class:`HostCopy`; whoever needs the values waits
  for its event. Only the default (non-prefetch) selection waits on the compute thread:
  the host needs the hidden states before it can choose rows (one sync per layer); the
  prefetch worker and the gradient receiver wait on their own threads.
- host -> device (rows): gathered into a staging buffer and copied on a side stream;
  the buffer goes back to the pool with the copy's event and is reused only once that
  event has passed (:meth:`StagingPool.take` asks, never waits).

Buffers come from a :class:`StagingPool`: taken for one transfer, given back when their
consumer is done, sizes rounded up to a power of two (working sets vary per micro-batch
and pinning is slow), so in steady state a few buffers are reused (double buffering
falls out: a buffer whose copy is still in flight is not handed out, another one is).

On a CPU device the same code runs: buffers are ordinary memory, events are done when
recorded (:class:`~meft_ds.sparse.sync_count.DeviceEvent`), copies are immediate.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch

from meft_ds.sparse.sync_count import DeviceEvent, register_staging

_ALIGN = 64  # bytes: each staged tensor starts aligned for any dtype and vector loads


def _round_up(n: int, to: int) -> int:
    return (n + to - 1) // to * to


class StagingPool:
    """Reusable host buffers (pinned when the device is a GPU), handed out per transfer."""

    def __init__(self, pinned: bool) -> None:
        self.pinned = pinned
        self._free: list[tuple[torch.Tensor, DeviceEvent | None]] = []
        self._lock = threading.Lock()
        self.allocated_bytes = 0

    def take(self, nbytes: int) -> torch.Tensor:
        """A ``uint8`` buffer of at least ``nbytes`` whose last copy has finished (asked
        without waiting: a buffer still in flight is passed over, a new one made)."""
        with self._lock:
            for i, (buffer, after) in enumerate(self._free):
                if buffer.numel() >= nbytes and (after is None or after.query()):
                    del self._free[i]
                    return buffer
        size = 1 << max(12, (nbytes - 1).bit_length())
        buffer = torch.empty(size, dtype=torch.uint8, pin_memory=self.pinned)
        register_staging(buffer)
        with self._lock:
            self.allocated_bytes += size
        return buffer

    def give(self, buffer: torch.Tensor, after: DeviceEvent | None = None) -> None:
        """Return ``buffer``; it is reused once ``after`` (a copy out of it) has passed."""
        with self._lock:
            self._free.append((buffer, after))
            self._free.sort(key=lambda item: item[0].numel())  # smallest fitting first


def _views(buffer: torch.Tensor, specs: list[tuple[torch.Size, torch.dtype]]
           ) -> list[torch.Tensor]:
    views, offset = [], 0
    for shape, dtype in specs:
        nbytes = shape.numel() * dtype.itemsize
        views.append(buffer[offset:offset + nbytes].view(dtype).view(shape))
        offset = _round_up(offset + nbytes, _ALIGN)
    return views


def staged_bytes(specs: list[tuple[torch.Size, torch.dtype]]) -> int:
    return sum(_round_up(shape.numel() * dtype.itemsize, _ALIGN) for shape, dtype in specs)


@dataclass
class HostCopy:
    """Tensors on their way to the host, in one staging buffer."""

    views: list[torch.Tensor]
    event: DeviceEvent
    buffer: torch.Tensor
    pool: StagingPool
    released: bool = field(default=False)

    def wait(self) -> list[torch.Tensor]:
        """The host tensors (views of the buffer), after the copy is done: a host wait
        (a sync point when made on the compute thread)."""
        self.event.synchronize()
        return self.views

    def release(self) -> None:
        """The views are no longer read: the buffer goes back to the pool."""
        if not self.released:
            self.released = True
            self.pool.give(self.buffer)


class Staging:
    """The staging pool and side streams of one device (see the module docstring)."""

    def __init__(self) -> None:
        self._pools: dict[bool, StagingPool] = {}
        self._streams: dict[tuple[str, torch.device], torch.cuda.Stream] = {}

    def pool(self, device: torch.device) -> StagingPool:
        pinned = device.type == "cuda"
        if pinned not in self._pools:
            self._pools[pinned] = StagingPool(pinned)
        return self._pools[pinned]

    def stream(self, kind: str, device: torch.device) -> torch.cuda.Stream:
        """The side CUDA stream of ``kind`` (``"h2d"`` / ``"d2h"``) copies on ``device``."""
        key = (kind, device)
        if key not in self._streams:
            self._streams[key] = torch.cuda.Stream(device)
        return self._streams[key]

    def to_host(self, tensors: list[torch.Tensor]) -> HostCopy:
        """Queue copies of device ``tensors`` into one staging buffer, without blocking:
        behind the compute stream's work so far, on the side stream (CUDA)."""
        device = tensors[0].device
        specs = [(t.shape, t.dtype) for t in tensors]
        pool = self.pool(device)
        buffer = pool.take(staged_bytes(specs))
        views = _views(buffer, specs)
        event = DeviceEvent(device)
        if device.type == "cuda":
            stream = self.stream("d2h", device)
            stream.wait_stream(torch.cuda.current_stream(device))  # the values are ready
            with torch.cuda.stream(stream):
                for view, tensor in zip(views, tensors, strict=True):
                    view.copy_(tensor, non_blocking=True)
                    tensor.record_stream(stream)  # not reused before the copy is done
            event.record(stream)
        else:
            for view, tensor in zip(views, tensors, strict=True):
                view.copy_(tensor, non_blocking=True)
            event.record()
        return HostCopy(views, event, buffer, pool)

    def to_device(self, host: torch.Tensor, device: torch.device, release: HostBuffer
                  ) -> tuple[torch.Tensor, DeviceEvent]:
        """Copy the staged ``host`` tensor to ``device`` on the side stream; returns it and
        the copy's event (the compute stream must wait for it). ``release`` gives the
        staging buffer back, reusable after that event."""
        stream = self.stream("h2d", device)
        with torch.cuda.stream(stream):
            out = host.to(device, non_blocking=True)
        event = DeviceEvent(device).record(stream)
        release.pool.give(release.buffer, after=event)
        return out, event


@dataclass
class HostBuffer:
    """A staging buffer taken for a host -> device copy."""

    buffer: torch.Tensor
    pool: StagingPool

    def view(self, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        return _views(self.buffer, [(shape, dtype)])[0]
