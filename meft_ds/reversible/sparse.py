"""``--method sparse --reversible``: the reversible stack with the sparse adapter beside
every FFN.

The sparse adapter is the FFN-parallel adapter of each reversible layer (in F for MEFT1,
in G for MEFT2/MEFT3); the other places (MEFT1/2's stand-alone stream adapter, MEFT3's
attention adapter) get dense bottleneck adapters of ``rev_adapter_size``. The backward
recompute replays each adapter's forward row selection (``rev_capture``/``rev_replay``).
The reversible layers are the sparse adapter's layers (``layer_start``/``layer_end``),
which must reach the top or the bottom of the model.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from torch import nn

from meft_ds.errors import UserError
from meft_ds.models import arch
from meft_ds.reversible.model import ReversibleLM
from meft_ds.reversible.options import ReversibleOptions
from meft_ds.sparse.adapter import SparseAdapter
from meft_ds.sparse.options import SparseOptions
from meft_ds.sparse.runtime import SparseRuntime


@dataclass
class SparseMethodOptions(SparseOptions, ReversibleOptions):
    """The sparse adapter's options, and the reversible ones for ``--reversible``."""

    reversible: bool = field(default=False, metadata={
        "help": "reversible MEFT1/2/3 stack (rev_* options) with the sparse adapter beside "
                "each FFN; the sparse layers are the reversible ones",
    })

    def validate(self) -> None:
        """Both groups' checks; ``rev_*`` options only with ``--reversible``."""
        SparseOptions.validate(self)
        ReversibleOptions.validate(self)
        if self.reversible:
            if self.rev_layers is not None or self.rev_position != "top":
                raise UserError(
                    "sparse `reversible`: the reversible layers are the sparse layers; choose "
                    "them with layer_start/layer_end, not rev_layers/rev_position"
                )
            return
        changed = [f.name for f in dataclasses.fields(ReversibleOptions)
                   if getattr(self, f.name) != f.default]
        if changed:
            raise UserError(f"sparse: `{changed[0]}` needs `reversible`")


def reversible_options(
    options: SparseMethodOptions, layers: range, depth: int
) -> ReversibleOptions:
    """The reversible stack's options: the sparse layer range as a top or bottom span."""
    if layers.stop == depth:
        position = "top"
    elif layers.start == 0:
        position = "bottom"
    else:
        raise UserError(
            f"sparse `reversible`: layers [{layers.start}, {layers.stop}) must reach the top "
            f"(layer_end unset) or start at layer 0 of the model's {depth} layers"
        )
    values = {f.name: getattr(options, f.name) for f in dataclasses.fields(ReversibleOptions)}
    values.update(rev_layers=len(layers), rev_position=position)
    return ReversibleOptions(**values)


def wrap(
    model: nn.Module, options: SparseMethodOptions, runtime: SparseRuntime,
    adapters: dict[int, SparseAdapter],
) -> ReversibleLM:
    """``model`` (frozen) as a reversible LM; the sparse adapters built are put in
    ``adapters`` (layer -> adapter)."""
    layers = runtime.sizes.layers
    rev = reversible_options(options, range(layers[0], layers[-1] + 1), len(arch.layers(model)))
    reference = next(model.parameters())

    def make(index: int, place: str) -> nn.Module | None:
        if place != "ffn":
            return None  # a dense bottleneck adapter
        adapter = SparseAdapter(runtime, index).to(device=reference.device, dtype=reference.dtype)
        adapters[index] = adapter
        return adapter

    return ReversibleLM(model, rev, make)
