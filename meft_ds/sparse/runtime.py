"""Everything of the sparse adapter that lives outside the DeepSpeed engine.

:class:`SparseRuntime` owns the CPU :class:`~meft_ds.sparse.store.RowStore` and ties
together the parts that each do one job:

- :mod:`~meft_ds.sparse.transfer`: each layer's working set of rows to the device
  (through a pinned staging buffer when the device is a GPU), the rows' gradients from
  the adapter's backward back to the host;
- :mod:`~meft_ds.sparse.step`: the store's :class:`~meft_ds.sparse.optim.RowAdamW` step
  once per optimizer step (coalescing, gradient norm, clipping, loss scale);
- :mod:`~meft_ds.sparse.counters`: what moved and what was updated (rows, bytes each
  way, seconds), reported per step.

The runtime itself selects rows, runs the prefetch worker, keeps the hot-row caches and
routes gradients between the caches and the store.

Optional parts:

- the device-resident hot-row cache (``--sparse_cache_rows``, :mod:`meft_ds.sparse.cache`):
  hot rows are served, accumulated and updated on the device;
- the eager row update (``--sparse_eager_update``, :mod:`meft_ds.sparse.eager`): in the
  last micro-batch of a step, a layer's cold rows are updated by a background thread as
  soon as that layer's row gradients are complete, while backward goes on through the
  earlier layers; the step then only waits for the thread. With gradient clipping the
  update is speculative and rolled back when the step clips. A layer must produce its
  row gradient once per micro-batch (one adapter call with grad; recomputations reuse
  the forward's decision, see :mod:`meft_ds.sparse.adapter`).

Ordering of selection and routing relative to the layer's compute:

- default: a layer routes and selects from its FFN input, i.e. after its attention
  block, and its rows are fetched right then (synchronously on the CPU; on a GPU the
  copy runs on a side stream from a pinned staging buffer, and the compute stream
  waits for it); the host waits for the hidden states' copy: the layer's one host
  synchronisation point (:mod:`meft_ds.sparse.staging`);
- ``--sparse_prefetch``: a layer routes and selects from its *attention* input put
  through its FFN norm (the residual stream changes little across one attention block),
  before the attention runs. :meth:`SparseRuntime.prefetch` queues the copy of the
  hidden states to the host on the calling thread (``non_blocking``, a few KB) and hands
  the wait for it, selection and row fetch to a worker thread, so the CPU's key scoring,
  the gather of the rows into the staging buffer and their copy to the device overlap
  the layer's attention; the FFN adapter then waits for the result
  (``prefetch_wait_s``). The router's gates are still computed
  from the exact FFN input, so the router gets the same kind of gradient. Only the
  selection differs from the default (it is approximate), and the working set is the
  same function of the selection. Not with the sharded store (its selection is
  collective communication, which must not run beside the main thread's).
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from meft_ds import dist as mdist
from meft_ds.precision import DTYPES
from meft_ds.sparse.cache import LayerCache, Moved, cache_capacity
from meft_ds.sparse.counters import StepCounters
from meft_ds.sparse.diagnostics import Usage
from meft_ds.sparse.eager import EagerRowUpdate
from meft_ds.sparse.optim import RowAdamW
from meft_ds.sparse.options import SparseOptions, SparseSizes
from meft_ds.sparse.router import Selection
from meft_ds.sparse.sharded import make_store
from meft_ds.sparse.staging import HostCopy
from meft_ds.sparse.step import RowStep, engine_loss_scale
from meft_ds.sparse.transfer import RowTransfer


class SparseRuntime:
    """CPU row store + its optimizer + the host<->device traffic of the working sets."""

    def __init__(self, options: SparseOptions, sizes: SparseSizes) -> None:
        self.options = options
        self.sizes = sizes
        self.store = make_store(options, sizes)  # replicated or sharded (meft_ds.sparse.sharded)
        self.generation = 0
        self.token_mask: torch.Tensor | None = None
        self.continuing = False  # this call extends the sequences of the last (KV cache)
        self.calibration: dict[int, torch.Tensor] | None = None  # layer -> row_sum, while
        # SparseMethod.calibrate runs
        self.engine = None
        self.group = None
        self.caches: dict[int, LayerCache] = {}
        self._cache_rows = cache_capacity(options.sparse_cache_rows, sizes.rank)
        self.counters = StepCounters()
        self.transfer = RowTransfer(self.store, sizes, self.counters, self.cache)
        self.stepper = RowStep(options, sizes, self.store, self.counters, self.caches,
                               self.transfer.received)
        self._prefetcher: ThreadPoolExecutor | None = None
        self._tokens: tuple[int, torch.Tensor | None] | None = None  # (generation, on device)
        self._mask_copy: HostCopy | None = None
        self._host_mask: torch.Tensor | None = None  # the micro-batch's mask, from the host
        self._noted_mask: torch.Tensor | None = None  # given by :meth:`note_host_mask`
        self.usage: Usage | None = None  # row/expert counts (meft_ds.sparse.diagnostics)

    def row_optimizer(self) -> RowAdamW:
        """The store's AdamW, made on first use (inference never builds its kernel)."""
        return self.stepper.row_optimizer()

    @property
    def eager(self) -> EagerRowUpdate:
        """The eager row update (made on first use; see :mod:`meft_ds.sparse.eager`)."""
        return self.stepper.eager

    # --- per micro-batch --------------------------------------------------------------
    def begin_micro_batch(self, attention_mask: torch.Tensor | None,
                          continuing: bool = False) -> None:
        """A new micro-batch (``continuing``: the next tokens of the last call's sequences,
        decoded with a KV cache): new row selections; padding tokens select no rows. The
        mask starts its way to the host now, ahead of the model's work (see
        :meth:`active_tokens`)."""
        self.generation += 1
        self.token_mask = attention_mask
        self.continuing = continuing
        if self._mask_copy is not None:
            self._mask_copy.release()
        self._mask_copy = None
        noted, self._noted_mask = self._noted_mask, None
        self._host_mask = noted if attention_mask is not None and noted is not None and (
            noted.shape == attention_mask.shape) else None
        if attention_mask is not None and self._host_mask is None:
            self._mask_copy = self.transfer.to_host([attention_mask.detach()])

    def note_host_mask(self, mask: torch.Tensor | None) -> None:
        """The host copy of the attention mask the next forward gets (the batch before it
        was sent to the device): that micro-batch's padding is then found without waiting
        for a copy back. Used once, by the next :meth:`begin_micro_batch`."""
        self._noted_mask = None if mask is None else mask.detach()

    def active_tokens(self, shape: torch.Size, device: torch.device) -> torch.Tensor | None:
        """Indices of this micro-batch's non-padding tokens on ``device`` (``None``: all of
        them, or no mask of ``shape`` = the hidden states' ``[B, S]``). Found once per
        micro-batch, on the host, and shared by every layer: one host wait per
        micro-batch, on a copy queued before the model's forward began (on a GPU long
        done by the first layer), instead of a ``bool(mask.all())`` and a ``nonzero`` on
        the device per layer, which wait for all the work queued before them."""
        mask = self.token_mask
        if mask is None or tuple(mask.shape) != tuple(shape):
            return None
        if self._tokens is None or self._tokens[0] != self.generation:
            host, copy = self._host_mask, None  # the caller's host mask: no wait
            if host is None:
                copy = self._mask_copy
                if copy is None or copy.released:  # (a mask set without begin_micro_batch)
                    copy = self.transfer.to_host([mask.detach()])
                (host,) = copy.wait()
            tokens = host.reshape(-1).nonzero().squeeze(1)  # a host op
            if copy is not None:
                copy.release()
            if tokens.numel() == mask.numel():
                tokens = None
            else:  # sent once (pageable: copied out before the call returns)
                tokens = tokens.to(device, non_blocking=True)
            self._tokens = (self.generation, tokens)
        return self._tokens[1]

    def working_dtype(self, hidden_dtype: torch.dtype) -> torch.dtype:
        wanted = self.options.sparse_working_dtype
        return hidden_dtype if wanted == "auto" else DTYPES[wanted]

    def select(
        self, layer: int, hidden: torch.Tensor, experts: torch.Tensor, count: bool = True
    ) -> Selection:
        """Top-K rows per token for ``hidden`` ``[T, d]`` routed to ``experts`` ``[T, E]``
        (device tensors): the host waits for their copy, the one sync point of a layer
        that the method needs (the host chooses the rows).

        ``count``: add to the step's figures (training calls; evaluation is not counted)."""
        start = time.perf_counter()
        copy = self.transfer.to_host([hidden.detach(), experts])
        try:
            return self._select(layer, *copy.wait(), count, start)
        finally:
            copy.release()

    def _select(self, layer: int, hidden_cpu: torch.Tensor, experts_cpu: torch.Tensor,
                count: bool, start: float) -> Selection:
        """:meth:`select` on host tensors (views of a staging buffer, read only here)."""
        selection = self.store.select(layer, hidden_cpu, experts_cpu)
        if count:
            if self.usage is not None:
                self.usage.add_selection(layer, experts_cpu, selection, hidden_cpu)
            self.counters.moved("d2h", Moved.of(hidden_cpu) + Moved.of(experts_cpu))
            self.counters.add("select_s", time.perf_counter() - start)
            self.counters.add("tokens", hidden_cpu.shape[0])
        return selection

    def prefetch(
        self, layer: int, hidden: torch.Tensor, experts: torch.Tensor, dtype: torch.dtype,
        count: bool = True,
    ) -> Future:
        """Select and fetch ``layer``'s rows for ``hidden`` on a worker thread (see the
        module docstring); :meth:`take` waits for the ``(selection, working)`` result."""
        device = hidden.device
        # queued on this thread (ordered after its producer), waited for by the worker
        copy = self.transfer.to_host([hidden.detach(), experts])
        if self._prefetcher is None:
            self._prefetcher = ThreadPoolExecutor(1, thread_name_prefix="sparse-prefetch")

        def work() -> tuple[Selection, torch.Tensor]:
            start = time.perf_counter()
            try:
                selection = self._select(layer, *copy.wait(), count, start)
            finally:
                copy.release()
            working = self.fetch(layer, selection.rows, device, dtype, count=count, wait=False)
            return selection, working

        if count:
            self.counters.add("prefetched_layers", 1)
        return self._prefetcher.submit(work)

    def take(
        self, layer: int, future: Future, count: bool = True
    ) -> tuple[Selection, torch.Tensor]:
        """The result of :meth:`prefetch`, ready for this thread's compute stream."""
        start = time.perf_counter()
        selection, working = future.result()
        self.transfer.await_copy(layer, working)
        if count:
            self.counters.add("prefetch_wait_s", time.perf_counter() - start)
        return selection, working

    def fetch(
        self, layer: int, rows: torch.Tensor, device: torch.device, dtype: torch.dtype,
        count: bool = True, wait: bool = True,
    ) -> torch.Tensor:
        """The rows ``[U, 2d]`` of ``layer`` on ``device`` (see
        :meth:`RowTransfer.fetch <meft_ds.sparse.transfer.RowTransfer.fetch>`)."""
        return self.transfer.fetch(layer, rows, device, dtype, count=count, wait=wait)

    def cache(self, layer: int, device: torch.device) -> LayerCache | None:
        """The layer's hot-row cache (made on first use), ``None`` when it is off."""
        if not self._cache_rows or mdist.world_size(self.group) > 1:
            return None
        cache = self.caches.get(layer)
        if cache is None:
            cache = LayerCache(self._cache_rows, self.sizes.rank, 2 * self.sizes.hidden, device)
            self.caches[layer] = cache
        return cache

    def add_row_grad(self, layer: int, rows: torch.Tensor, grad: torch.Tensor) -> None:
        """Take ``dW`` of a working set (``[U, 2d]`` on the device) back to the store;
        hot rows' part stays in the cache."""
        start = time.perf_counter()
        grad = grad.detach()
        cache = self.caches.get(layer)
        if cache is not None and cache.size:
            hot_pos, slots, cold_pos = cache.split(rows)
            if hot_pos.numel():
                hot = grad.index_select(0, hot_pos.to(grad.device, non_blocking=True))
                scale = self.loss_scale()
                cache.add_grad(slots, hot.float() / scale if scale != 1.0 else hot)
            if cold_pos.numel() < rows.numel():
                rows = rows[cold_pos]
                grad = grad.index_select(0, cold_pos.to(grad.device, non_blocking=True))
        if rows.numel():  # backward does not wait for the copy (meft_ds.sparse.transfer)
            self.transfer.grad_to_store(layer, rows, grad, self.loss_scale())
            self.stepper.grads_arrived()
        self.stepper.eager_submit(layer)
        self.counters.add("grad_s", time.perf_counter() - start)

    # --- per optimizer step (meft_ds.sparse.step) --------------------------------------
    def loss_scale(self) -> float:
        """fp16 engines scale the loss: the store's gradients are unscaled as they come."""
        return engine_loss_scale(self.engine)

    def grads(self) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """The coalesced (and, data-parallel, averaged) gradients of this step's cold
        rows (layers already updated eagerly have none left)."""
        return self.stepper.grads(self.group)

    def zero_grad(self) -> None:
        """Drop the row gradients gathered since the last step, without an update."""
        self.stepper.zero_grad()

    def grad_sq_norm(self) -> float:
        """Squared norm of all row gradients of this step: cold, hot and eager layers."""
        return self.stepper.grad_sq_norm(self.group)

    def step(self, lr: float, clip_coef: float = 1.0, skip: bool = False,
             loss_scale: float = 1.0) -> None:
        """Step the store (see :meth:`RowStep.step <meft_ds.sparse.step.RowStep.step>`)."""
        self.stepper.step(self.group, lr, clip_coef, skip=skip, loss_scale=loss_scale)
        # The rows changed: no cached selection or working set may be reused.
        self.generation += 1

    def metrics(self) -> dict[str, float]:
        """Figures of the last completed step (see
        :meth:`StepCounters.metrics <meft_ds.sparse.counters.StepCounters.metrics>`)."""
        return self.counters.metrics()

    # --- cache state for checkpoints --------------------------------------------------
    def flush(self) -> None:
        """Write the cached rows' current state into the store (before save / export)."""
        self.stepper.wait_eager()
        for layer, cache in self.caches.items():
            cache.flush(self.store.layers[layer])

    def cache_state(self) -> dict:
        return {layer: cache.state_dict() for layer, cache in self.caches.items()}

    def load_cache_state(self, state: dict | None) -> None:
        """After the store was loaded: cache ``state``'s rows again (or drop the cache)."""
        for cache in self.caches.values():
            cache.reset()
        for layer, saved in (state or {}).items():
            if layer not in self.store.layers:
                continue
            cache = self.cache(layer, self._cache_device())
            if cache is not None:
                cache.load_state_dict(saved, self.store.layers[layer])
        self.generation += 1

    def _cache_device(self) -> torch.device:
        for cache in self.caches.values():
            return cache.device
        device = getattr(self.engine, "device", None)
        if isinstance(device, torch.device):
            return device
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")
