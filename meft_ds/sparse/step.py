"""The row store's optimizer step: gathered gradients, their norm, clipping, loss scale.

Once per optimizer step :class:`RowStep` coalesces the row gradients gathered since the
last one (averaged over the data-parallel group), multiplies them by
``clip_coef / loss_scale``, and applies the row-sparse AdamW (:mod:`meft_ds.sparse.optim`)
to the cold rows on the CPU and the hot rows in the device caches, unless the step is
skipped or a gradient is not finite. With ``--sparse_eager_update`` some layers were
already updated during backward; their updates are kept, rolled back or handed back here
(:mod:`meft_ds.sparse.eager`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from meft_ds.sparse.cache import LayerCache
from meft_ds.sparse.counters import StepCounters
from meft_ds.sparse.eager import EagerRowUpdate
from meft_ds.sparse.optim import RowAdamW
from meft_ds.sparse.options import SparseOptions, SparseSizes


def engine_loss_scale(engine: Any) -> float:
    """The loss scale of an fp16 DeepSpeed ``engine`` (1 otherwise): the store's
    gradients are divided by it as they arrive."""
    if engine is None or not getattr(engine, "fp16_enabled", lambda: False)():
        return 1.0
    optimizer = getattr(engine, "optimizer", None)
    for attr in ("cur_scale", "loss_scale"):
        value = getattr(optimizer, attr, None)
        if isinstance(value, (int, float)) and value > 0:
            return float(value)
    return 1.0


class RowStep:
    """The store's AdamW over this step's row gradients (cold rows and cached hot rows)."""

    def __init__(self, options: SparseOptions, sizes: SparseSizes, store,
                 counters: StepCounters, caches: dict[int, LayerCache],
                 received: Callable[[int | None], None]) -> None:
        self.options = options
        self._received = received  # waits for row gradients still on their way
        self.sizes = sizes
        self.store = store
        self.counters = counters
        self.caches = caches  # the runtime's, shared: layers are added as they are cached
        self._optimizer: RowAdamW | None = None
        self._eager: EagerRowUpdate | None = None
        self._grads: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None

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
                # read when a row is updated: eager layer updates run during backward,
                # before this step is counted
                bias_step=(lambda: self.store.step_count + 1)
                if options.sparse_bias_correction == "step" else None,
            )
        return self._optimizer

    @property
    def eager(self) -> EagerRowUpdate:
        """The eager row update (made on first use; see :mod:`meft_ds.sparse.eager`)."""
        if self._eager is None:
            self._eager = EagerRowUpdate(self.store, self.row_optimizer(),
                                         self.options.sparse_lr_ratio, self._received)
        return self._eager

    def grads_arrived(self) -> None:
        """New cold-row gradients reached the store: the coalesced set is stale."""
        self._grads = None

    def eager_submit(self, layer: int) -> None:
        """``layer``'s row gradients of this micro-batch are complete: hand it to the
        eager update when one is armed."""
        if self._eager is not None and self._eager.armed:
            self._eager.submit(layer)

    def wait_eager(self) -> None:
        """Wait for the row gradients still being received and this step's eager layer
        updates (timed as the GPU's wait)."""
        start = time.perf_counter()
        self._received(None)
        if self._eager is None:
            return
        if self._eager.wait():
            self.counters.add("wait_s", time.perf_counter() - start)

    def grads(self, group: Any) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """The coalesced (and, data-parallel over ``group``, averaged) gradients of this
        step's cold rows (layers already updated eagerly have none left)."""
        self.wait_eager()  # their worker consumes those layers' pending gradients
        if self._grads is None:
            self._grads = self.store.coalesce(group)
        return self._grads

    def zero_grad(self) -> None:
        """Drop the row gradients gathered since the last step, without an update."""
        self.wait_eager()
        self._grads = None
        self.store.clear_grads()
        for cache in self.caches.values():
            cache.clear_grads()

    def grad_sq_norm(self, group: Any) -> float:
        """Squared norm of all row gradients of this step: cold, hot and eager layers."""
        cold = self.store.total_sq_norm(float(  # sharded: summed over the owners
            sum(g.double().pow(2).sum() for _, g in self.grads(group).values() if g.numel())
        ))
        hot = sum(cache.grad_sq_norm() for cache in self.caches.values())
        eager = self._eager.sq_norm() if self._eager is not None else 0.0
        self.counters.set("store_grad_norm", (cold + hot + eager) ** 0.5)  # vs grad_norm
        return cold + hot + eager

    def step(self, group: Any, lr: float, clip_coef: float = 1.0, skip: bool = False,
             loss_scale: float = 1.0) -> None:
        """Apply AdamW to the rows that got gradients since the last step (cold rows on
        the CPU, hot rows on the device), then move rows into or out of the cache, and
        close the step's figures. ``loss_scale``: the factor the gradients still carry (a
        ``GradScaler``'s scale; DeepSpeed's is taken off as they arrive), divided out here
        with ``clip_coef``."""
        if loss_scale != 1.0 and self._eager is not None:
            raise ValueError("sparse: a loss scale cannot be applied after eager row updates")
        counters = self.counters
        start = time.perf_counter()
        grads = self.grads(group)  # waits for the eager updates
        self._grads = None
        self.store.clear_grads()
        finite = all(bool(torch.isfinite(g).all()) for _, g in grads.values() if g.numel())
        finite = finite and all(cache.all_finite() for cache in self.caches.values())
        updated = 0
        if self._eager is not None:  # kept, rolled back, or handed back into grads
            settled = self._eager.settle(grads, not skip and finite, clip_coef)
            updated = int(settled.pop("eager_rows"))
            for key, value in settled.items():
                counters.add(key, value)
        store_lr = lr * self.options.sparse_lr_ratio
        counters.set("clip_coef", clip_coef)
        if skip or not finite:
            counters.add("store_steps_skipped", 1)
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
                counters.add("cpu_adam_s", time.perf_counter() - adam_start)
                updated += rows.numel()
            for layer, cache in self.caches.items():
                updated += int(cache.touched.sum())
                counters.moved("d2h", cache.step(
                    self.row_optimizer(), store_lr, factor, self.store.layers[layer]
                ))
            self.store.step_count += 1
        for layer, cache in self.caches.items():
            cache.clear_grads()
            promoted, evicted, up, down = cache.rebalance(self.store.layers[layer])
            counters.add("cache_promoted", promoted)
            counters.add("cache_evicted", evicted)
            counters.moved("h2d", up)
            counters.moved("d2h", down)
            counters.add("cache_rows", cache.size)
        counters.add("rows_updated", updated)
        counters.add("optim_s", time.perf_counter() - start)
        counters.close(self.sizes.layers)
