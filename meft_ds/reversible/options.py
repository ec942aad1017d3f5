"""Options of the reversible adapters (``--method reversible``, reusable by other methods)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from meft_ds.baselines.adapters import ACTIVATIONS
from meft_ds.errors import UserError
from meft_ds.options import opt
from meft_ds.reversible.variants import VARIANTS

POSITIONS = ("top", "bottom")
# Options that change how the reversible stack computes or regularises, not what a
# checkpoint holds: a resumed run may change them (Method.resume_free).
RESUME_FREE = frozenset({
    "rev_fused", "rev_backward", "rev_restart_every", "rev_exact", "rev_stream_dtype",
    "rev_compute_dtype", "rev_adapter_dropout", "rev_keep_top",
})
BACKWARDS = ("reversible", "autograd")


@dataclass
class ReversibleOptions:
    """MEFT1/2/3 reversible adapters on a frozen pre-norm decoder."""

    rev_variant: str = opt("meft1", "MEFT variant", choices=sorted(VARIANTS))
    rev_lambda: float | None = opt(None, "scale λ of x1 (unset: the variant's default)")
    rev_beta: float | None = opt(None, "scale β of x2 (unset: the variant's default)")
    rev_adapter_size: int = opt(64, "bottleneck width of each adapter")
    rev_adapter_activation: str = opt("relu", "adapter activation", choices=sorted(ACTIVATIONS))
    rev_adapter_dropout: float = opt(0.0, "dropout inside the adapters")
    rev_layers: int | None = opt(None, "number of reversible (trainable) layers (unset: all)")
    rev_position: str = opt(
        "top", "top: reversible top k layers, no graph below; bottom: reversible bottom k "
        "layers, plain autograd above", choices=POSITIONS,
    )
    rev_stream_dtype: str = opt("fp64", "dtype of the two residual streams",
                                choices=("fp64", "fp32"))
    rev_exact: bool = opt(
        True, "fp64 streams as exact fixed point (remainders of λ, β kept: exact inverse at "
        "any depth); false: plain float arithmetic with restart points",
    )
    rev_fused: bool | None = opt(
        None, "exact streams: run each coupling's lattice arithmetic as one compiled kernel "
        "(torch.compile; bit-identical to the eager ops, which it falls back to with a warning "
        "where it cannot compile); false: eager torch ops (unset: fused on CUDA, where the "
        "eager ops are a dozen kernel launches per coupling; eager on CPU, where fusing "
        "changed the step time by less than the noise and compiling costs 10-20 s per process)",
    )
    rev_compute_dtype: str = opt(
        "auto", "dtype F and G compute in (auto: the weights' dtype; bf16: autocast inside F/G)",
        choices=("auto", "fp32", "bf16"),
    )
    rev_restart_every: int | None = opt(
        None, "save both streams every k layers to bound reconstruction error "
        "(unset: chosen from λ, β and the dtypes; 0: never)",
    )
    rev_backward: str = opt(
        "reversible", "reversible: recompute inputs in backward; autograd: store activations "
        "(reference)", choices=BACKWARDS,
    )
    rev_keep_top: int = opt(
        0, "the top N reversible layers keep their activations and backpropagate with plain "
        "autograd (same gradients): each saves one layer's recompute (~1/depth of the "
        "reversible overhead) for one layer of stored activations",
    )
    rev_center: bool = opt(
        True, "centre the pre-trained blocks: y1 = F(x2) + λ(x1 − x2) (resp. y2 = G(y1) + "
        "β(x2 − y1)) instead of λx1 + F(x2), so step 0 stays close to the base model",
    )
    rev_mix_init: float | None = opt(
        None, "initial γ of output = main + γ·other (unset: 0 if centred, else −λ for MEFT1, −β "
        "otherwise)"
    )

    def validate(self) -> None:
        """Reject values that cannot work (checks needing the model are in the method)."""
        if self.rev_variant not in VARIANTS:
            raise UserError(
                f"reversible: unknown rev_variant {self.rev_variant!r}; "
                f"choose one of {', '.join(sorted(VARIANTS))}"
            )
        for name in ("rev_lambda", "rev_beta"):
            value = getattr(self, name)
            if value is not None and (not math.isfinite(value) or value <= 0):
                raise UserError(f"reversible: {name} must be > 0, got {value}")
        if self.rev_adapter_size < 1:
            raise UserError(
                f"reversible: rev_adapter_size must be >= 1, got {self.rev_adapter_size}"
            )
        if self.rev_adapter_activation not in ACTIVATIONS:
            raise UserError(
                f"reversible: rev_adapter_activation must be one of {sorted(ACTIVATIONS)}"
            )
        if not 0.0 <= self.rev_adapter_dropout < 1.0:
            raise UserError(
                f"reversible: rev_adapter_dropout must be in [0, 1), got {self.rev_adapter_dropout}"
            )
        if self.rev_layers is not None and self.rev_layers < 1:
            raise UserError(f"reversible: rev_layers must be >= 1, got {self.rev_layers}")
        if self.rev_position not in POSITIONS:
            raise UserError(
                f"reversible: rev_position must be top or bottom, got {self.rev_position!r}"
            )
        if self.rev_stream_dtype not in ("fp64", "fp32"):
            raise UserError(
                f"reversible: rev_stream_dtype must be fp64 or fp32, got {self.rev_stream_dtype!r}"
            )
        if self.rev_compute_dtype not in ("auto", "fp32", "bf16"):
            raise UserError(
                f"reversible: rev_compute_dtype must be auto, fp32 or bf16, "
                f"got {self.rev_compute_dtype!r}"
            )
        for name in ("rev_lambda", "rev_beta"):
            value = getattr(self, name)
            if value is not None and not 1 / 255 <= value <= 255:
                raise UserError(f"reversible: {name} must be in [1/255, 255], got {value}")
        if self.rev_restart_every is not None and self.rev_restart_every < 0:
            raise UserError(
                f"reversible: rev_restart_every must be >= 0, got {self.rev_restart_every}"
            )
        if self.rev_keep_top < 0:
            raise UserError(f"reversible: rev_keep_top must be >= 0, got {self.rev_keep_top}")
        if self.rev_backward not in BACKWARDS:
            raise UserError(f"reversible: rev_backward must be one of {', '.join(BACKWARDS)}")
        if self.rev_keep_top and self.rev_backward != "reversible":
            raise UserError("reversible: rev_keep_top applies to rev_backward reversible (with "
                            "autograd every layer keeps its activations already)")

    @property
    def lam(self) -> float:
        """λ in effect."""
        return VARIANTS[self.rev_variant].lam if self.rev_lambda is None else self.rev_lambda

    @property
    def beta(self) -> float:
        """β in effect."""
        return VARIANTS[self.rev_variant].beta if self.rev_beta is None else self.rev_beta


def check_deepspeed(options: ReversibleOptions, ds: dict) -> None:
    """Refuse ZeRO-3 with the reversible backward: ZeRO-3 gathers partitioned weights around
    DeepSpeed's own forward and backward, and the reversible backward recomputes layers
    outside both (the recompute would see empty, released weights)."""
    stage = (ds.get("zero_optimization") or {}).get("stage", 0)
    if options.rev_backward == "reversible" and stage in (3, "3"):
        raise UserError(
            "reversible: ZeRO stage 3 is not supported (the reversible backward recomputes "
            "layers outside DeepSpeed's parameter gathering); use ZeRO stage 0-2, or "
            "`rev_backward` autograd"
        )
