"""Host<->device traffic of the sparse adapter's working sets.

Rows go to the device per layer and micro-batch: hot rows from the layer's device cache,
the others gathered from the CPU store (on a GPU through a pinned staging buffer and a
side CUDA stream that the compute stream then waits for). Row gradients come back to the
host, unscaled. Everything moved is counted in the step's figures.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from meft_ds.sparse.cache import LayerCache, Moved
from meft_ds.sparse.counters import StepCounters
from meft_ds.sparse.options import SparseSizes


class RowTransfer:
    """Copies of store rows to a device and of row gradients back to the host."""

    def __init__(self, store, sizes: SparseSizes, counters: StepCounters,
                 cache_for: Callable[[int, torch.device], LayerCache | None]) -> None:
        self.store = store
        self.sizes = sizes
        self.counters = counters
        self._cache_for = cache_for  # the layer's hot-row cache (None: off)
        self._staging: dict[int, torch.Tensor] = {}
        self._staging_done: dict[int, torch.cuda.Event] = {}
        self._h2d_stream: torch.cuda.Stream | None = None

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
                assembled = torch.cuda.Event()
                assembled.record(torch.cuda.current_stream(device))
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
        stream.wait_event(done)
        working.record_stream(stream)

    def grad_to_host(self, grad: torch.Tensor, loss_scale: float) -> torch.Tensor:
        """``grad`` (a working set's cold rows' gradient) on the host in fp32, divided by
        the ``loss_scale`` it still carries."""
        host = grad.to("cpu")
        self.counters.moved("d2h", Moved.of(host))
        host = host.float()
        if loss_scale != 1.0:
            host.div_(loss_scale)
        return host

    def _transfer(
        self, layer: int, rows: torch.Tensor, device: torch.device, dtype: torch.dtype
    ) -> torch.Tensor:
        """Copy ``rows`` of the store to ``device`` (pinned staging + async copy on CUDA)."""
        if device.type == "cuda":
            staged = self._stage(layer, rows, dtype)
            stream = self._copy_stream(device)
            with torch.cuda.stream(stream):
                working = staged.to(device, non_blocking=True)
                done = torch.cuda.Event()
                done.record(stream)
            self._staging_done[layer] = done  # the compute stream waits in await_copy
            return working
        return self.store.gather(layer, rows).to(dtype)

    def _copy_stream(self, device: torch.device) -> torch.cuda.Stream:
        """The side CUDA stream of host->device row copies (made on first use)."""
        if self._h2d_stream is None:
            self._h2d_stream = torch.cuda.Stream(device)
        return self._h2d_stream

    def _stage(self, layer: int, rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Gather ``rows`` into the layer's pinned staging buffer (grown on demand), after
        the previous copy out of that buffer has finished."""
        done = self._staging_done.pop(layer, None)
        if done is not None:
            done.synchronize()
        width = 2 * self.sizes.hidden
        need = rows.numel() * width
        buffer = self._staging.get(layer)
        if buffer is None or buffer.numel() < need or buffer.dtype != dtype:
            # grown geometrically: working sets vary per micro-batch, and pinning is slow
            size = max(need, 2 * buffer.numel()) if buffer is not None else need
            buffer = torch.empty(size, dtype=dtype, pin_memory=True)
            self._staging[layer] = buffer
        staged = buffer[:need].view(rows.numel(), width)
        staged.copy_(self.store.gather(layer, rows))
        return staged
