"""The eager row update: a layer's cold rows updated on a CPU thread during backward.

In the last micro-batch of a step, backward completes the layers' row gradients from the
top layer down. As soon as a layer's gradient is complete, a worker thread sums it and
runs the row-sparse AdamW on that layer's rows, while backward goes on through the
earlier layers; the step then only waits for the worker.

**With gradient clipping the update is speculative.** The clip coefficient needs every
gradient of the step (engine and rows), which backward has not finished yet. So the
worker updates the rows with the unclipped gradient and keeps a copy of the rows'
previous weights, moments and step counts. At the step, when the coefficient is known:

- coefficient 1 (no clipping this step): the update stands, and the copy is dropped;
- coefficient < 1: the rows are restored from the copy and updated again with the
  clipped gradient by the end-of-step path (``redone``);
- a skipped step or a non-finite gradient anywhere: the rows are restored and not
  updated, like every other layer.

So the result is always exactly the end-of-step update's. Once the squared norm of the
row gradients seen so far exceeds the clip limit squared, clipping is certain: the
remaining layers are left to the end-of-step path without a speculative update
(``deferred``). The copy costs the selected rows' weights and both moments (3 x 4 bytes
x 2*hidden per row) for the updated layers, until the step; ``backup_bytes`` reports it.

Without clipping no copy is made, and a layer whose gradient is not finite is not
updated. That differs from the end-of-step path, which then skips every layer.

Not with fp16 loss scaling (an overflow is found only at the step) or several
data-parallel ranks (the other ranks' row gradients arrive at the step): the method
arms the update only where it is exact
(:meth:`meft_ds.methods.sparse.SparseMethod.before_backward`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from meft_ds.sparse.optim import RowAdamW


@dataclass
class _Backup:
    """A layer's rows before their speculative update, and the gradient it used."""

    rows: torch.Tensor
    grad: torch.Tensor
    weight: torch.Tensor
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.weight, self.exp_avg,
                                                          self.exp_avg_sq))


@dataclass
class _Result:
    sq: float = 0.0  # squared norm of the gradient the worker took (0 when deferred)
    rows: int = 0  # rows it updated
    skipped: bool = False  # not finite, not updated (no clipping)
    deferred: bool = False  # left to the end-of-step path
    backup: _Backup | None = None
    cpu_adam_s: float = 0.0


class EagerRowUpdate:
    """The worker, this step's submitted layers and their speculative copies."""

    def __init__(self, store, optimizer: RowAdamW, lr_ratio: float,
                 received: Callable[[int], None]) -> None:
        self.store = store
        self.optimizer = optimizer
        self.lr_ratio = lr_ratio
        self.lr: float | None = None
        self.clip = 0.0
        self._seen_sq = 0.0  # worker only: squared norm of the gradients it took
        # waits for a layer's row gradients still on their way (meft_ds.sparse.transfer)
        self._received = received
        self._worker: ThreadPoolExecutor | None = None
        self._futures: dict[int, Future] = {}

    @property
    def armed(self) -> bool:
        return self.lr is not None

    def arm(self, lr: float | None, clip: float = 0.0) -> None:
        """Update layers eagerly in this micro-batch at ``lr`` (``None``: not at all);
        ``clip`` > 0: speculatively, against that gradient-norm limit."""
        self.lr, self.clip = lr, float(clip) if lr is not None else 0.0

    def submit(self, layer: int) -> None:
        """``layer``'s row gradient of this micro-batch is complete: update it."""
        if layer in self._futures:
            raise RuntimeError(
                f"sparse layer {layer}: a second row gradient after its eager update; "
                "the adapter must run backward once per micro-batch"
            )
        if self._worker is None:
            self._worker = ThreadPoolExecutor(1, thread_name_prefix="sparse-row-adam")
        self._futures[layer] = self._worker.submit(self._update, layer, self.lr, self.clip)

    def wait(self) -> dict[int, _Result]:
        """This step's results so far (waits for the worker)."""
        return {layer: future.result() for layer, future in self._futures.items()}

    def sq_norm(self) -> float:
        """Squared norm of the gradients the worker took (they left the store's pending
        lists; deferred layers' stay there and are counted with the cold rows)."""
        return sum(result.sq for result in self.wait().values())

    def _update(self, layer: int, lr: float, clip: float) -> _Result:
        """Worker: sum ``layer``'s pending gradients and update its cold rows."""
        self._received(layer)
        start = time.perf_counter()
        state = self.store.layers[layer]
        rows, grad = self.store.coalesce_layer(layer)
        sq = float(grad.double().pow(2).sum()) if grad.numel() else 0.0
        finite = bool(torch.isfinite(grad).all()) if grad.numel() else True
        if clip > 0:
            self._seen_sq += sq
            if not finite or self._seen_sq > clip * clip:  # clipped or skipped: certain
                return _Result(deferred=True)  # the gradient stays pending
        state.pending = []
        result = _Result(sq=sq, skipped=not finite)
        if rows.numel() and finite:
            if clip > 0:
                result.backup = _Backup(rows, grad, state.weight[rows], state.exp_avg[rows],
                                        state.exp_avg_sq[rows])
            self.optimizer.step(state.weight, state.exp_avg, state.exp_avg_sq, state.steps,
                                rows, grad, lr * self.lr_ratio)
            result.rows = rows.numel()
        result.cpu_adam_s = time.perf_counter() - start
        return result

    def settle(
        self, grads: dict[int, tuple[torch.Tensor, torch.Tensor]], apply: bool, clip_coef: float
    ) -> dict[str, float]:
        """End of step: keep, roll back or hand back (into ``grads``, for the end-of-step
        update) each speculative update; returns the step's counters and disarms."""
        results = self.wait()
        counters = {"eager_layers": 0.0, "eager_layers_skipped": 0.0,
                    "eager_layers_redone": 0.0, "eager_layers_deferred": 0.0,
                    "eager_backup_bytes": 0.0, "eager_rows": 0.0, "cpu_adam_s": 0.0}
        for layer, result in results.items():
            counters["cpu_adam_s"] += result.cpu_adam_s
            counters["eager_layers_deferred"] += result.deferred
            counters["eager_layers_skipped"] += result.skipped
            counters["eager_layers"] += not result.deferred
            backup = result.backup
            if backup is None:
                counters["eager_rows"] += result.rows
                continue
            counters["eager_backup_bytes"] += backup.nbytes()
            if apply and clip_coef >= 1.0:
                counters["eager_rows"] += result.rows
                continue
            self._restore(layer, backup)
            counters["eager_layers_redone"] += 1
            if apply:
                grads[layer] = (backup.rows, backup.grad)
        self._futures = {}
        self._seen_sq = 0.0
        self.arm(None)
        return counters

    def _restore(self, layer: int, backup: _Backup) -> None:
        state = self.store.layers[layer]
        state.weight.index_copy_(0, backup.rows, backup.weight)
        state.exp_avg.index_copy_(0, backup.rows, backup.exp_avg)
        state.exp_avg_sq.index_copy_(0, backup.rows, backup.exp_avg_sq)
        state.steps[backup.rows] -= 1
