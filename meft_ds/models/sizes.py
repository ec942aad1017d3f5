"""Parameter counts and host-memory estimates from a model config (no weights needed)."""

from __future__ import annotations

import copy
from typing import Any

import torch

FULL_STATE_BYTES = 16  # fp32 master copy + grad + two Adam moments per trained parameter


def count_params(config: Any) -> int:
    """Parameters of the causal LM ``config`` describes, any family (tied weights once):
    the model is built on the meta device, which allocates nothing."""
    return _counts(config)[0]


def largest_tensor(config: Any) -> int:
    """Elements of the largest weight of the model ``config`` describes."""
    return _counts(config)[1]


def _counts(config: Any) -> tuple[int, int]:
    from transformers import AutoModelForCausalLM

    key = config.to_json_string(use_diff=False)
    if key not in _COUNTS:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(copy.deepcopy(config))
        sizes = [p.numel() for p in model.parameters()]
        _COUNTS[key] = (sum(sizes), max(sizes))
    return _COUNTS[key]


_COUNTS: dict[str, tuple[int, int]] = {}
# a ZeRO-3 partitioned load holds, besides its share, about this many copies of the
# largest weight at once (built whole under zero.Init, then gathered to load it):
# measured 2.0 at the 7B width, at 2 and at 4 layers (bench/results/model_load.json)
ZERO3_TRANSIENT_COPIES = 2


def estimate_host_bytes(config: Any, method: str, dtype: torch.dtype, cuda: bool,
                        zero3_ranks: int = 1) -> int:
    """Host RAM one rank needs before training starts: the weights loaded in ``dtype``,
    plus, on a CPU-only machine, the optimizer state of every weight for full
    fine-tuning. ``zero3_ranks``: ZeRO-3 over this many ranks, each holding its share of
    both (loaded partitioned) and a few whole copies of the largest weight while loading."""
    n = count_params(config)
    need = n * dtype.itemsize
    if method == "full" and not cuda:
        need += n * FULL_STATE_BYTES
    if zero3_ranks > 1:
        need = -(-need // zero3_ranks) + ZERO3_TRANSIENT_COPIES * largest_tensor(
            config) * dtype.itemsize
    return need
