"""Dense bottleneck adapters placed in parallel to a block (the FFN by default)."""

from __future__ import annotations

import torch
from torch import nn

ACTIVATIONS = {"relu": nn.ReLU, "silu": nn.SiLU, "gelu": nn.GELU}


class BottleneckAdapter(nn.Module):
    """``up(dropout(act(down(h)))) * scale`` with ``up`` zero-initialised (identity at step 0)."""

    def __init__(
        self, dim: int, width: int, activation: str = "relu", dropout: float = 0.0,
        scale: float = 1.0,
    ) -> None:
        super().__init__()
        self.down = nn.Linear(dim, width, bias=False)
        self.act = ACTIVATIONS[activation]()
        self.dropout = nn.Dropout(dropout)
        self.up = nn.Linear(width, dim, bias=False)
        self.scale = scale
        nn.init.normal_(self.down.weight, std=dim**-0.5)
        nn.init.zeros_(self.up.weight)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Adapter output for ``hidden`` ``[..., dim]``."""
        return self.up(self.dropout(self.act(self.down(hidden)))) * self.scale


class ParallelBlock(nn.Module):
    """``block(h) + adapter(h)``: wraps a frozen block (e.g. a decoder layer's MLP)."""

    def __init__(self, block: nn.Module, adapter: nn.Module) -> None:
        super().__init__()
        self.block = block
        self.adapter = adapter

    def forward(self, hidden: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """Frozen block output plus the adapter's correction."""
        return self.block(hidden, *args, **kwargs) + self.adapter(hidden)


def freeze(module: nn.Module) -> None:
    """Turn off gradients for every parameter of ``module``."""
    for param in module.parameters():
        param.requires_grad_(False)
