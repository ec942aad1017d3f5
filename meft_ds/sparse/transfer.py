"""Host<->device traffic of the sparse adapter's working sets.

Rows go to the device per layer and micro-batch: hot rows from the layer's device cache,
the others gathered from the CPU store into a staging buffer and copied on a side CUDA
stream that the compute stream then waits for (device side: no host wait). Row
gradients come back to the host without blocking backward: copied ``non_blocking`` into
a staging buffer and received (waited for, unscaled to fp32, queued in the store) by a
receiver thread, which frees the buffer at once (the eager row update, on its own
thread, first waits for its layer's receipts); on a CPU device the copy is done at once
and received inline. See :mod:`meft_ds.sparse.staging`.
Everything moved is counted in the step's figures.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from meft_ds.sparse.cache import LayerCache, Moved
from meft_ds.sparse.counters import StepCounters
from meft_ds.sparse.options import SparseSizes
from meft_ds.sparse.staging import HostBuffer, HostCopy, Staging
from meft_ds.sparse.sync_count import DeviceEvent


class RowTransfer:
    """Copies of store rows to a device and of row gradients back to the host."""

    def __init__(self, store, sizes: SparseSizes, counters: StepCounters,
                 cache_for: Callable[[int, torch.device], LayerCache | None]) -> None:
        self.store = store
        self.sizes = sizes
        self.counters = counters
        self._cache_for = cache_for  # the layer's hot-row cache (None: off)
        self.staging = Staging()
        self._staging_done: dict[int, DeviceEvent] = {}
        self._receiver: ThreadPoolExecutor | None = None
        self._receiving: dict[int, list[Future]] = {}  # per layer, in submission order
        # receive row gradients on the receiver thread: on CUDA (the copy is in flight);
        # None = by the device, True/False forces it (tests of the threaded path on CPU)
        self.receive_async: bool | None = None

    def fetch(
        self, layer: int, rows: torch.Tensor, device: torch.device, dtype: torch.dtype,
        count: bool = True, wait: bool = True,
    ) -> torch.Tensor:
        """The rows ``[U, 2d]`` of ``layer`` on ``device`` (a leaf without grad): hot rows
        from the cache, the others copied from the store. ``wait=False`` (a worker
        thread): the caller's compute stream has not been made to wait for the copy yet
        (:meth:`await_copy` does that)."""
        start = time.perf_counter()
        cache = self._cache_for(layer, device)
        if cache is None or not cache.size:
            working = self._transfer(layer, rows, device, dtype)
            cold = rows.numel()
        else:
            hot_pos, slots, cold_pos = cache.split(rows)
            cold = cold_pos.numel()
            working = torch.empty(rows.numel(), 2 * self.sizes.hidden, dtype=dtype, device=device)
            if cold:
                moved = self._transfer(layer, rows[cold_pos], device, dtype)
                self.await_copy(layer, moved)
                working.index_copy_(0, cold_pos.to(device, non_blocking=True), moved)
            if hot_pos.numel():
                working.index_copy_(
                    0, hot_pos.to(device, non_blocking=True), cache.gather(slots, dtype)
                )
            if device.type == "cuda":  # what await_copy waits for: the assembled set
                assembled = DeviceEvent(device).record(torch.cuda.current_stream(device))
                self._staging_done[layer] = assembled
        if count:
            counters = self.counters
            if cache is not None:
                cache.note_selected(rows)
                counters.add("cache_hits", rows.numel() - cold)
                counters.add("cache_misses", cold)
            counters.add_rows(layer, rows.numel())
            counters.add("rows_moved", cold)
            elements = cold * 2 * self.sizes.hidden
            counters.moved("h2d", Moved(elements, elements * working.element_size()))
            counters.add("fetch_s", time.perf_counter() - start)
        if wait:
            self.await_copy(layer, working)
        return working

    def await_copy(self, layer: int, working: torch.Tensor) -> None:
        """Make the current CUDA stream wait for ``layer``'s last row copy, and keep
        ``working`` alive until that stream is done with it (nothing on the CPU)."""
        done = self._staging_done.get(layer)
        if working.device.type != "cuda" or done is None:
            return
        stream = torch.cuda.current_stream(working.device)
        done.wait(stream)
        working.record_stream(stream)

    def grad_to_store(self, layer: int, rows: torch.Tensor, grad: torch.Tensor,
                      loss_scale: float) -> None:
        """Queue ``grad`` (the gradient of ``layer``'s cold ``rows``, on the device) into the
        store in fp32, divided by the ``loss_scale`` it still carries. Backward does not
        wait: the copy is queued ``non_blocking`` and received on the receiver thread
        (CUDA; :meth:`received` waits for it) or inline (CPU)."""
        copy = self.staging.to_host([grad])
        self.counters.moved("d2h", Moved.of(grad))

        def receive() -> None:  # the store's pending list keeps the submission order
            self.store.add_grad(layer, rows, _received(copy, loss_scale))

        threaded = self.receive_async
        if threaded is None:
            threaded = grad.device.type == "cuda"
        if threaded:
            if self._receiver is None:
                self._receiver = ThreadPoolExecutor(1, thread_name_prefix="sparse-receive")
            future = self._receiver.submit(receive)  # one thread: a layer's order is kept
            self._receiving.setdefault(layer, []).append(future)
        else:
            receive()

    def received(self, layer: int | None = None) -> None:
        """Wait until ``layer``'s (``None``: every layer's) queued row gradients are in the
        store, before it is read (the eager update's thread asks for its layer while the
        main thread may ask for all: waiting is idempotent, only ``None`` forgets them)."""
        if layer is not None:
            for future in list(self._receiving.get(layer, ())):
                future.result()
            return
        for key in list(self._receiving):
            for future in list(self._receiving.get(key, ())):
                future.result()
        self._receiving = {}

    def to_host(self, tensors: list[torch.Tensor]) -> HostCopy:
        """Queue copies of device ``tensors`` to the host (see
        :meth:`Staging.to_host <meft_ds.sparse.staging.Staging.to_host>`)."""
        return self.staging.to_host(tensors)

    def _transfer(
        self, layer: int, rows: torch.Tensor, device: torch.device, dtype: torch.dtype
    ) -> torch.Tensor:
        """Copy ``rows`` of the store to ``device`` (staged + async copy on CUDA; the
        compute stream waits for it in :meth:`await_copy`)."""
        if device.type != "cuda":
            return self.store.gather(layer, rows).to(dtype)
        shape = torch.Size((rows.numel(), 2 * self.sizes.hidden))
        pool = self.staging.pool(device)
        staged = HostBuffer(pool.take(shape.numel() * dtype.itemsize), pool)
        staged.view(shape, dtype).copy_(self.store.gather(layer, rows))
        working, done = self.staging.to_device(staged.view(shape, dtype), device, staged)
        self._staging_done[layer] = done
        return working


def _received(copy: HostCopy, loss_scale: float) -> torch.Tensor:
    """A staged gradient as a new fp32 host tensor (out of the staging buffer, which goes
    back to the pool), divided by ``loss_scale``. Waits only for a copy still in flight
    (a CPU device's is done: received inline, backward does not wait there either)."""
    (host,) = copy.views if copy.event.query() else copy.wait()
    grad = host.to(torch.float32, copy=True)
    copy.release()
    if loss_scale != 1.0:
        grad.div_(loss_scale)
    return grad
