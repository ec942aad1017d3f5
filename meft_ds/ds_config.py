"""DeepSpeed JSON configs: reading, the ``"meft"`` section, and filling ``"auto"`` values.

A config file is a normal DeepSpeed JSON plus an optional ``"meft"`` object holding this
project's defaults for the run (training and method options, by flag name). Inside it,
``"when_no_cuda"`` holds overrides applied on machines without CUDA (shorter training
on a CPU), and may itself hold a ``"deepspeed"`` object merged into the DeepSpeed keys.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any

import torch

from meft_ds.build_lock import prefer_interpreter_ninja
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
    meft = _object(data.get(MEFT_KEY, {}), repr(MEFT_KEY))
    overrides = _object(meft.pop(NO_CUDA_KEY, {}), f"{MEFT_KEY}.{NO_CUDA_KEY}")
    nested = _object(overrides.pop("deepspeed", {}), f"{MEFT_KEY}.{NO_CUDA_KEY}.deepspeed")
    if not cuda:
        ds = deep_merge(ds, nested)
        meft.update(overrides)
    return ds, meft


def _object(value: Any, where: str) -> dict[str, Any]:
    """A copy of a JSON object; anything else is a one-line error."""
    if not isinstance(value, dict):
        raise UserError(f"config key {where} must be a JSON object, got {json.dumps(value)}")
    return dict(value)


def _check_positive_int(ds: dict[str, Any], key: str) -> None:
    value = ds.get(key)
    if value is not None and value != "auto" and (not isinstance(value, int) or value <= 0):
        raise UserError(f"DeepSpeed config: {key} must be a positive integer or 'auto'")


def _check_optimizer_type(name: Any) -> None:
    """DeepSpeed takes its own optimizers (any case) or a ``torch.optim`` class name."""
    import torch
    from deepspeed.runtime.config import DEEPSPEED_OPTIMIZERS

    if isinstance(name, str) and (name.lower() in DEEPSPEED_OPTIMIZERS
                                  or getattr(torch.optim, name, None) is not None):
        return
    raise UserError(
        f"DeepSpeed config: optimizer.type {name!r} is neither a DeepSpeed optimizer "
        f"({', '.join(DEEPSPEED_OPTIMIZERS)}) nor a torch.optim class"
    )


def initialize(**kwargs: Any) -> tuple:
    """``deepspeed.initialize``; a config DeepSpeed's schema rejects is a one-line error."""
    import deepspeed
    import pydantic
    from deepspeed.utils import logger

    prefer_interpreter_ninja()  # the engine JIT-builds its ops (e.g. CPU Adam) with it

    quiet = _DropMessage("Attempting to get learning rate from scheduler before it has started")
    logger.addFilter(quiet)  # WarmupLR's own start-up, which start_schedule then moves on
    try:
        return deepspeed.initialize(**kwargs)
    except pydantic.ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first.get("loc", ()))
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise UserError(
            f"DeepSpeed config: {exc.title} {where}: {first.get('msg', exc)}{more}"
        ) from None
    finally:
        logger.removeFilter(quiet)


