"""The CPU row store: every adapted layer's full key/value rows and their Adam states.

Layout per layer: ``weight`` is ``[r, 2*hidden]`` fp32, row ``i`` = key ``k_i`` (first
``hidden`` columns) then value ``v_i``; ``exp_avg``/``exp_avg_sq`` have the same shape,
``steps`` counts each row's updates. One row is one contiguous gather for the transfer to
the device and for the optimizer.

None of these tensors is a parameter or buffer of any ``nn.Module``: ``deepspeed.initialize``
moves the whole module to the device, and the store must stay in CPU RAM.

Gradients come back from the device per micro-batch as ``(rows, grad)`` pairs and are
kept in a pending list; :meth:`RowStore.coalesce` sums them into one gradient per unique
row (over micro-batches and, when data-parallel, over ranks) right before the step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from meft_ds import dist as mdist
from meft_ds.errors import UserError
from meft_ds.sparse.huge_pages import huge_zeros
from meft_ds.sparse.options import SparseSizes


@dataclass
class LayerRows:
    """One layer's rows and optimizer state, all in CPU RAM."""

    weight: torch.Tensor
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    steps: torch.Tensor
    pending: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)


def init_layer_weight(
    rank: int, hidden: int, generator: torch.Generator, huge_pages: bool = True
) -> torch.Tensor:
    """Keys ~ U(-1/sqrt(d), 1/sqrt(d)) (``nn.Linear``'s default), values zero.

    Zero values make the adapter's output exactly zero at initialisation, so the adapted
    model starts as the pretrained one. ``huge_pages``: see :mod:`meft_ds.sparse.huge_pages`.
    """
    weight = huge_zeros(rank, 2 * hidden, huge=huge_pages)
    bound = 1.0 / math.sqrt(hidden)
    weight[:, :hidden].uniform_(-bound, bound, generator=generator)
    return weight


def new_layer_rows(weight: torch.Tensor, huge_pages: bool = True) -> LayerRows:
    """``weight``'s rows with zero moments (on huge pages too) and step counts."""
    return LayerRows(
        weight=weight,
        exp_avg=huge_zeros(*weight.shape, huge=huge_pages),
        exp_avg_sq=huge_zeros(*weight.shape, huge=huge_pages),
        steps=torch.zeros(weight.shape[0], dtype=torch.int64),
    )


