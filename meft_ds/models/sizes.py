"""Parameter counts and host-memory estimates from a model config (no weights needed)."""

from __future__ import annotations

import copy
from typing import Any

import torch

FULL_STATE_BYTES = 16  # fp32 master copy + grad + two Adam moments per trained parameter


def count_params(config: Any) -> int:
    """Parameters of the causal LM ``config`` describes, any family (tied weights once):
    the model is built on the meta device, which allocates nothing."""
    from transformers import AutoModelForCausalLM

    key = config.to_json_string(use_diff=False)
    if key not in _COUNTS:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(copy.deepcopy(config))
        _COUNTS[key] = sum(p.numel() for p in model.parameters())
    return _COUNTS[key]


_COUNTS: dict[str, int] = {}


def estimate_host_bytes(config: Any, method: str, dtype: torch.dtype, cuda: bool) -> int:
    """Host RAM a run needs before training starts: the weights loaded in ``dtype``, plus,
    on a CPU-only machine, the optimizer state of every weight for full fine-tuning."""
    n = count_params(config)
    need = n * dtype.itemsize
    if method == "full" and not cuda:
        need += n * FULL_STATE_BYTES
    return need
