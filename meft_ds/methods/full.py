"""Full fine-tuning: every weight is trained (the slow, memory-hungry baseline)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from meft_ds.methods import register
from meft_ds.methods.base import Method


@register
class FullFineTuning(Method):
    """All parameters trainable; exported as a complete transformers model."""

    name = "full"
    help = "full fine-tuning of every weight"

    def apply(self, model: nn.Module) -> nn.Module:
        """Unfreeze everything."""
        for param in model.parameters():
            param.requires_grad_(True)
        return model

    def save_export(self, module: nn.Module, state: dict[str, torch.Tensor], directory: Path,
                    tokenizer: Any) -> None:
        """The model as transformers saves it (config, safetensors weights, generation
        config) with its tokenizer: ``AutoModelForCausalLM.from_pretrained`` loads it."""
        module.save_pretrained(str(directory), state_dict=state)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(directory))