class RowStore:
    """All adapted layers' rows (see the module docstring)."""

    FILE = "sparse_store.pt"
    step_count: int = 0  # store steps taken (not skipped); --sparse_bias_correction step

    def __init__(self, sizes: SparseSizes, seed: int = 0, huge_pages: bool = True) -> None:
        self.sizes = sizes
        generator = torch.Generator().manual_seed(seed)
        self.layers: dict[int, LayerRows] = {}
        for layer in sizes.layers:
            weight = init_layer_weight(sizes.rank, sizes.hidden, generator, huge_pages)
            self.layers[layer] = new_layer_rows(weight, huge_pages)

    # --- views ----------------------------------------------------------------------
    def keys(self, layer: int) -> torch.Tensor:
        """``[r, hidden]`` strided view of the keys."""
        return self.layers[layer].weight[:, : self.sizes.hidden]

    def values(self, layer: int) -> torch.Tensor:
        """``[r, hidden]`` strided view of the values."""
        return self.layers[layer].weight[:, self.sizes.hidden :]

    def nbytes(self) -> int:
        """CPU bytes held: weights, both moments and step counts of all layers."""
        return sum(
            3 * rows.weight.numel() * rows.weight.element_size()
            + rows.steps.numel() * rows.steps.element_size()
            for rows in self.layers.values()
        )

    # --- gradients ------------------------------------------------------------------
    def add_grad(self, layer: int, rows: torch.Tensor, grad: torch.Tensor) -> None:
        """Queue the gradient of ``rows`` (sorted, unique; ``grad`` fp32 on the CPU)."""
        self.layers[layer].pending.append((rows, grad))

    def coalesce(self, group=None) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Sum the pending gradients into ``{layer: (unique rows, grad [n, 2*hidden])}``.

        With ``torch.distributed`` initialised and more than one rank, the row sets are
        united over the ranks and the gradients averaged (as DeepSpeed averages the
        engine's gradients), so every rank applies the same update to its replica.
        The local sum replaces the pending list (so calling this again, or adding more
        gradients afterwards, stays correct); :meth:`clear_grads` drops it after the step.
        """
        result = {layer: self.coalesce_layer(layer) for layer in self.layers}
        if mdist.world_size(group) > 1:
            result = {layer: _allreduce_rows(idx, g, group) for layer, (idx, g) in result.items()}
        return result

    def coalesce_layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One layer's pending gradients summed locally (no communication)."""
        rows = self.layers[layer]
        pending = rows.pending
        if not pending:
            return (
                torch.empty(0, dtype=torch.int64),
                torch.empty(0, 2 * self.sizes.hidden, dtype=torch.float32),
            )
        if len(pending) == 1:
            return pending[0]
        all_rows = torch.cat([p[0] for p in pending])
        idx, inverse = torch.unique(all_rows, sorted=True, return_inverse=True)
        grad = torch.zeros(len(idx), 2 * self.sizes.hidden, dtype=torch.float32)
        grad.index_add_(0, inverse, torch.cat([p[1] for p in pending]))
        rows.pending = [(idx, grad)]
        return idx, grad

    def clear_grads(self) -> None:
        for rows in self.layers.values():
            rows.pending = []

    # --- checkpoints ----------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "sizes": self.sizes.as_dict(),
            "step_count": self.step_count,
            "layers": {
                layer: {
                    "weight": rows.weight, "exp_avg": rows.exp_avg,
                    "exp_avg_sq": rows.exp_avg_sq, "steps": rows.steps,
                }
                for layer, rows in self.layers.items()
            },
        }

    def load_state_dict(self, state: dict, what: str = "checkpoint") -> None:
        saved = state.get("sizes", {})
        for key in ("hidden", "rank"):
            if saved.get(key) != getattr(self.sizes, key):
                raise UserError(
                    f"{what}: sparse store has {key}={saved.get(key)}, this run "
                    f"{getattr(self.sizes, key)}"
                )
        layers = state["layers"]
        if sorted(layers) != sorted(self.layers):
            raise UserError(
                f"{what}: sparse store adapts layers {sorted(layers)}, this run "
                f"{sorted(self.layers)}"
            )
        for layer, rows in self.layers.items():
            for name in ("weight", "exp_avg", "exp_avg_sq", "steps"):
                getattr(rows, name).copy_(layers[layer][name])
            rows.pending = []
        self.step_count = saved_step_count(state)

    def save(self, directory: Path) -> None:
        """Write the store into ``directory``; data-parallel replicas are identical, so
        only global rank 0 writes."""
        if mdist.rank() != 0:
            return
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / (self.FILE + ".tmp")
        torch.save(self.state_dict(), tmp)
        tmp.replace(directory / self.FILE)

    def load(self, directory: Path) -> None:
        path = directory / self.FILE
        if not path.is_file():
            raise UserError(f"checkpoint {directory} has no {self.FILE}")
        self.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), str(path))


def saved_step_count(state: dict) -> int:
    """The store steps a saved state had taken; checkpoints from before the count was
    saved: the largest row step count (the same under ``--sparse_bias_correction step``,
    and under ``row`` unused)."""
    if "step_count" in state:
        return int(state["step_count"])
    return max((int(s["steps"].max()) for s in state["layers"].values() if s["steps"].numel()),
               default=0)


def _allreduce_rows(
    idx: torch.Tensor, grad: torch.Tensor, group
) -> tuple[torch.Tensor, torch.Tensor]:
    """Average sparse row gradients over ranks: united row set, dense sum on it."""
    dist = torch.distributed
    world = dist.get_world_size(group)
    device = mdist.comm_device(group)
    count = torch.tensor([idx.numel()], dtype=torch.int64, device=device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count, group=group)
    longest = max(int(c.item()) for c in counts)
    padded = torch.full((longest,), -1, dtype=torch.int64, device=device)
    padded[: idx.numel()] = idx.to(device)
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded, group=group)
    union = torch.cat(gathered).cpu()
    union = torch.unique(union[union >= 0], sorted=True)
    dense = torch.zeros(union.numel(), grad.shape[1], dtype=torch.float32)
    if idx.numel():
        dense.index_copy_(0, torch.searchsorted(union, idx), grad)
    dense = dense.to(device)
    dist.all_reduce(dense, group=group)
    return union, dense.cpu().div_(world)
