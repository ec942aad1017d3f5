"""The sparse runtime's per-step figures: summed while a step runs, kept when it ends."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping

from meft_ds.sparse.cache import Moved


class StepCounters:
    """Figures of the running step (:attr:`current`) and of the last completed one
    (reported by :meth:`metrics`)."""

    def __init__(self) -> None:
        self._current: dict[str, float] = defaultdict(float)
        self._rows_layer: dict[int, float] = defaultdict(float)
        self._last: dict[str, float] = {}
        self._last_rows_layer: list[float] = []

    @property
    def current(self) -> Mapping[str, float]:
        """The running step's figures so far (unprefixed names; read-only view)."""
        return self._current

    def add(self, key: str, value: float) -> None:
        """Add ``value`` to figure ``key`` of the running step."""
        self._current[key] += value

    def set(self, key: str, value: float) -> None:
        """Set figure ``key`` of the running step (a value, not a sum)."""
        self._current[key] = value

    def moved(self, direction: str, moved: Moved) -> None:
        """Count traffic ``direction`` (``h2d`` or ``d2h``) in bytes and elements."""
        self._current[f"{direction}_bytes"] += moved.nbytes
        self._current[f"{direction}_elements"] += moved.elements

    def add_rows(self, layer: int, rows: int) -> None:
        """Count ``rows`` selected in ``layer`` (hot and cold)."""
        self._rows_layer[layer] += rows

    def close(self, layers: Iterable[int]) -> None:
        """End the step: its figures become :meth:`metrics`' and counting starts anew."""
        self._last = dict(self._current)
        self._last_rows_layer = [self._rows_layer.get(layer, 0.0) for layer in layers]
        self._current.clear()
        self._rows_layer.clear()

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
