"""Encoded examples -> micro-batches, in a deterministic order that depends only on
(seed, global micro-batch index): a resumed or data-parallel run sees exactly the batches
of an uninterrupted single-process run."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from meft_ds.data.prompts import IGNORE, encode_ids
from meft_ds.data.records import QAExample
from meft_ds.errors import UserError


@dataclass
class Encoded:
    """Token ids of one training example and its loss mask."""

    input_ids: list[int]
    labels: list[int]


def encode(example: QAExample, tokenizer: Any, max_len: int, vocab_size: int,
           fmt: str = "plain") -> Encoded:
    """One example's ids and labels in prompt format ``fmt`` (see :mod:`.prompts`)."""
    return Encoded(*encode_ids(example, fmt, tokenizer, max_len, vocab_size))


def check_answers_kept(encoded: list[Encoded], max_len: int) -> int:
    """How many examples lose their whole answer to truncation at ``max_len`` (they add
    no loss); refused when that is all of them (every step's loss would be undefined)."""
    lost = sum(1 for e in encoded if all(t == IGNORE for t in e.labels))
    if encoded and lost == len(encoded):
        raise UserError(
            f"`max_seq_len` {max_len} truncates the answer of every training example "
            "(prompt + answer must fit); raise it"
        )
    return lost


def collate(items: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a micro-batch."""
    width = max(len(x.input_ids) for x in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, item in enumerate(items):
        n = len(item.input_ids)
        ids[row, :n] = torch.tensor(item.input_ids)
        labels[row, :n] = torch.tensor(item.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


class BatchSchedule:
    """Deterministic micro-batches addressed by a global micro-batch index.

    Epoch ``e`` uses the permutation drawn from ``seed + e``; micro-batch ``g`` is slice
    ``g mod per_epoch`` of epoch ``g // per_epoch``. For optimizer step ``s``,
    accumulation index ``a`` and rank ``r`` of ``W`` the index is ``(s*A + a)*W + r``,
    so the same examples form step ``s`` for any (A, W) with the same A*W.
    """

    def __init__(self, encoded: list[Encoded], micro_batch: int, seed: int, pad_id: int) -> None:
        if len(encoded) < micro_batch:
            raise UserError(
                f"{len(encoded)} training examples are fewer than one micro-batch ({micro_batch})"
            )
        self.encoded = encoded
        self.micro_batch = micro_batch
        self.seed = seed
        self.pad_id = pad_id
        self.per_epoch = len(encoded) // micro_batch
        self._perm_epoch = -1
        self._perm: list[int] = []

    def _permutation(self, epoch: int) -> list[int]:
        if epoch != self._perm_epoch:
            gen = torch.Generator().manual_seed(self.seed + epoch)
            self._perm = torch.randperm(len(self.encoded), generator=gen).tolist()
            self._perm_epoch = epoch
        return self._perm

    def batch(self, index: int) -> dict[str, torch.Tensor]:
        """Micro-batch number ``index`` (global over epochs and ranks)."""
        epoch, slot = divmod(index, self.per_epoch)
        perm = self._permutation(epoch)
        chosen = perm[slot * self.micro_batch : (slot + 1) * self.micro_batch]
        return collate([self.encoded[i] for i in chosen], self.pad_id)

    @staticmethod
    def index(step: int, accum: int, accum_steps: int, rank: int, world: int) -> int:
        """Global micro-batch index of (optimizer step, accumulation slot, rank)."""
        return (step * accum_steps + accum) * world + rank
