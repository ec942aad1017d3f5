"""Install a READ network into a Hugging Face decoder with module hooks.

The model stays a normal ``*ForCausalLM``: ``forward``, ``generate`` and KV-cached decoding
all include the correction (READ works on each position independently, so cached decoding
of one new token at a time is exact). Per decoder call:

- every decoder layer runs under ``torch.no_grad()`` (a pre-hook turns gradients off, a
  post-hook that also runs on errors restores the caller's mode), so no graph and no
  saved activation exists inside the backbone;
- after each read layer, in the caller's grad mode, the network takes one recurrent step
  on that layer's output (a tensor without history);
- a pre-hook on the final norm adds the correction to the final hidden state, so the
  frozen norm and LM head run with gradients enabled and carry them to the network.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from meft_ds.models import arch
from meft_ds.read.network import ReadNetwork


def read_layer_ids(num_layers: int, stride: int) -> list[int]:
    """Layers READ reads: every ``stride``-th counted back from the last one, ascending."""
    if not 1 <= stride <= num_layers:
        raise ValueError(f"stride {stride} outside 1..{num_layers}")
    return sorted(range(num_layers - 1, -1, -stride))


class ReadAdapter(nn.Module):
    """Owns the READ network and the hooks that run it inside a decoder."""

    def __init__(self, network: ReadNetwork, layer_ids: list[int]) -> None:
        super().__init__()
        if not layer_ids:
            raise ValueError("READ needs at least one layer to read")
        self.network = network
        self.layer_ids = tuple(layer_ids)
        self._state: torch.Tensor | None = None
        self._grad_modes: list[bool] = []
        self._handles: list[RemovableHandle] = []

    def install(self, model: nn.Module) -> None:
        """Register the hooks on ``model``'s decoder (a causal LM or a wrapper of one)."""
        if self._handles:
            raise RuntimeError("READ hooks are already installed")
        stack = arch.decoder(model)
        blocks = arch.layers(model)
        if max(self.layer_ids) >= len(blocks):
            raise ValueError(f"layer {max(self.layer_ids)} outside the model's {len(blocks)}")
        self._handles.append(stack.register_forward_pre_hook(self._begin))
        for index, block in enumerate(blocks):
            self._handles.append(block.register_forward_pre_hook(self._enter_layer))
            leave = functools.partial(self._leave_layer, index)
            self._handles.append(block.register_forward_hook(leave, always_call=True))
        norm = arch.final_norm(model)
        self._handles.append(norm.register_forward_pre_hook(self._add_correction))

    def remove(self) -> None:
        """Take the hooks out again (the model is then the plain backbone)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._state = None

    # --- hooks --------------------------------------------------------------------
    def _begin(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        self._state = None

    def _enter_layer(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        self._grad_modes.append(torch.is_grad_enabled())
        torch.set_grad_enabled(False)

    def _leave_layer(
        self, index: int, module: nn.Module, args: tuple[Any, ...], output: Any
    ) -> None:
        torch.set_grad_enabled(self._grad_modes.pop())
        if output is None or index not in self.layer_ids:
            return
        hidden = output[0] if isinstance(output, tuple) else output
        self._state = self.network.step(hidden, self._state)

    def _add_correction(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        if self._state is None:
            return None
        hidden = args[0]
        delta = self.network.correction(self._state)
        self._state = None
        return (hidden + delta.to(hidden.dtype), *args[1:])
