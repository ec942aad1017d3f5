"""Everything of the sparse adapter that lives outside the DeepSpeed engine.

:class:`SparseRuntime` owns the CPU :class:`~meft_ds.sparse.store.RowStore` and its
:class:`~meft_ds.sparse.optim.RowAdamW`, moves each layer's working set of rows to the
device (through a pinned staging buffer when the device is a GPU), takes the rows'
gradients back from the adapter's backward, and steps the store once per
optimizer step. It also counts what moved (rows, bytes each way, rows updated).

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
  waits for it);
- ``--sparse_prefetch``: a layer routes and selects from its *attention* input put
  through its FFN norm (the residual stream changes little across one attention block),
  before the attention runs. :meth:`SparseRuntime.prefetch` copies the hidden states to
  the host on the calling thread (a few KB) and hands selection and row fetch to a
  worker thread, so the CPU's key scoring, the gather of the rows into the staging
  buffer and their copy to the device overlap the layer's attention; the FFN adapter
  then waits for the result (``prefetch_wait_s``). The router's gates are still computed
  from the exact FFN input, so the router gets the same kind of gradient. Only the
  selection differs from the default (it is approximate), and the working set is the
  same function of the selection. Not with the sharded store (its selection is
  collective communication, which must not run beside the main thread's).
"""

from __future__ import annotations

import time
from collections import defaultdict
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from meft_ds import dist as mdist
from meft_ds.precision import DTYPES
from meft_ds.sparse.cache import LayerCache, Moved, cache_capacity
from meft_ds.sparse.diagnostics import Usage
from meft_ds.sparse.eager import EagerRowUpdate
from meft_ds.sparse.optim import RowAdamW
from meft_ds.sparse.options import SparseOptions, SparseSizes
from meft_ds.sparse.router import Selection
from meft_ds.sparse.sharded import make_store


