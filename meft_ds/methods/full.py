"""Full fine-tuning: every weight is trained (the slow, memory-hungry baseline)."""

from __future__ import annotations

from torch import nn

from meft_ds.methods import register
from meft_ds.methods.base import Method


@register
class FullFineTuning(Method):
    """All parameters trainable."""

    name = "full"
    help = "full fine-tuning of every weight"

    def apply(self, model: nn.Module) -> nn.Module:
        """Unfreeze everything."""
        for param in model.parameters():
            param.requires_grad_(True)
        return model
