"""The interface every fine-tuning method implements.

A method is one module in ``meft_ds/methods/`` that defines a :class:`Method` subclass
decorated with :func:`meft_ds.methods.register`. The launcher:

1. builds ``Options`` (a dataclass) from CLI flags / config files and validates it;
2. calls ``apply(model)``: the method freezes what it does not train, adds its modules
   and returns the ``nn.Module`` handed to ``deepspeed.initialize`` (its parameters with
   ``requires_grad=True`` are the engine optimizer's);
3. computes ``forward(module, input_ids, attention_mask) -> logits`` each micro-batch;
4. calls the hooks around the DeepSpeed engine's backward/step for state that lives
   outside the engine (the sparse adapter's CPU row store);
5. saves/loads that external state in checkpoints, and exports/imports trained weights.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from meft_ds.errors import UserError


@dataclasses.dataclass
class NoOptions:
    """A method without options."""

    def validate(self) -> None:
        """Nothing to check."""


class Method:
    """Base class: full defaults for a method whose state is all inside the engine."""

    name: ClassVar[str] = ""
    help: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    # Options a resumed run may change: how the run executes or regularises, not what its
    # checkpoint holds (--resume refuses a change of any other option: run_dir).
    resume_free: ClassVar[frozenset[str]] = frozenset()
    # Values of options that change what the trained tensors mean, for exports written
    # before the option existed (its default may differ from what those runs used).
    legacy_options: ClassVar[dict[str, Any]] = {}

    def __init__(self, options: Any, model_config: Any) -> None:
        self.options = options
        self.model_config = model_config

    # --- model construction -------------------------------------------------------
    def check_config(self, config: Any) -> None:
        """Raise ``UserError`` for options the model's config rules out, before loading."""

    def check_deepspeed(self, ds: dict[str, Any]) -> None:
        """Raise ``UserError`` for a DeepSpeed configuration this method cannot train with."""

    def host_bytes(self, config: Any) -> int:
        """Host RAM the method allocates outside the model (checked before loading)."""
        return 0

    def check_model(self, model: nn.Module) -> None:
        """Raise ``UserError`` if this method cannot run on ``model`` (e.g. layer range)."""

    def apply(self, model: nn.Module) -> nn.Module:
        """Freeze/augment ``model``; return the module that goes into the engine."""
        raise NotImplementedError

    def forward(
        self, module: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """Logits ``[batch, seq, vocab]`` of the (engine-wrapped) module."""
        return module(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    def generation_model(self, module: nn.Module) -> nn.Module | None:
        """A transformers model whose ``generate`` equals decoding with :meth:`forward`.

        Methods with a custom forward get ``None`` (generation then recomputes each prefix).
        """
        if type(self).forward is not Method.forward:
            return None
        return module if hasattr(module, "generate") else None

    def parameter_groups(self, trainable: list[nn.Parameter]) -> list[Any]:
        """The engine optimizer's parameters: ``trainable`` (those with ``requires_grad``)
        as one group, or as groups (dicts) with their own hyper-parameters; a key a
        group leaves out takes the DeepSpeed config's value."""
        return trainable

    # --- state outside the DeepSpeed engine (defaults: none) ------------------------
    def attach_engine(self, engine: Any) -> None:
        """Called once after ``deepspeed.initialize``."""

    def before_forward(self, host_batch: dict[str, torch.Tensor]) -> None:
        """Called before each training micro-batch's forward with the batch as it was
        before it went to the device (host tensors)."""

    def before_backward(self) -> None:
        """Called before each micro-batch's ``engine.backward``."""

    def needs_calibration(self) -> bool:
        """Whether :meth:`calibrate` has state to set (the trainer fetches the first step's
        batches for it only then); the same answer on every rank."""
        return False

    def calibrate(self, module: Any, batches: list[dict[str, torch.Tensor]]) -> None:
        """Called once before a new run's first step, on every rank, with this rank's
        micro-batches of that step (host tensors), so state set from data depends on the
        step's global batch only, not on how ranks and accumulation split it."""

    def external_parameters(self) -> int:
        """Trainable parameters held outside the engine (the sparse adapter's CPU rows)."""
        return 0

    def external_grad_sq_norm(self) -> float:
        """Squared L2 norm of gradients held outside the engine (for global clipping)."""
        return 0.0

    def after_engine_step(self, lr: float, clip_coef: float) -> None:
        """Called after ``engine.step()`` at a gradient-accumulation boundary."""

    def step_metrics(self) -> dict[str, float]:
        """Per-step figures to log (rows moved, bytes, waits ...)."""
        return {}

    def save_state(self, directory: Path) -> None:
        """Write external training state (weights + optimizer) into ``directory``."""

    def load_state(self, directory: Path) -> None:
        """Restore what :meth:`save_state` wrote."""

    def external_state(self, optimizer: bool = False) -> dict[str, torch.Tensor]:
        """Trained tensors held outside the module (live, not copies), by state-dict key;
        ``optimizer``: their optimizer state too (default: none)."""
        return {}

    def load_external_state(self, state: dict[str, torch.Tensor]) -> None:
        """Copy tensors named as by :meth:`external_state` into place."""
        if state:
            raise UserError(f"method {self.name} holds no tensors outside the model, got "
                            f"{sorted(state)[:3]}")

    # --- trained weights for inference --------------------------------------------
    def trainable_state(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """Tensors that make up the trained adapter (default: all trainable params)."""
        return {n: p.detach().cpu() for n, p in module.named_parameters() if p.requires_grad}

    def load_trainable_state(self, module: nn.Module, state: dict[str, torch.Tensor]) -> None:
        """Inverse of :meth:`trainable_state`."""
        params = dict(module.named_parameters())
        check_state(state, {n: p.shape for n, p in params.items()},
                    [n for n, p in params.items() if p.requires_grad])
        with torch.no_grad():
            for key, value in state.items():
                params[key].copy_(value.to(params[key].dtype))

    def save_export(self, module: nn.Module, state: dict[str, torch.Tensor], directory: Path,
                    tokenizer: Any) -> None:
        """Write the trained weights (``state``: :meth:`trainable_state`) into ``directory``
        (rank 0, ZeRO-3 parameters gathered): ``adapter.safetensors``, meft_ds's own
        layout (:mod:`meft_ds.export`)."""
        from safetensors.torch import save_file

        from meft_ds.export import WEIGHTS

        tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
        save_file(tensors, str(directory / WEIGHTS))


def check_state(state: dict[str, torch.Tensor], shapes: dict[str, Any],
                wanted: list[str]) -> None:
    """Refuse an adapter file whose tensors are not the model's (``shapes``: name ->
    shape of what it may hold; ``wanted``: the names it must hold)."""
    from meft_ds.errors import UserError

    extra = [k for k in state if k not in shapes]
    if extra:
        raise UserError(f"adapter file has tensors the model lacks: {extra[:3]}")
    lacking = [n for n in wanted if n not in state]
    if lacking:
        raise UserError(f"adapter file lacks {len(lacking)} of the adapter's {len(wanted)} "
                        f"tensors, e.g. {lacking[:3]}")
    for key, value in state.items():
        if tuple(value.shape) != tuple(shapes[key]):
            raise UserError(f"adapter file: {key} has shape {tuple(value.shape)}, the model "
                            f"built from its config needs {tuple(shapes[key])}")
