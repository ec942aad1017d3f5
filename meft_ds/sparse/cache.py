"""GPU-resident hot-row cache of the sparse adapter (``--sparse_cache_rows``).

Design (one :class:`LayerCache` per adapted layer, ``C`` slots):

- **Hot rows live on the device with their optimizer state.** A cached row's fp32
  weight and both Adam moments are device tensors (its step count stays on the host).
  The CPU store's copy of these is stale while the row is cached, except its key (below).
- **No copy for a hit.** The working set of a micro-batch takes hot rows from the cache
  (a device gather) and only the cold rows through the staging buffer; the hot rows'
  gradients are summed into a device buffer (over micro-batches, in the same order the
  store sums the cold rows' gradients) and never leave the device.
- **Updated on the device.** At the step, hot rows get the same lazy row AdamW as cold
  rows (the ``torch`` arithmetic, :meth:`RowAdamW.step_resident`), cold rows get
  DeepSpeedCPUAdam on the CPU. With ``--sparse_optimizer torch`` the two are the same
  arithmetic, so training with the cache on gives bit-identical weights to the cache
  off; with ``cpu_adam`` they agree to fp32 rounding (~1e-7 relative per step).
- **Selection stays exact.** Key-Experts selection scores keys on the CPU, so after each
  step the *keys* (not values, not moments) of the hot rows just updated are copied back
  into the store (``d`` fp32 per row, counted in the device->host bytes).
- **Policy.** Each row has a score ``score = DECAY * score + (times selected this step)``
  (a frequency count with exponential forgetting). After every step the cache holds the
  ``C`` rows of highest score among those with a positive score; resident rows get a
  bonus of ``HYSTERESIS`` so that near-ties do not churn. An evicted row's weight,
  moments and step count go back to the store; a promoted row's come from the store
  (after the step's CPU update): each move is counted in the bytes both ways. The cache
  membership is therefore fixed during a step, so a decision cached for recomputation
  (activation checkpointing, reversible replay) splits its rows the same way in its
  forward and backward.
- **Checkpoints / export.** :meth:`flush` writes every cached row's full state into the
  store (without evicting); the method calls it before saving or exporting. The cache's
  membership and scores are saved next to the store and restored by re-promoting the
  same rows, so a resumed run continues with the same split (bit-identical resume also
  with the ``cpu_adam`` backend).

The cache is off with data parallelism (hot rows' gradients would need their own
all-reduce and identical membership on every rank).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from meft_ds.sparse.optim import RowAdamW
from meft_ds.sparse.store import LayerRows

DECAY = 0.9
HYSTERESIS = 1.0


@dataclass
class Moved:
    """Elements and bytes that crossed between host and device."""

    elements: int = 0
    nbytes: int = 0

    @staticmethod
    def of(tensor: torch.Tensor) -> Moved:
        return Moved(tensor.numel(), tensor.numel() * tensor.element_size())

    def __add__(self, other: Moved) -> Moved:
        return Moved(self.elements + other.elements, self.nbytes + other.nbytes)


def cache_capacity(setting: float, rank: int) -> int:
    """Rows per layer: ``setting`` >= 1 is a row count, in (0, 1) a fraction of ``rank``."""
    if setting <= 0:
        return 0
    rows = int(setting) if setting >= 1 else round(setting * rank)
    return max(0, min(rank, rows))


class LayerCache:
    """One layer's device-resident hot rows (see the module docstring)."""

    def __init__(self, capacity: int, rank: int, width: int, device: torch.device) -> None:
        self.capacity = capacity
        self.device = device
        self.width = width
        shape = (capacity, width)
        self.weight = torch.zeros(shape, dtype=torch.float32, device=device)
        self.exp_avg = torch.zeros_like(self.weight)
        self.exp_avg_sq = torch.zeros_like(self.weight)
        self.grad = torch.zeros_like(self.weight)
        self.steps = torch.zeros(capacity, dtype=torch.int64)
        self.touched = torch.zeros(capacity, dtype=torch.bool)
        self.slot_of_row = torch.full((rank,), -1, dtype=torch.int64)
        self.row_of_slot = torch.full((capacity,), -1, dtype=torch.int64)
        self.score = torch.zeros(rank, dtype=torch.float32)
        self.selected = torch.zeros(rank, dtype=torch.float32)

    @property
    def size(self) -> int:
        return int((self.row_of_slot >= 0).sum())

    def split(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(hot positions, their slots, cold positions)`` of the sorted ``rows``."""
        slots = self.slot_of_row[rows]
        hot = slots >= 0
        hot_pos = hot.nonzero().squeeze(1)
        cold_pos = (~hot).nonzero().squeeze(1)
        return hot_pos, slots[hot_pos], cold_pos

    def gather(self, slots: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.weight.index_select(0, slots.to(self.device, non_blocking=True)).to(dtype)

    def add_grad(self, slots: torch.Tensor, grad: torch.Tensor) -> None:
        """Sum a micro-batch's gradient of the hot rows at ``slots`` (device ``grad``)."""
        self.grad.index_add_(0, slots.to(self.device, non_blocking=True), grad.float())
        self.touched[slots] = True

    def note_selected(self, rows: torch.Tensor) -> None:
        self.selected.index_add_(0, rows, torch.ones(rows.numel()))

    # --- the step ---------------------------------------------------------------------
    def touched_slots(self) -> torch.Tensor:
        return self.touched.nonzero().squeeze(1)

    def grad_sq_norm(self) -> float:
        slots = self.touched_slots()
        if not slots.numel():
            return 0.0
        g = self.grad.index_select(0, slots.to(self.device))
        return float(g.double().pow(2).sum())

    def all_finite(self) -> bool:
        slots = self.touched_slots()
        return not slots.numel() or bool(
            torch.isfinite(self.grad.index_select(0, slots.to(self.device))).all()
        )

    def step(
        self, optimizer: RowAdamW, lr: float, clip_coef: float, store: LayerRows
    ) -> Moved:
        """AdamW on the touched hot rows, then their keys back into ``store``; returns
        what moved device->host (the keys)."""
        slots = self.touched_slots()
        if not slots.numel():
            return Moved()
        index = slots.to(self.device)
        grad = self.grad.index_select(0, index)
        if clip_coef != 1.0:  # clipping and any loss scale still on the gradients
            grad = grad * clip_coef
        optimizer.step_resident(
            self.weight, self.exp_avg, self.exp_avg_sq, self.steps, slots, grad, lr
        )
        return self.write_keys(slots, store)

    def write_keys(self, slots: torch.Tensor, store: LayerRows) -> Moved:
        hidden = self.width // 2
        keys = self.weight.index_select(0, slots.to(self.device))[:, :hidden].to("cpu")
        store.weight[:, :hidden].index_copy_(0, self.row_of_slot[slots], keys)
        return Moved.of(keys)

    def clear_grads(self) -> None:
        slots = self.touched_slots()
        if slots.numel():
            self.grad.index_fill_(0, slots.to(self.device), 0.0)
        self.touched.zero_()

    # --- membership -------------------------------------------------------------------
    def rebalance(self, store: LayerRows) -> tuple[int, int, Moved, Moved]:
        """Fold this step's selections into the scores and move rows in or out.

        Returns ``(promoted, evicted, moved host->device, moved device->host)``."""
        self.score.mul_(DECAY).add_(self.selected)
        self.selected.zero_()
        effective = self.score.clone()
        resident = self.row_of_slot[self.row_of_slot >= 0]
        effective[resident] += HYSTERESIS
        top = effective.topk(min(self.capacity, effective.numel())).indices
        wanted = top[self.score[top] > 0]
        keep = torch.zeros_like(self.score, dtype=torch.bool)
        keep[wanted] = True
        evict_slots = (self.row_of_slot >= 0).logical_and(~keep[self.row_of_slot.clamp(min=0)])
        evict_slots = evict_slots.nonzero().squeeze(1)
        down = self.write_back(evict_slots, store)
        self.slot_of_row[self.row_of_slot[evict_slots]] = -1
        self.row_of_slot[evict_slots] = -1
        new_rows = wanted[self.slot_of_row[wanted] < 0].sort().values
        up = self.promote(new_rows, store)
        return new_rows.numel(), evict_slots.numel(), up, down

    def promote(self, rows: torch.Tensor, store: LayerRows) -> Moved:
        """Bring ``rows`` (not resident) with their state into free slots (the step
        counts stay on the host: not moved)."""
        moved = Moved()
        if not rows.numel():
            return moved
        free = (self.row_of_slot < 0).nonzero().squeeze(1)[: rows.numel()]
        index = free.to(self.device)
        for name in ("weight", "exp_avg", "exp_avg_sq"):
            block = getattr(store, name).index_select(0, rows)
            getattr(self, name).index_copy_(0, index, block.to(self.device, non_blocking=True))
            moved += Moved.of(block)
        self.steps[free] = store.steps[rows]
        self.row_of_slot[free] = rows
        self.slot_of_row[rows] = free
        return moved

    def write_back(self, slots: torch.Tensor, store: LayerRows) -> Moved:
        """Copy the full state of the hot rows at ``slots`` into the store."""
        moved = Moved()
        if not slots.numel():
            return moved
        rows = self.row_of_slot[slots]
        index = slots.to(self.device)
        for name in ("weight", "exp_avg", "exp_avg_sq"):
            block = getattr(self, name).index_select(0, index).to("cpu")
            getattr(store, name).index_copy_(0, rows, block)
            moved += Moved.of(block)
        store.steps[rows] = self.steps[slots]
        return moved

    def flush(self, store: LayerRows) -> Moved:
        """Write every cached row's state into the store (the rows stay cached)."""
        return self.write_back((self.row_of_slot >= 0).nonzero().squeeze(1), store)

    def state_dict(self) -> dict:
        return {"rows": self.row_of_slot[self.row_of_slot >= 0].clone(),
                "score": self.score.clone()}

    def load_state_dict(self, state: dict, store: LayerRows) -> None:
        """Forget the current content (no write-back) and cache ``state``'s rows again,
        reading their state from ``store``."""
        self.reset()
        self.score.copy_(state["score"])
        rows = state["rows"]
        if rows.numel() > self.capacity:  # resumed with a smaller cache: keep the hottest
            rows = rows[self.score[rows].argsort(descending=True, stable=True)[: self.capacity]]
        self.promote(rows.sort().values, store)

    def reset(self) -> None:
        """Drop everything without writing back (the store was replaced)."""
        self.slot_of_row.fill_(-1)
        self.row_of_slot.fill_(-1)
        self.score.zero_()
        self.selected.zero_()
        self.grad.zero_()
        self.touched.zero_()
