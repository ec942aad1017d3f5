"""How the sparse adapter uses its rows: the figures that say whether a wide store is
really used wide.

:class:`Usage` counts, per adapted layer, how often each row is selected by a token
(one count per token and key: ``T*K`` per layer call) and how often each expert is
picked by the router (``T*E``), plus the gate values. :func:`summarise` turns the
counts, the store's per-row Adam step counts and the rows' norms into per-layer figures
and their mean over layers:

- ``distinct_rows`` / ``row_coverage``: rows selected at least once (count, share of r);
- ``row_entropy``: entropy of the selection counts over the r rows, divided by ``log r``
  (1 = every row equally used; near 0 = a few rows serve every token);
- ``top1pct_share``: share of all selections that land on the 1% most selected rows;
- ``expert_entropy``: the same entropy over the router's expert picks (``log N``);
- ``update_top1pct_share`` / ``updated_rows``: the same for the rows' Adam step counts
  (``steps`` in the store; what the optimizer actually updated);
- ``selection_kept``: of the top-K rows a fixed sample of tokens (the first ones the
  layer saw, with their experts) selected at the previous report, the share they still
  select with today's keys: 1 = the addresses facts were written to hold still (always 1
  with frozen keys); low = trained keys move every token's selection away from the rows
  its earlier updates wrote to;
- ``gate_mean`` / ``gate_std``: the gates ``g_{t,e}`` of the selected keys;
- ``key_norm_*`` / ``value_norm_*``: mean and max row norms (of updated rows, and of
  all rows for the keys: rich-get-richer shows as updated keys outgrowing the rest).

Counting costs a ``bincount`` per layer call; it runs only when a :class:`Usage` is
attached to the runtime (``--sparse_diagnostics`` or a bench).
"""

from __future__ import annotations

import math

import torch

from meft_ds.sparse.options import SparseSizes
from meft_ds.sparse.router import Selection, select_rows

PROBE_TOKENS = 64  # tokens per layer whose selection is followed across reports


class Usage:
    """Selection counts per row and expert of every adapted layer (see module docstring)."""

    def __init__(self, sizes: SparseSizes) -> None:
        self.sizes = sizes
        self.row_hits = {layer: torch.zeros(sizes.rank, dtype=torch.int64)
                         for layer in sizes.layers}
        self.expert_hits = {layer: torch.zeros(sizes.num_experts, dtype=torch.int64)
                            for layer in sizes.layers}
        self.gate_sum = dict.fromkeys(sizes.layers, 0.0)
        self.gate_sq_sum = dict.fromkeys(sizes.layers, 0.0)
        self.gate_count = dict.fromkeys(sizes.layers, 0)
        # layer -> (hidden [P, d], experts [P, E], their rows [P, K]) of the probe tokens
        self.probe: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def add_selection(self, layer: int, experts: torch.Tensor, selection: Selection,
                      hidden: torch.Tensor | None = None) -> None:
        """Count one layer call: ``experts`` ``[T, E]``, ``selection`` with ``local`` ``[T, K]``
        (``hidden`` ``[T, d]``: the first call of a layer keeps its first tokens as probe)."""
        row_ids = selection.rows[selection.local].reshape(-1)
        if hidden is not None and layer not in self.probe:
            n = min(PROBE_TOKENS, hidden.shape[0])
            chosen = selection.rows[selection.local[:n]]
            self.probe[layer] = (hidden[:n].float().clone(), experts[:n].clone(), chosen)
        self.row_hits[layer] += torch.bincount(row_ids, minlength=self.sizes.rank)
        self.expert_hits[layer] += torch.bincount(
            experts.reshape(-1).to("cpu"), minlength=self.sizes.num_experts
        )

    def add_gates(self, layer: int, gates: torch.Tensor) -> None:
        """Count the gates ``[T, K]`` the selected keys were given."""
        g = gates.detach().double()
        self.gate_sum[layer] += float(g.sum())
        self.gate_sq_sum[layer] += float(g.pow(2).sum())
        self.gate_count[layer] += g.numel()

    def reset(self) -> None:
        for hits in (*self.row_hits.values(), *self.expert_hits.values()):
            hits.zero_()
        for layer in self.sizes.layers:
            self.gate_sum[layer] = self.gate_sq_sum[layer] = 0.0
            self.gate_count[layer] = 0


