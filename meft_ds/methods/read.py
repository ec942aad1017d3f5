"""READ: a recurrent side network across the frozen backbone's layers (Nguyen et al. 2023).

The backbone runs without gradients; a small GRU/RNN steps over its per-layer hidden
states and adds a correction to the final hidden state (see :mod:`meft_ds.read`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from meft_ds.baselines.adapters import freeze
from meft_ds.errors import UserError
from meft_ds.methods import register
from meft_ds.methods.base import Method
from meft_ds.models import arch
from meft_ds.read.adapter import ReadAdapter, read_layer_ids
from meft_ds.read.network import CELLS, ReadNetwork

ATTRIBUTE = "read_adapter"


@dataclasses.dataclass
class ReadOptions:
    """Width, cell type and layer stride of the READ network."""

    read_hidden: int = dataclasses.field(
        default=128, metadata={"help": "hidden size of the recurrent network"}
    )
    read_cell: str = dataclasses.field(
        default="gru", metadata={"help": "recurrent cell", "choices": list(CELLS)}
    )
    read_stride: int = dataclasses.field(
        default=1,
        metadata={"help": "read every m-th layer's output, counted back from the last layer"},
    )

    def validate(self) -> None:
        """Reject impossible values (the stride's upper bound is checked on the model)."""
        if self.read_hidden <= 0:
            raise UserError(f"read_hidden must be > 0, got {self.read_hidden}")
        if self.read_cell not in CELLS:
            raise UserError(f"read_cell must be one of {', '.join(CELLS)}, got {self.read_cell!r}")
        if self.read_stride < 1:
            raise UserError(f"read_stride must be >= 1, got {self.read_stride}")


@register
class Read(Method):
    """Frozen backbone under ``no_grad`` + recurrent side network on its hidden states."""

    name = "read"
    help = "READ: recurrent side network across layers, no backprop through the backbone"
    Options = ReadOptions

    def check_config(self, config: Any) -> None:
        self._check_stride(int(config.num_hidden_layers))

    def check_model(self, model: nn.Module) -> None:
        self._check_stride(len(arch.layers(model)))

    def _check_stride(self, num_layers: int) -> None:
        """The stride must select at least one layer of the model."""
        if self.options.read_stride > num_layers:
            raise UserError(
                f"read_stride {self.options.read_stride} is outside the model "
                f"(it has {num_layers} layers)"
            )

    def apply(self, model: nn.Module) -> nn.Module:
        """Freeze ``model`` and install the READ network into its decoder."""
        self.check_model(model)
        lm = arch.causal_lm(model)
        if hasattr(lm, ATTRIBUTE):
            raise UserError("this model already has a READ network")
        freeze(model)
        opts = self.options
        weight = lm.get_output_embeddings().weight
        network = ReadNetwork(arch.hidden_size(model), opts.read_hidden, opts.read_cell)
        network.to(device=weight.device, dtype=weight.dtype)
        adapter = ReadAdapter(network, read_layer_ids(len(arch.layers(model)), opts.read_stride))
        lm.add_module(ATTRIBUTE, adapter)
        adapter.install(lm)
        return model
