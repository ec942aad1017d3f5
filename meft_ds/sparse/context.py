"""Context routing (``--sparse_route context``): what picks a token's experts.

The paper routes each token by its own FFN input ``x_t``. At the position that predicts
an answer's first token (the prompt's last token, the same for every fact) those inputs
are nearly equal across facts (mean cosine 0.93 on SmolLM2-135M), so every fact picks the
same experts and rows there and their updates overwrite each other
(``bench/sparse_overlap.py``). Context routing picks the experts from the causal mean of
the sequence's adapter inputs up to the token, minus a fixed centre ``c`` (the mean of
those means over the first training step's tokens, see below):

    q_t = (1 / n_t) sum_{s <= t, s not padding} x_s  -  c          [T, d]

The question's tokens make ``q_t`` differ between facts; subtracting ``c`` removes what
every sequence shares (template, position), which otherwise dominates it. The launcher
sets ``c`` before the first step from all of that step's micro-batches on all ranks
(:meth:`SparseMethod.calibrate`: the same centre however ranks and accumulation split the
batch); a loop that does not call it gets ``c`` from its first training micro-batch. The keys inside
the chosen experts are still matched against ``x_t``, so the rows also depend on the token.

Incremental decoding with a KV cache sees one new token per call: the running sums of the
sequences are carried from call to call (:class:`Carry`), so a cached step routes as the
full forward would.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from meft_ds import dist as mdist


@dataclass(frozen=True)
class Carry:
    """Running sums of the sequences being decoded: ``total`` ``[B, d]`` (sum of the
    non-padding inputs so far), ``count`` ``[B]`` (how many)."""

    total: torch.Tensor
    count: torch.Tensor


def prefix_mean(hidden: torch.Tensor, mask: torch.Tensor | None, carry: Carry | None = None
                ) -> tuple[torch.Tensor, Carry]:
    """Causal mean over the non-padding positions of ``hidden`` ``[B, T, d]`` (``mask``
    ``[B, >= T]``, its last ``T`` columns are this call's; ``None`` = no padding), continued
    from ``carry``; returns the means ``[B, T, d]`` (fp32) and the carry after the call.
    A padding position's mean is that of the real tokens before it (0 before any)."""
    b, t, _ = hidden.shape
    if mask is None:
        keep = torch.ones(b, t, dtype=torch.float32, device=hidden.device)
    else:
        keep = mask[:, -t:].to(device=hidden.device, dtype=torch.float32)
    total = (hidden.float() * keep[..., None]).cumsum(1)
    count = keep.cumsum(1)
    if carry is not None:
        total = total + carry.total[:, None]
        count = count + carry.count[:, None]
    means = total / count.clamp(min=1.0)[..., None]
    return means, Carry(total[:, -1].detach(), count[:, -1].detach())


def row_sum(rows: torch.Tensor) -> torch.Tensor:
    """``[sum of rows, row count]`` ``[d + 1]`` in fp64 (sums of several micro-batches and
    ranks then round alike whatever their order)."""
    count = torch.full((1,), float(rows.shape[0]), dtype=torch.float64, device=rows.device)
    return torch.cat([rows.detach().double().sum(0), count])  # (a fill: no host copy)


def data_parallel_mean(total: torch.Tensor, group=None) -> torch.Tensor:
    """The mean (fp32 ``[d]``) of the rows summed in ``total`` (:func:`row_sum`, summed over
    micro-batches) on every data-parallel rank together: the same centre on every rank."""
    if mdist.world_size(group) > 1:
        moved = total.to(mdist.comm_device(group))
        torch.distributed.all_reduce(moved, group=group)
        total = moved.to(total.device)
    return (total[:-1] / total[-1].clamp(min=1.0)).float()
