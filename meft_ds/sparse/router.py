"""Key-Experts row selection, run on the CPU next to the keys.

The ``r`` keys of a layer are cut into ``N`` experts of ``m = r/N`` consecutive rows. A
small dense router on the device picks ``E`` experts per token; the hidden states and
those choices go to the CPU, which scores each token only against the ``E*m`` keys of
its experts (``O(T*E*m*d)`` instead of ``O(T*r*d)``), keeps the token's top-K keys by
pre-activation score, and returns the union of the batch's rows: only those rows travel
to the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Selection:
    """The rows a batch of ``T`` tokens activates in one layer.

    ``rows``: sorted unique row ids (the working set, ``U`` of them); ``local``: ``[T, K]``
    column of each token's keys in ``rows``; ``slot``: ``[T, K]`` which of the token's
    ``E`` chosen experts each key belongs to (to look up its gate).
    """

    rows: torch.Tensor
    local: torch.Tensor
    slot: torch.Tensor


@torch.no_grad()
def select_rows(
    keys: torch.Tensor, hidden: torch.Tensor, experts: torch.Tensor, num_experts: int, top_k: int
) -> Selection:
    """Choose each token's top-K keys among its experts' keys (everything on the CPU).

    ``keys``: ``[r, d]`` (may be a strided view), ``hidden``: ``[T, d]``, ``experts``:
    ``[T, E]`` expert ids per token.
    """
    m = keys.shape[0] // num_experts
    scores = candidate_scores(keys, hidden, experts, m)
    position = scores.topk(top_k, dim=1, sorted=False).indices
    slot = position // m
    row_ids = experts.gather(1, slot) * m + position % m
    rows, local = torch.unique(row_ids, sorted=True, return_inverse=True)
    return Selection(rows=rows, local=local, slot=slot)


@torch.no_grad()
def candidate_scores(
    keys: torch.Tensor, hidden: torch.Tensor, experts: torch.Tensor, m: int,
    first_expert: int = 0,
) -> torch.Tensor:
    """``[T, E*m]`` scores ``h_t . k`` of each token's candidate keys: candidate ``j`` is
    key ``j % m`` of the token's expert in slot ``j // m``.

    ``keys`` holds the consecutive experts ``first_expert, first_expert + 1, ...`` (all of
    them, or one rank's share in the sharded store); candidates of experts outside it
    score ``-inf``.
    """
    tokens, per_token = experts.shape
    held = keys.shape[0] // m
    hidden = hidden.to(keys.dtype)
    flat = experts.reshape(-1) - first_expert
    outside = (flat < 0) | (flat >= held)
    flat = flat.masked_fill(outside, held)  # one extra bucket for experts held elsewhere
    # Group the (token, expert) pairs by expert: one matmul per expert in use.
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=held + 1).tolist()
    token_of = order // per_token
    scores = torch.empty(tokens * per_token, m, dtype=keys.dtype)
    start = 0
    for expert, count in enumerate(counts[:held]):
        if count == 0:
            continue
        end = start + count
        block = keys[expert * m : (expert + 1) * m]
        torch.matmul(hidden.index_select(0, token_of[start:end]), block.t(), out=scores[start:end])
        start = end
    scores[start:] = float("-inf")
    # Back to (token, expert slot) order.
    unsorted = torch.empty_like(scores)
    unsorted[order] = scores
    return unsorted.view(tokens, per_token * m)
