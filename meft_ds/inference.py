"""Rebuild a model with an exported adapter for evaluation or generation."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from meft_ds import export, methods, options
from meft_ds.errors import UserError
from meft_ds.methods.base import Method
from meft_ds.models import loader
from meft_ds.precision import DTYPES, cast_parameters


@dataclass
class AdaptedModel:
    """A base model with a trained adapter loaded, ready for ``logits(ids, mask)``."""

    method: Method
    module: nn.Module
    tokenizer: Any
    config: dict[str, Any]

    @torch.no_grad()
    def logits(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Next-token logits through the adapted model."""
        return self.method.forward(self.module, ids, mask)


def load_adapted(directory: str | Path, model: str | None = None,
                 device: str | torch.device = "cpu", weights: bool = True,
                 dtype: str | None = None) -> AdaptedModel:
    """Load the base model named in the adapter config (or ``model``) plus the adapter
    (``weights=False``: the same adapter freshly initialised, as before training), in
    ``dtype`` (fp32/bf16/fp16; ``None``: the dtype it trained in, fp32 where the adapter
    does not say). A complete model (a ``full`` export) is loaded from ``directory``."""
    directory = Path(directory)
    meta, tensors = export.read_adapter(directory)
    name = dtype or meta.get("dtype") or "fp32"
    if name not in DTYPES:
        raise UserError(f"adapter {directory}: unknown dtype {name!r} (fp32, bf16 or fp16)")
    method_cls, opts = export_options(meta, f"adapter {directory}")  # before any loading
    own = weights and export.is_model(directory)
    # the attention kernel it trained with (older exports: transformers' default)
    loaded = loader.load_model(str(directory) if own else model or meta["model"],
                               attention=meta.get("attn_implementation", "auto"))
    method, module = apply_method(loaded.model, method_cls, opts,
                                  tensors if weights and not own else None)
    cast_parameters(module, DTYPES[name], device).eval()  # buffers as training had them
    return AdaptedModel(method, module, loaded.tokenizer, {**meta, "dtype": name})


def export_options(meta: dict[str, Any], context: str) -> tuple[type[Method], Any]:
    """The method class an export's metadata records, and its checked options."""
    method_cls = methods.get(meta["method"])
    recorded = {**method_cls.legacy_options, **meta["options"]}
    return method_cls, options.build(method_cls.Options, recorded, context=context)


def apply_method(model: nn.Module, method_cls: type[Method], opts: Any,
                 tensors: dict[str, torch.Tensor] | None) -> tuple[Method, nn.Module]:
    """``method_cls(opts)`` applied to ``model``, with trained ``tensors`` loaded (``None``:
    freshly initialised): (method, the module it returns)."""
    method = method_cls(opts, model.config)
    method.check_config(model.config)
    method.check_model(model)
    module = method.apply(model)
    if tensors is not None:
        method.load_trainable_state(module, tensors)
    return method, module
