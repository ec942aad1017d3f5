"""The READ side network: a joiner, one recurrent cell shared by all layers, an output map.

Nguyen et al., "READ: Recurrent Adaptation of Large Transformers" (2023). For each
backbone layer ``i`` that READ reads (in order), with ``h_i`` that layer's output and
``s`` the recurrent state (zeros before the first layer):

    x_i = tanh(W_h · rms(h_i) + W_s · s + b)     (joiner)
    s   = cell(x_i, s)                           (GRU or tanh RNN cell, shared weights)

and after the last read layer the correction ``W_o · s`` is added to the backbone's final
hidden state before its final norm. ``W_o`` starts at zero, so the model is unchanged at
step 0. The parameter count depends on the model width and the READ width, not on depth.
The network works on every token position independently (it recurs across layers, not
across time), so it needs no state between forward calls.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

CELLS = ("gru", "rnn")


class Joiner(nn.Module):
    """Combine a layer's hidden state with the recurrent state into the cell's input."""

    def __init__(self, dim: int, width: int) -> None:
        super().__init__()
        self.from_hidden = nn.Linear(dim, width)
        self.from_state = nn.Linear(width, width, bias=False)

    def forward(self, hidden: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        """Cell input ``[..., width]`` from ``hidden [..., dim]`` and ``state [..., width]``."""
        hidden = hidden.to(self.from_hidden.weight.dtype)
        # Scale-free view of the residual stream: its magnitude grows with depth.
        normed = F.rms_norm(hidden, (hidden.shape[-1],), eps=1e-6)
        return torch.tanh(self.from_hidden(normed) + self.from_state(state))


class ReadNetwork(nn.Module):
    """Joiner + recurrent cell across layers + zero-initialised output projection."""

    def __init__(self, dim: int, width: int, cell: str = "gru") -> None:
        super().__init__()
        if cell not in CELLS:
            raise ValueError(f"cell must be one of {CELLS}, got {cell!r}")
        self.dim = dim
        self.width = width
        self.joiner = Joiner(dim, width)
        self.cell: nn.Module = (
            nn.GRUCell(width, width) if cell == "gru" else nn.RNNCell(width, width, "tanh")
        )
        self.out = nn.Linear(width, dim, bias=False)
        nn.init.zeros_(self.out.weight)

    def initial_state(self, hidden: torch.Tensor) -> torch.Tensor:
        """Zero state ``[..., width]`` for hidden states shaped like ``hidden``."""
        dtype = self.out.weight.dtype
        return hidden.new_zeros(*hidden.shape[:-1], self.width, dtype=dtype)

    def step(self, hidden: torch.Tensor, state: torch.Tensor | None) -> torch.Tensor:
        """One recurrent step over a layer's hidden state; returns the new state."""
        if state is None:
            state = self.initial_state(hidden)
        cell_input = self.joiner(hidden, state)
        flat = self.cell(cell_input.reshape(-1, self.width), state.reshape(-1, self.width))
        return flat.view(state.shape)

    def correction(self, state: torch.Tensor) -> torch.Tensor:
        """The term added to the final hidden state, ``[..., dim]``."""
        return self.out(state)

    def forward(self, hiddens: list[torch.Tensor]) -> torch.Tensor:
        """Correction for a list of per-layer hidden states (first layer first)."""
        if not hiddens:
            raise ValueError("READ needs at least one layer's hidden state")
        state = None
        for hidden in hiddens:
            state = self.step(hidden, state)
        return self.correction(state)