def normalised_entropy(counts: torch.Tensor) -> float:
    """Entropy of ``counts`` as a distribution over its entries, divided by ``log(len)``:
    1 for uniform use, 0 when one entry takes everything (or nothing was counted)."""
    total = float(counts.sum())
    if total <= 0 or counts.numel() < 2:
        return 0.0
    p = counts[counts > 0].double() / total
    return float(-(p * p.log()).sum()) / math.log(counts.numel())


def top_share(counts: torch.Tensor, fraction: float = 0.01) -> float:
    """Share of the total held by the ``ceil(fraction * len)`` largest entries."""
    total = float(counts.sum())
    if total <= 0:
        return 0.0
    k = max(1, math.ceil(fraction * counts.numel()))
    return float(counts.double().topk(k).values.sum()) / total


def _norm_stats(rows: torch.Tensor, prefix: str) -> dict[str, float]:
    if rows.shape[0] == 0:
        return {f"{prefix}_mean": 0.0, f"{prefix}_max": 0.0}
    norms = rows.norm(dim=1)
    return {f"{prefix}_mean": float(norms.mean()), f"{prefix}_max": float(norms.max())}


def selection_kept(usage: Usage, layer: int, keys: torch.Tensor) -> float:
    """Share of the probe tokens' previous top-K rows they still select with ``keys``
    (then those selections become the previous ones); 1.0 before a probe exists."""
    if layer not in usage.probe:
        return 1.0
    hidden, experts, before = usage.probe[layer]
    sizes = usage.sizes
    now = select_rows(keys, hidden, experts, sizes.num_experts, sizes.top_k)
    after = now.rows[now.local]
    kept = sum(len(set(b.tolist()) & set(a.tolist())) for b, a in zip(before, after))
    usage.probe[layer] = (hidden, experts, after)
    return kept / before.numel()


def layer_figures(
    usage: Usage, layer: int, weight: torch.Tensor, steps: torch.Tensor
) -> dict[str, float]:
    """One layer's figures (module docstring); ``weight`` ``[r, 2d]``, ``steps`` ``[r]``."""
    hidden = usage.sizes.hidden
    hits = usage.row_hits[layer]
    n = usage.gate_count[layer]
    mean = usage.gate_sum[layer] / n if n else 0.0
    var = max(usage.gate_sq_sum[layer] / n - mean * mean, 0.0) if n else 0.0
    updated = steps > 0
    keys, values = weight[:, :hidden], weight[:, hidden:]
    return {
        "distinct_rows": int((hits > 0).sum()),
        "row_coverage": float((hits > 0).double().mean()),
        "row_entropy": normalised_entropy(hits),
        "top1pct_share": top_share(hits),
        "expert_entropy": normalised_entropy(usage.expert_hits[layer]),
        "experts_used": int((usage.expert_hits[layer] > 0).sum()),
        "updated_rows": int(updated.sum()),
        "update_top1pct_share": top_share(steps),
        "row_steps_max": int(steps.max()) if steps.numel() else 0,
        "selection_kept": selection_kept(usage, layer, weight[:, :hidden]),
        "gate_mean": mean,
        "gate_std": math.sqrt(var),
        **_norm_stats(keys, "key_norm_all"),
        **_norm_stats(keys[updated], "key_norm_updated"),
        **_norm_stats(values[updated], "value_norm_updated"),
    }


def summarise(usage: Usage, store) -> dict:
    """``{"layers": {layer: figures}, "mean": mean figures over layers}`` (rows and step
    counts read from ``store``, a :class:`~meft_ds.sparse.store.RowStore`)."""
    layers = {
        layer: layer_figures(usage, layer, store.full_weight(layer), store.layers[layer].steps)
        for layer in usage.sizes.layers
    }
    keys = next(iter(layers.values())).keys() if layers else ()
    mean = {k: sum(f[k] for f in layers.values()) / len(layers) for k in keys}
    return {"layers": layers, "mean": mean}
