"""Export trained adapters, and read them back for inference.

Three layouts, each with the run's metadata (method, options, model, data, dtype, prompt
format) for :mod:`meft_ds.inference`:

- meft_ds's own (most methods): ``adapter.safetensors`` + ``adapter_config.json`` (the
  metadata);
- PEFT's (``lora``): what ``PeftModel.save_pretrained`` writes (its ``adapter_config.json``
  and ``adapter_model.safetensors``), so ``PeftModel.from_pretrained`` loads it, with the
  metadata in ``meft_ds.json``;
- a complete transformers model (``full``): config, safetensors weights, tokenizer and
  generation config for ``AutoModelForCausalLM.from_pretrained``, metadata in
  ``meft_ds.json`` (transformers would take an ``adapter_config.json`` there for a PEFT
  adapter's).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from meft_ds.errors import UserError
from meft_ds.precision import dtype_name

WEIGHTS = "adapter.safetensors"
CONFIG = "adapter_config.json"
META = "meft_ds.json"  # the metadata beside a PEFT adapter or a transformers model
PEFT_WEIGHTS = "adapter_model.safetensors"  # peft.utils.SAFETENSORS_WEIGHTS_NAME


def module_dtype(module: torch.nn.Module) -> str:
    """Name of the dtype ``module`` computes in (its floating parameters'; DeepSpeed
    casts the whole module for bf16/fp16)."""
    for p in module.parameters():
        if p.is_floating_point():
            return dtype_name(p.dtype)
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


def is_model(directory: Path) -> bool:
    """Whether an export is a complete transformers model (a ``full`` export)."""
    return (directory / "config.json").is_file()


def save_adapter(method: Any, engine: Any, directory: Path, cfg: Any, options: Any,
                 tokenizer: Any = None, attention: str = "auto") -> None:
    """Write the launcher run's adapter with :func:`write_export` (ZeRO-3 parameters
    gathered) and the metadata needed to rebuild the model and score it as it trained
    (``attention``: the resolved attention kernel it ran with)."""
    meta = {
        "method": cfg.method,
        "model": cfg.model,
        "options": dataclasses.asdict(options),
        "max_seq_len": cfg.max_seq_len,
        # the dtype the model ran in: evaluate.py rebuilds it so, to score as training did
        "dtype": module_dtype(engine.module),
        "attn_implementation": attention,
        # what it trained on and how it was prompted, so that evaluate.py scores the same
        # questions in the same format by default
        "data": data_record(cfg),
        "prompt_format": cfg.prompt_format,
    }
    with _gathered(engine):
        write_export(method, engine.module, directory, meta, tokenizer)


def write_export(method: Any, module: torch.nn.Module, directory: Path, meta: dict[str, Any],
                 tokenizer: Any = None) -> None:
    """Write the method's trained weights in its layout (:meth:`Method.save_export`) and
    ``meta``. The directory is replaced as a whole (written beside it first), so that no
    file of an earlier export stays. Every rank calls it (the state may be gathered); rank
    0 writes."""
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    tmp = directory.with_name(directory.name + ".tmp")
    state = method.trainable_state(module)  # on every rank: it may gather
    if not rank0:
        return
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    method.save_export(module, state, tmp, tokenizer)
    # beside a library's own files (PEFT's adapter_config.json, a model's config.json) the
    # metadata has a name of its own
    name = META if (tmp / CONFIG).exists() or is_model(tmp) else CONFIG
    (tmp / name).write_text(json.dumps(meta, indent=2))
    shutil.rmtree(directory, ignore_errors=True)
    tmp.replace(directory)


def read_meta(directory: Path) -> dict[str, Any]:
    """The metadata of an export (``meft_ds.json``, else meft_ds's ``adapter_config.json``)."""
    path = directory / META
    if not path.is_file():
        path = directory / CONFIG
    if not path.is_file():
        raise _not_an_export(directory)
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is not valid JSON ({exc})") from None
    keys = meta if isinstance(meta, dict) else {}
    lacking = [k for k in ("method", "model", "options") if k not in keys]
    if lacking:
        raise UserError(f"{path} lacks {', '.join(lacking)}: not written by meft_ds's export")
    return meta


def read_adapter(directory: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(metadata, trained tensors) of an export; no tensors for a complete model (its
    weights load with it)."""
    from safetensors.torch import load_file

    meta = read_meta(directory)
    if is_model(directory):
        if not any(directory.glob("*.safetensors")):
            raise _not_an_export(directory)
        return meta, {}
    weights = directory / (PEFT_WEIGHTS if (directory / META).is_file() else WEIGHTS)
    if not weights.is_file():
        raise _not_an_export(directory)
    try:
        tensors = load_file(str(weights))
    except Exception as exc:  # safetensors raises its own error type for damaged files
        raise UserError(f"{weights} cannot be read: {str(exc).splitlines()[0]}") from None
    return meta, tensors


def _not_an_export(directory: Path) -> UserError:
    inner = directory / "adapter"
    hint = (f"; a training run's adapter is in {inner}"
            if (inner / CONFIG).is_file() or (inner / META).is_file() else "")
    return UserError(f"{directory} is not an exported adapter ({CONFIG} + {WEIGHTS}, or "
                     f"{META} beside a PEFT adapter or a model){hint}")