class _DropMessage(logging.Filter):
    """Drops log records that start with one text."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


def _accumulation(total: int | str, micro: int, accum: int | str, world_size: int) -> int:
    """Gradient accumulation steps from the three batch sizes, as DeepSpeed relates them
    (``train_batch_size = micro x accumulation x ranks``); a contradiction is refused."""
    if total == "auto":
        return 1 if accum == "auto" else accum
    if accum == "auto":
        if total % (micro * world_size):
            raise UserError(
                f"DeepSpeed config: train_batch_size {total} is not a multiple of "
                f"train_micro_batch_size_per_gpu {micro} x {world_size} rank(s)"
            )
        return total // (micro * world_size)
    if total != micro * accum * world_size:
        raise UserError(
            f"DeepSpeed config: train_batch_size {total} != train_micro_batch_size_per_gpu "
            f"{micro} x gradient_accumulation_steps {accum} x {world_size} rank(s); "
            "set two of them (or 'auto')"
        )
    return accum


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
            "DeepSpeed config: set train_micro_batch_size_per_gpu (or `micro_batch_size`)"
        )
    gas = _accumulation(ds.get("train_batch_size", "auto"), mb, gas, world_size)
    ds["train_micro_batch_size_per_gpu"] = mb
    ds["gradient_accumulation_steps"] = gas
    ds["train_batch_size"] = mb * gas * world_size
    clip = ds.get("gradient_clipping")
    if clip is not None and (isinstance(clip, bool) or not isinstance(clip, int | float)
                             or clip < 0):
        raise UserError(f"DeepSpeed config: gradient_clipping must be a number >= 0, "
                        f"got {json.dumps(clip)}")
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise UserError(f"DeepSpeed config: zero_optimization.stage must be 0-3, got {stage!r}")
    if not cuda and ds.get("fp16", {}).get("enabled"):
        raise UserError("DeepSpeed config: fp16 does not work on CPU; use bf16 or fp32")
    opt = ds.get("optimizer")
    if opt is None:
        raise UserError("DeepSpeed config: an 'optimizer' section is required")
    _check_optimizer_type(opt.get("type"))
    params = opt.setdefault("params", {})
    if lr is not None or params.get("lr", "auto") == "auto":
        params["lr"] = lr if lr is not None else 1e-4
    sched = ds.get("scheduler")
    if sched is not None:
        sp = sched.setdefault("params", {})
        fills = {
            # +1: see start_schedule (step k runs at iteration k, so the last step's rate
            # is not zero)
            "total_num_steps": max_steps + 1,
            # DeepSpeed's WarmupLR raises anything below 2 to 2
            "warmup_num_steps": max(2, int(max_steps * warmup_ratio)),
            "warmup_max_lr": params["lr"],
            "warmup_min_lr": 0.0,
        }
        for key, value in fills.items():
            if sp.get(key) == "auto":
                sp[key] = value
        if lr is not None and "warmup_max_lr" in sp:
            sp["warmup_max_lr"] = lr
    return ds


def zero_stage(ds: dict[str, Any]) -> int:
    """The config's ZeRO stage (0 where it sets none)."""
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def bf16_enabled(ds: dict[str, Any]) -> bool:
    """Whether the engine computes in bf16."""
    return bool(ds.get("bf16", {}).get("enabled")) or bool(ds.get("bfloat16", {}).get("enabled"))


def model_dtype(ds: dict[str, Any]) -> torch.dtype:
    """The dtype the engine keeps the model's weights in (what the weights load in)."""
    if bf16_enabled(ds):
        return torch.bfloat16
    return torch.float16 if ds.get("fp16", {}).get("enabled") else torch.float32


def start_schedule(engine: Any) -> bool:
    """Make optimizer step k run at DeepSpeed WarmupLR/WarmupDecayLR iteration k.

    Fresh, those schedulers sit at iteration -1 with the minimum rate and move to
    iteration 0, again the minimum (warm-up gamma 0), after the first step: the first
    two steps would change nothing. Moving a fresh scheduler to iteration 1 makes step 1
    run at max_lr/warmup_num_steps. Resuming loads the scheduler's iteration from the
    checkpoint afterwards. Returns whether the scheduler was moved.
    """
    from deepspeed.runtime.lr_schedules import WarmupLR

    sched = getattr(engine, "lr_scheduler", None)
    if not isinstance(sched, WarmupLR) or sched.last_batch_iteration != -1:
        return False
    sched.step(1)
    return True


def reapply_schedule(engine: Any) -> None:
    """After a checkpoint load: set the optimizer's rate from the scheduler at its loaded
    iteration. The checkpoint restores the rate the *saved* schedule set for the next
    step; with another --max_steps or --lr the scheduler (built from this run's config)
    gives another one, and the next step must use it. Unchanged, it is the same number."""
    sched = getattr(engine, "lr_scheduler", None)
    iteration = getattr(sched, "last_batch_iteration", None)
    if isinstance(iteration, int) and iteration >= 0:
        sched.step(iteration)
