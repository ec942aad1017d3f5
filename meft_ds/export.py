"""Export trained adapters to safetensors + JSON, and load them back for inference."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from meft_ds.errors import UserError

WEIGHTS = "adapter.safetensors"
CONFIG = "adapter_config.json"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def module_dtype(module: torch.nn.Module) -> str:
    """Name of the dtype ``module`` computes in (its floating parameters'; DeepSpeed
    casts the whole module for bf16/fp16)."""
    for p in module.parameters():
        if p.is_floating_point():
            return next((k for k, v in DTYPES.items() if v == p.dtype), "fp32")
    return "fp32"


def _gathered(engine: Any):
    """Context that gathers ZeRO-3 partitioned parameters (no-op otherwise)."""
    import contextlib

    if engine.zero_optimization_stage() == 3:
        import deepspeed

        params = [p for p in engine.module.parameters() if p.requires_grad]
        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    return contextlib.nullcontext()


def data_record(cfg: Any) -> dict[str, Any]:
    """The run's data options, local paths made absolute (the evaluator may run elsewhere)."""
    from meft_ds.data import SHIPPED, DataSpec

    record = dataclasses.asdict(DataSpec.of(cfg))
    for key in ("dataset", "data_file", "heldout_file", "data_dir"):
        value = record[key]
        if key == "dataset" and value in SHIPPED:
            continue  # a shipped name stays a name, as the run read it
        if value and Path(value).expanduser().exists():
            record[key] = str(Path(value).expanduser().resolve())
    return record


def save_adapter(method: Any, engine: Any, directory: Path, cfg: Any, options: Any) -> None:
    """Write the method's trained tensors and the config needed to rebuild the model."""
    from safetensors.torch import save_file

    with _gathered(engine):
        state = method.trainable_state(engine.module)
    if dist.is_initialized() and dist.get_rank() != 0:
        return
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    save_file(tensors, str(directory / WEIGHTS))
    meta = {
        "method": cfg.method,
        "model": cfg.model,
        "options": dataclasses.asdict(options),
        "max_seq_len": cfg.max_seq_len,
        # the dtype the model ran in: evaluate.py rebuilds it so, to score as training did
        "dtype": module_dtype(engine.module),
        # what it trained on and how it was prompted, so that evaluate.py scores the same
        # questions in the same format by default
        "data": data_record(cfg),
        "prompt_format": cfg.prompt_format,
    }
    (directory / CONFIG).write_text(json.dumps(meta, indent=2))


def read_adapter(directory: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config, tensors) of an exported adapter."""
    from safetensors.torch import load_file

    cfg_path, weights = directory / CONFIG, directory / WEIGHTS
    if not cfg_path.is_file() or not weights.is_file():
        inner = directory / "adapter"
        hint = (f"; a training run's adapter is in {inner}" if (inner / CONFIG).is_file()
                else "")
        raise UserError(f"{directory} is not an exported adapter ({CONFIG} + {WEIGHTS}){hint}")
    try:
        meta = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{cfg_path} is not valid JSON ({exc})") from None
    keys = meta if isinstance(meta, dict) else {}
    lacking = [k for k in ("method", "model", "options") if k not in keys]
    if lacking:
        raise UserError(f"{cfg_path} lacks {', '.join(lacking)}: not written by meft_ds's export")
    try:
        tensors = load_file(str(weights))
    except Exception as exc:  # safetensors raises its own error type for damaged files
        raise UserError(f"{weights} cannot be read: {str(exc).splitlines()[0]}") from None
    return meta, tensors
