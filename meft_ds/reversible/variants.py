"""MEFT1/2/3: which blocks are F and G, default λ/β, stream swap, which stream is output.

With zero-initialised adapters:

- MEFT1: F = the pre-trained layer with an FFN adapter, G = an adapter; λ=0.1, β=1;
  streams swapped. ``y1`` carries the pre-trained hidden state (plus λ·x1).
- MEFT2: the mirror: F = an adapter, G = the layer with an FFN adapter; λ=1, β=0.1;
  swapped; ``y2`` carries the hidden state (plus β·x2).
- MEFT3: F = attention block with an adapter beside it, G = FFN block with an adapter
  beside it; λ=β=0.1; not swapped; ``y2`` carries the hidden state.

The output is ``main + γ·other`` with a learnable scalar γ. Initialising γ to minus the
main stream's own scale (−λ for MEFT1, −β otherwise) cancels most of the extra
``λ·x1``/``β·x2`` term at step 0, since the other stream holds a neighbouring hidden
state (measured in ``bench/rev_step0.py`` and the tests).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Variant:
    """Structure and defaults of one MEFT variant."""

    name: str
    lam: float
    beta: float
    swap: bool
    f_kind: str  # "layer", "adapter" or "attention"
    g_kind: str  # "adapter", "layer" or "ffn"
    main_is_y1: bool

    def main_index(self) -> int:
        """Index (0/1) of the output stream among the stack's final pair."""
        # Final pair is (y2, y1) when swapped, else (y1, y2).
        if self.main_is_y1:
            return 1 if self.swap else 0
        return 0 if self.swap else 1

    @property
    def center(self) -> tuple[bool, bool]:
        """Which of F, G to centre: those that are pre-trained blocks, not adapters."""
        return (self.f_kind != "adapter", self.g_kind != "adapter")

    def mix_init(self, lam: float, beta: float) -> float:
        """Initial γ of ``main + γ·other``."""
        return -(lam if self.main_is_y1 else beta)


VARIANTS: dict[str, Variant] = {
    "meft1": Variant("meft1", 0.1, 1.0, True, "layer", "adapter", True),
    "meft2": Variant("meft2", 1.0, 0.1, True, "adapter", "layer", False),
    "meft3": Variant("meft3", 0.1, 0.1, False, "attention", "ffn", False),
}