class SparseRuntime:
    """CPU row store + its optimizer + the host<->device traffic of the working sets."""

    def __init__(self, options: SparseOptions, sizes: SparseSizes) -> None:
        self.options = options
        self.sizes = sizes
        self.store = make_store(options, sizes)  # replicated or sharded (meft_ds.sparse.sharded)
        self._optimizer: RowAdamW | None = None
        self.generation = 0
        self.token_mask: torch.Tensor | None = None
        self.engine = None
        self.group = None
        self._staging: dict[int, torch.Tensor] = {}
        self._staging_done: dict[int, torch.cuda.Event] = {}
        self._counters: dict[str, float] = defaultdict(float)
        self._last: dict[str, float] = {}
        self._grads: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None
        self.caches: dict[int, LayerCache] = {}
        self._cache_rows = cache_capacity(options.sparse_cache_rows, sizes.rank)
        self._rows_layer: dict[int, float] = defaultdict(float)
        self._last_rows_layer: list[float] = []
        self._eager: EagerRowUpdate | None = None
        self._prefetcher: ThreadPoolExecutor | None = None
        self.usage: Usage | None = None  # row/expert counts (meft_ds.sparse.diagnostics)

    def row_optimizer(self) -> RowAdamW:
        """The store's AdamW, made on first use (inference never builds its kernel)."""
        if self._optimizer is None:
            options = self.options
            self._optimizer = RowAdamW(
                backend=options.sparse_optimizer,
                betas=(options.sparse_beta1, options.sparse_beta2),
                eps=options.sparse_eps,
                weight_decay=options.sparse_weight_decay,
                key_lr_ratio=options.sparse_key_lr_ratio,
                key_width=self.sizes.hidden,
            )
        return self._optimizer

    @property
    def eager(self) -> EagerRowUpdate:
        """The eager row update (made on first use; see :mod:`meft_ds.sparse.eager`)."""
        if self._eager is None:
            self._eager = EagerRowUpdate(self.store, self.row_optimizer(),
                                         self.options.sparse_lr_ratio)
        return self._eager

    # --- per micro-batch --------------------------------------------------------------
    def begin_micro_batch(self, attention_mask: torch.Tensor | None) -> None:
        """A new micro-batch: new row selections; padding tokens select no rows."""
        self.generation += 1
        self.token_mask = attention_mask

    def working_dtype(self, hidden_dtype: torch.dtype) -> torch.dtype:
        wanted = self.options.sparse_working_dtype
        return hidden_dtype if wanted == "auto" else DTYPES[wanted]

    def select(
        self, layer: int, hidden: torch.Tensor, experts: torch.Tensor, count: bool = True
    ) -> Selection:
        """Top-K rows per token for ``hidden`` ``[T, d]`` routed to ``experts`` ``[T, E]``.

        ``count``: add to the step's figures (training calls; evaluation is not counted)."""
        start = time.perf_counter()
        hidden_cpu = hidden.detach().to("cpu")
        experts_cpu = experts.to("cpu")
        selection = self.store.select(layer, hidden_cpu, experts_cpu)
        if count:
            if self.usage is not None:
                self.usage.add_selection(layer, experts_cpu, selection, hidden_cpu)
            self._moved("d2h", Moved.of(hidden_cpu) + Moved.of(experts_cpu))
            self._counters["select_s"] += time.perf_counter() - start
            self._counters["tokens"] += hidden.shape[0]
        return selection

    def prefetch(
        self, layer: int, hidden: torch.Tensor, experts: torch.Tensor, dtype: torch.dtype,
        count: bool = True,
    ) -> Future:
        """Select and fetch ``layer``'s rows for ``hidden`` on a worker thread (see the
        module docstring); :meth:`take` waits for the ``(selection, working)`` result."""
        device = hidden.device
        hidden_cpu = hidden.detach().to("cpu")  # on this thread: ordered after its producer
        experts_cpu = experts.to("cpu")
        if self._prefetcher is None:
            self._prefetcher = ThreadPoolExecutor(1, thread_name_prefix="sparse-prefetch")

        def work() -> tuple[Selection, torch.Tensor]:
            selection = self.select(layer, hidden_cpu, experts_cpu, count=count)
            working = self.fetch(layer, selection.rows, device, dtype, count=count, wait=False)
            return selection, working

        if count:
            self._counters["prefetched_layers"] += 1
        return self._prefetcher.submit(work)

    def take(
        self, layer: int, future: Future, count: bool = True
    ) -> tuple[Selection, torch.Tensor]:
        """The result of :meth:`prefetch`, ready for this thread's compute stream."""
        start = time.perf_counter()
        selection, working = future.result()
        self._await_copy(layer, working)
        if count:
            self._counters["prefetch_wait_s"] += time.perf_counter() - start
        return selection, working

    def fetch(
        self, layer: int, rows: torch.Tensor, device: torch.device, dtype: torch.dtype,
        count: bool = True, wait: bool = True,
    ) -> torch.Tensor:
        """The rows ``[U, 2d]`` of ``layer`` on ``device`` (a leaf without grad): hot rows
        from the cache, the others copied from the store. ``wait=False`` (a worker
        thread): the caller's compute stream has not been made to wait for the copy yet
        (:meth:`take` does that)."""
        start = time.perf_counter()
        cache = self._cache(layer, device)
        if cache is None or not cache.size:
            working = self._transfer(layer, rows, device, dtype)
            cold = rows.numel()
        else:
            hot_pos, slots, cold_pos = cache.split(rows)
            cold = cold_pos.numel()
            working = torch.empty(rows.numel(), 2 * self.sizes.hidden, dtype=dtype, device=device)
            if cold:
                moved = self._transfer(layer, rows[cold_pos], device, dtype)
                self._await_copy(layer, moved)
                working.index_copy_(0, cold_pos.to(device, non_blocking=True), moved)
            if hot_pos.numel():
                working.index_copy_(
                    0, hot_pos.to(device, non_blocking=True), cache.gather(slots, dtype)
                )
            if device.type == "cuda":  # what _await_copy waits for: the assembled set
                assembled = torch.cuda.Event()
                assembled.record(torch.cuda.current_stream(device))
                self._staging_done[layer] = assembled
        if count:
            if cache is not None:
                cache.note_selected(rows)
                self._counters["cache_hits"] += rows.numel() - cold
                self._counters["cache_misses"] += cold
            self._rows_layer[layer] += rows.numel()
            self._counters["rows_moved"] += cold
            elements = cold * 2 * self.sizes.hidden
            self._moved("h2d", Moved(elements, elements * working.element_size()))
            self._counters["fetch_s"] += time.perf_counter() - start
        if wait:
            self._await_copy(layer, working)
        return working

    def _await_copy(self, layer: int, working: torch.Tensor) -> None:
        """Make the current CUDA stream wait for ``layer``'s last row copy, and keep
        ``working`` alive until that stream is done with it (nothing on the CPU)."""
        done = self._staging_done.get(layer)
        if working.device.type != "cuda" or done is None:
            return
        stream = torch.cuda.current_stream(working.device)
        stream.wait_event(done)
        working.record_stream(stream)

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
            self._staging_done[layer] = done  # the compute stream waits in _await_copy
            return working
        return self.store.gather(layer, rows).to(dtype)

    def _copy_stream(self, device: torch.device) -> torch.cuda.Stream:
        """The side CUDA stream of host->device row copies (made on first use)."""
        if getattr(self, "_h2d_stream", None) is None:
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

    def _cache(self, layer: int, device: torch.device) -> LayerCache | None:
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
                scale = self._loss_scale()
                cache.add_grad(slots, hot.float() / scale if scale != 1.0 else hot)
            if cold_pos.numel() < rows.numel():
                rows = rows[cold_pos]
                grad = grad.index_select(0, cold_pos.to(grad.device, non_blocking=True))
        if rows.numel():
            self._add_cold_grad(layer, rows, grad)
        if self._eager is not None and self._eager.armed:
            self._eager.submit(layer)
        self._counters["grad_s"] += time.perf_counter() - start

    def _add_cold_grad(self, layer: int, rows: torch.Tensor, grad: torch.Tensor) -> None:
        host = grad.to("cpu")
        self._moved("d2h", Moved.of(host))
        host = host.float()
        scale = self._loss_scale()
        if scale != 1.0:
            host.div_(scale)
        self.store.add_grad(layer, rows, host)
        self._grads = None

    def _moved(self, direction: str, moved: Moved) -> None:
        self._counters[f"{direction}_bytes"] += moved.nbytes
        self._counters[f"{direction}_elements"] += moved.elements

    def _wait_eager(self) -> None:
        """Wait for this step's eager layer updates (timed as the GPU's wait)."""
        if self._eager is None:
            return
        start = time.perf_counter()
        if self._eager.wait():
            self._counters["wait_s"] += time.perf_counter() - start

    # --- engine integration -------------------------------------------------------------
    def _loss_scale(self) -> float:
        """fp16 engines scale the loss: the store's gradients are unscaled here."""
        engine = self.engine
        if engine is None or not getattr(engine, "fp16_enabled", lambda: False)():
            return 1.0
        optimizer = getattr(engine, "optimizer", None)
        for attr in ("cur_scale", "loss_scale"):
            value = getattr(optimizer, attr, None)
            if isinstance(value, (int, float)) and value > 0:
                return float(value)
        return 1.0

    def grads(self) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """The coalesced (and, data-parallel, averaged) gradients of this step's cold
        rows (layers already updated eagerly have none left)."""
        self._wait_eager()  # their worker consumes those layers' pending gradients
        if self._grads is None:
            self._grads = self.store.coalesce(self.group)
        return self._grads

    def zero_grad(self) -> None:
        """Drop the row gradients gathered since the last step, without an update."""
        self._wait_eager()
        self._grads = None
        self.store.clear_grads()
        for cache in self.caches.values():
            cache.clear_grads()

    def grad_sq_norm(self) -> float:
        """Squared norm of all row gradients of this step: cold, hot and eager layers."""
        cold = self.store.total_sq_norm(float(  # sharded: summed over the owners
            sum(g.double().pow(2).sum() for _, g in self.grads().values() if g.numel())
        ))
        hot = sum(cache.grad_sq_norm() for cache in self.caches.values())
        eager = self._eager.sq_norm() if self._eager is not None else 0.0
        self._counters["store_grad_norm"] = (cold + hot + eager) ** 0.5  # vs grad_norm
        return cold + hot + eager

    def step(self, lr: float, clip_coef: float = 1.0, skip: bool = False,
             loss_scale: float = 1.0) -> None:
        """Apply AdamW to the rows that got gradients since the last step (cold rows on
        the CPU, hot rows on the device), then move rows into or out of the cache.
        ``loss_scale``: the factor the gradients still carry (a ``GradScaler``'s scale;
        DeepSpeed's is taken off as they arrive), divided out here with ``clip_coef``."""
        if loss_scale != 1.0 and self._eager is not None:
            raise ValueError("sparse: a loss scale cannot be applied after eager row updates")
        start = time.perf_counter()
        grads = self.grads()  # waits for the eager updates
        self._grads = None
        self.store.clear_grads()
        finite = all(bool(torch.isfinite(g).all()) for _, g in grads.values() if g.numel())
        finite = finite and all(cache.all_finite() for cache in self.caches.values())
        updated = 0
        if self._eager is not None:  # kept, rolled back, or handed back into grads
            settled = self._eager.settle(grads, not skip and finite, clip_coef)
            updated = int(settled.pop("eager_rows"))
            for key, value in settled.items():
                self._counters[key] += value
        store_lr = lr * self.options.sparse_lr_ratio
        self._counters["clip_coef"] = clip_coef
        if skip or not finite:
            self._counters["store_steps_skipped"] += 1
        else:
            factor = clip_coef / loss_scale
            for layer, (rows, grad) in grads.items():
                if not rows.numel():
                    continue
                if factor != 1.0:
                    grad = grad * factor
                state = self.store.layers[layer]
                adam_start = time.perf_counter()
                self.row_optimizer().step(
                    state.weight, state.exp_avg, state.exp_avg_sq, state.steps, rows, grad,
                    store_lr,
                )
                self._counters["cpu_adam_s"] += time.perf_counter() - adam_start
                updated += rows.numel()
            for layer, cache in self.caches.items():
                updated += int(cache.touched.sum())
                self._moved("d2h", cache.step(
                    self.row_optimizer(), store_lr, factor, self.store.layers[layer]
                ))
        for layer, cache in self.caches.items():
            cache.clear_grads()
            promoted, evicted, up, down = cache.rebalance(self.store.layers[layer])
            self._counters["cache_promoted"] += promoted
            self._counters["cache_evicted"] += evicted
            self._moved("h2d", up)
            self._moved("d2h", down)
            self._counters["cache_rows"] += cache.size
        self._counters["rows_updated"] += updated
        self._counters["optim_s"] += time.perf_counter() - start
        self._last = dict(self._counters)
        self._last_rows_layer = [self._rows_layer.get(layer, 0.0) for layer in self.sizes.layers]
        self._counters.clear()
        self._rows_layer.clear()
        # The rows changed: no cached selection or working set may be reused.
        self.generation += 1

    def metrics(self) -> dict[str, float]:
        """Figures of the last completed step, ``sparse_``-prefixed: ``tokens`` routed,
        ``rows_moved`` host->device (sum over layers and micro-batches of the working-set
        rows copied), ``h2d_bytes`` / ``d2h_bytes`` and ``h2d_elements`` /
        ``d2h_elements`` (rows; hidden states, expert ids and row gradients; counted
        whatever the device, a CPU one included; the [T, K] int64 column/slot indices of
        the selection are not counted), ``rows_updated``,
        ``store_steps_skipped``, and seconds spent in ``select_s``, ``fetch_s``,
        ``grad_s``, ``optim_s`` (the whole store step), ``cpu_adam_s`` (the CPU row
        update, also when a worker ran it), ``wait_s`` (time the step waited for the
        worker). With ``--sparse_prefetch``: ``prefetched_layers`` (layer calls whose
        rows were selected and fetched ahead, during attention) and ``prefetch_wait_s``
        (time the adapters then still waited for them). With the cache: ``cache_hits`` /
        ``cache_misses`` (rows served from the device / copied), ``cache_promoted``,
        ``cache_evicted``, ``cache_rows`` (resident after the step, all layers);
        promotions, evictions and hot keys written back are in the byte counts.
        ``rows_per_layer``: rows selected per adapted layer (a list,
        summed over micro-batches, hot and cold). ``clip_coef``: the factor gradient
        clipping applied (1 = it did not fire); ``store_grad_norm``: the rows' share of
        the global ``grad_norm``."""
        out: dict = {f"sparse_{key}": value for key, value in self._last.items()}
        if self._last_rows_layer:
            out["sparse_rows_per_layer"] = list(self._last_rows_layer)
        return out

    # --- cache state for checkpoints --------------------------------------------------
    def flush(self) -> None:
        """Write the cached rows' current state into the store (before save / export)."""
        self._wait_eager()
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
            cache = self._cache(layer, self._cache_device())
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
