"""LoRA through PEFT."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn

from meft_ds.errors import UserError
from meft_ds.methods import register
from meft_ds.methods.base import Method, check_state
from meft_ds.models import arch

DEFAULT_TARGETS = "auto"  # the family table's projections, else every linear layer


@dataclasses.dataclass
class LoraOptions:
    """LoRA hyper-parameters."""

    lora_r: int = dataclasses.field(default=16, metadata={"help": "LoRA rank"})
    lora_alpha: float = dataclasses.field(default=32.0, metadata={"help": "LoRA alpha"})
    lora_dropout: float = dataclasses.field(default=0.05, metadata={"help": "LoRA dropout"})
    lora_targets: str = dataclasses.field(
        default=DEFAULT_TARGETS, metadata={
            "help": "comma-separated module names to adapt; auto: the family's attention "
                    "and FFN projections (phi3: qkv_proj,o_proj,gate_up_proj,down_proj), for "
                    "other families every linear layer but the LM head"}
    )

    def validate(self) -> None:
        """Reject impossible values."""
        if self.lora_r <= 0:
            raise UserError(f"lora_r must be > 0, got {self.lora_r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise UserError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if not self.lora_targets.strip():
            raise UserError("lora_targets is empty")


@register
class Lora(Method):
    """Low-rank adapters on the attention and MLP projections (PEFT), exported in PEFT's
    own format (``PeftModel.from_pretrained`` loads it)."""

    name = "lora"
    help = "LoRA adapters through PEFT"
    Options = LoraOptions
    resume_free = frozenset({"lora_dropout"})

    def apply(self, model: nn.Module) -> nn.Module:
        """Wrap ``model`` with PEFT LoRA modules; only those are trainable."""
        from peft import LoraConfig, get_peft_model

        targets: list[str] | str = [t.strip() for t in self.options.lora_targets.split(",")
                                    if t.strip()]
        if targets == [DEFAULT_TARGETS]:
            family = arch.FAMILIES.get(arch.model_type(model.config))
            targets = list(family.lora_targets) if family else "all-linear"
        names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
        unknown = [t for t in targets if t not in names] if isinstance(targets, list) else []
        if unknown:
            raise UserError(f"lora_targets: the model has no modules named {', '.join(unknown)}")
        config = LoraConfig(
            r=self.options.lora_r,
            lora_alpha=self.options.lora_alpha,
            lora_dropout=self.options.lora_dropout,
            target_modules=targets,
            task_type="CAUSAL_LM",
        )
        return get_peft_model(model, config)

    def trainable_state(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """The adapter's tensors under PEFT's names (as its ``save_pretrained`` writes them)."""
        from peft import get_peft_model_state_dict

        return {k: v.detach().cpu() for k, v in get_peft_model_state_dict(module).items()}

    def load_trainable_state(self, module: nn.Module, state: dict[str, torch.Tensor]) -> None:
        """Load PEFT's tensors, or an adapter exported before meft_ds wrote PEFT's format
        (the module's own parameter names, with PEFT's adapter name ``.default.``)."""
        from peft import set_peft_model_state_dict

        if any(".default." in key for key in state):
            super().load_trainable_state(module, state)
            return
        wanted = {k: v.shape for k, v in self.trainable_state(module).items()}
        check_state(state, wanted, list(wanted))
        set_peft_model_state_dict(module, state)

    def save_export(self, module: nn.Module, state: dict[str, torch.Tensor], directory: Path,
                    tokenizer: Any) -> None:
        """PEFT's own ``save_pretrained``: its ``adapter_config.json`` and
        ``adapter_model.safetensors``."""
        module.save_pretrained(str(directory))
