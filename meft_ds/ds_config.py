"""DeepSpeed JSON configs: reading, the ``"meft"`` section, and filling ``"auto"`` values.

A config file is a normal DeepSpeed JSON plus an optional ``"meft"`` object holding this
project's defaults for the run (training and method options, by flag name). Inside it,
``"when_no_cuda"`` holds overrides applied on machines without CUDA (shorter training
on a CPU), and may itself hold a ``"deepspeed"`` object merged into the DeepSpeed keys.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from meft_ds.errors import UserError

MEFT_KEY = "meft"
NO_CUDA_KEY = "when_no_cuda"


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge; ``extra`` wins."""
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def read_json(path: str | Path, what: str) -> dict[str, Any]:
    """Load a JSON object or fail with one line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {path} does not exist")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{what} {path}:{exc.lineno}: invalid JSON ({exc.msg})") from None
    if not isinstance(data, dict):
        raise UserError(f"{what} {path} must hold a JSON object")
    return data


def split_config(data: dict[str, Any], cuda: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """(DeepSpeed dict, meft option dict) with the no-CUDA overrides applied if needed."""
    ds = {k: v for k, v in data.items() if k != MEFT_KEY}
    meft = dict(data.get(MEFT_KEY, {}))
    if not isinstance(meft, dict):
        raise UserError(f"config key {MEFT_KEY!r} must be an object")
    overrides = meft.pop(NO_CUDA_KEY, {})
    if not cuda and overrides:
        overrides = dict(overrides)
        ds = deep_merge(ds, overrides.pop("deepspeed", {}))
        meft.update(overrides)
    return ds, meft


def _check_positive_int(ds: dict[str, Any], key: str) -> None:
    value = ds.get(key)
    if value is not None and value != "auto" and (not isinstance(value, int) or value <= 0):
        raise UserError(f"DeepSpeed config: {key} must be a positive integer or 'auto'")


def finalize(
    ds: dict[str, Any],
    *,
    world_size: int,
    max_steps: int,
    warmup_ratio: float,
    lr: float | None,
    micro_batch: int | None,
    grad_accum: int | None,
    cuda: bool,
) -> dict[str, Any]:
    """Resolve batch sizes, schedule lengths and ``"auto"`` values; validate the rest."""
    ds = copy.deepcopy(ds)
    if micro_batch is not None:
        ds["train_micro_batch_size_per_gpu"] = micro_batch
    if grad_accum is not None:
        ds["gradient_accumulation_steps"] = grad_accum
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                "train_batch_size"):
        _check_positive_int(ds, key)
    mb = ds.get("train_micro_batch_size_per_gpu", "auto")
    gas = ds.get("gradient_accumulation_steps", "auto")
    if mb == "auto":
        raise UserError(
            "DeepSpeed config: set train_micro_batch_size_per_gpu (or --micro_batch_size)"
        )
    gas = 1 if gas == "auto" else gas
    ds["train_micro_batch_size_per_gpu"] = mb
    ds["gradient_accumulation_steps"] = gas
    ds["train_batch_size"] = mb * gas * world_size
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise UserError(f"DeepSpeed config: zero_optimization.stage must be 0-3, got {stage!r}")
    if not cuda and ds.get("fp16", {}).get("enabled"):
        raise UserError("DeepSpeed config: fp16 does not work on CPU; use bf16 or fp32")
    opt = ds.get("optimizer")
    if opt is None:
        raise UserError("DeepSpeed config: an 'optimizer' section is required")
    params = opt.setdefault("params", {})
    if lr is not None or params.get("lr", "auto") == "auto":
        params["lr"] = lr if lr is not None else 1e-4
    sched = ds.get("scheduler")
    if sched is not None:
        sp = sched.setdefault("params", {})
        fills = {
            "total_num_steps": max_steps,
            "warmup_num_steps": max(1, int(max_steps * warmup_ratio)),
            "warmup_max_lr": params["lr"],
            "warmup_min_lr": 0.0,
        }
        for key, value in fills.items():
            if sp.get(key) == "auto":
                sp[key] = value
        if lr is not None and "warmup_max_lr" in sp:
            sp["warmup_max_lr"] = lr
    return ds


def bf16_enabled(ds: dict[str, Any]) -> bool:
    """Whether the engine computes in bf16."""
    return bool(ds.get("bf16", {}).get("enabled")) or bool(ds.get("bfloat16", {}).get("enabled"))
