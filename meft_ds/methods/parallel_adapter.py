"""Dense parallel adapter beside every FFN (the dense twin of the sparse adapter)."""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from meft_ds.baselines.adapters import ACTIVATIONS, BottleneckAdapter, ParallelBlock, freeze
from meft_ds.errors import UserError
from meft_ds.methods import register
from meft_ds.methods.base import Method
from meft_ds.models import arch


@dataclasses.dataclass
class ParallelAdapterOptions:
    """Width and placement of the dense adapters."""

    adapter_size: int = dataclasses.field(default=256, metadata={"help": "adapter width r"})
    adapter_activation: str = dataclasses.field(
        default="relu", metadata={"help": "activation", "choices": sorted(ACTIVATIONS)}
    )
    adapter_dropout: float = dataclasses.field(default=0.0, metadata={"help": "adapter dropout"})
    adapter_scale: float = dataclasses.field(default=1.0, metadata={"help": "output scale"})
    layer_start: int = dataclasses.field(default=0, metadata={"help": "first adapted layer"})
    layer_end: int | None = dataclasses.field(
        default=None, metadata={"help": "one past the last adapted layer (default: all)"}
    )

    def validate(self) -> None:
        """Reject impossible values."""
        if self.adapter_size <= 0:
            raise UserError(f"adapter_size must be > 0, got {self.adapter_size}")
        if self.adapter_activation not in ACTIVATIONS:
            raise UserError(f"adapter_activation must be one of {', '.join(ACTIVATIONS)}")
        if not 0.0 <= self.adapter_dropout < 1.0:
            raise UserError(f"adapter_dropout must be in [0, 1), got {self.adapter_dropout}")


@register
class ParallelAdapter(Method):
    """``FFN(h) + up(act(down(h)))`` in each chosen layer; the base model is frozen."""

    name = "parallel_adapter"
    help = "dense bottleneck adapter parallel to each FFN"
    Options = ParallelAdapterOptions
    resume_free = frozenset({"adapter_dropout"})

    def check_config(self, config: Any) -> None:
        """A supported decoder family (:data:`meft_ds.models.arch.FAMILIES`)."""
        arch.family(config, self.name)

    def check_model(self, model: nn.Module) -> None:
        """A supported family; the layer range must lie inside the model."""
        arch.family_of(model, self.name)
        arch.check_layer_range(model, self.options.layer_start, self.options.layer_end, "adapter")

    def apply(self, model: nn.Module) -> nn.Module:
        """Freeze the model and wrap each chosen layer's FFN block (a whole mixture of
        experts included)."""
        family = arch.family_of(model, self.name)
        freeze(model)
        opts = self.options
        dim = arch.hidden_size(model)
        blocks = arch.layers(model)
        for i in arch.check_layer_range(model, opts.layer_start, opts.layer_end, "adapter"):
            adapter = BottleneckAdapter(
                dim, opts.adapter_size, opts.adapter_activation, opts.adapter_dropout,
                opts.adapter_scale,
            )
            family.set_ffn(blocks[i], ParallelBlock(family.part(blocks[i], "ffn"), adapter))
        return model
