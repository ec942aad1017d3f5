"""Reversible adapters MEFT1/2/3 (``--method reversible``): no activations stored."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from meft_ds.errors import UserError
from meft_ds.methods import register
from meft_ds.methods.base import Method
from meft_ds.models import arch
from meft_ds.reversible.model import ReversibleLM
from meft_ds.reversible.options import RESUME_FREE, ReversibleOptions, check_deepspeed


@register
class Reversible(Method):
    """A frozen decoder turned into a two-stream reversible network by small adapters."""

    name = "reversible"
    help = "reversible adapters (MEFT1/2/3): inputs recomputed in backward, no activations"
    Options = ReversibleOptions
    resume_free = RESUME_FREE

    def check_deepspeed(self, ds: dict) -> None:
        check_deepspeed(self.options, ds)

    def check_config(self, config: Any) -> None:
        """A supported decoder family (:data:`meft_ds.models.arch.FAMILIES`)."""
        arch.family(config, self.name)

    def check_model(self, model: nn.Module) -> None:
        """Supported family, splittable layers, ``rev_layers`` inside the model."""
        arch.family_of(model, self.name)
        n = len(arch.layers(model))
        k = self.options.rev_layers
        if k is not None and not 1 <= k <= n:
            raise UserError(f"reversible: rev_layers={k} is outside the model's 1..{n} layers")

    def apply(self, model: nn.Module) -> nn.Module:
        """Freeze the model and wrap it with the reversible adapter stack."""
        self.check_model(model)
        self.model = ReversibleLM(model, self.options)
        return self.model

    def step_metrics(self) -> dict[str, float]:
        model = getattr(self, "model", None)
        return {} if model is None else model.step_metrics()

    def forward(
        self, module: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """Logits of the reversible model (the engine calls ``ReversibleLM.forward``)."""
        return module(input_ids=input_ids, attention_mask=attention_mask)

    def generation_model(self, module: nn.Module) -> nn.Module | None:
        """The :class:`ReversibleLM` itself: its ``generate`` decodes with a KV cache."""
        return module if isinstance(module, ReversibleLM) else None
