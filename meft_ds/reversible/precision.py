"""Dtypes of a reversible stack: high-precision streams, F and G in the model's dtype.

The two residual streams are kept in ``stream`` dtype (fp64 by default). F and G cast
their input to the dtype of the frozen weights and run their branches there, with
autocast entered *inside* them (so the backward recompute sees exactly the forward's
numerics, whatever autocast state the backward thread has); their residual additions
happen back in the stream dtype.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch

from meft_ds import precision
from meft_ds.errors import UserError

DTYPES = {"fp64": torch.float64, **precision.DTYPES}  # the streams may be fp64


@dataclass(frozen=True)
class Precision:
    """Stream dtype, weight dtype and the autocast dtype (None: no autocast)."""

    stream: torch.dtype
    weights: torch.dtype
    autocast: torch.dtype | None
    device_type: str

    def compute(self) -> AbstractContextManager:
        """Autocast context for F/G branches (explicitly off when no autocast is wanted)."""
        if self.autocast is None:
            return torch.autocast(self.device_type, enabled=False)
        return torch.autocast(self.device_type, dtype=self.autocast, enabled=True)

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype the branch matmuls run in."""
        return self.autocast or self.weights


def resolve(stream: str, compute: str, weights: torch.dtype, device: torch.device) -> Precision:
    """Precision for weights of dtype ``weights`` on ``device`` (``compute`` may be 'auto')."""
    if stream not in ("fp64", "fp32"):
        raise UserError(f"reversible: rev_stream_dtype must be fp64 or fp32, got {stream!r}")
    if compute == "auto":
        return Precision(DTYPES[stream], weights, None, device.type)
    if compute not in DTYPES or compute == "fp64":
        raise UserError(
            f"reversible: rev_compute_dtype must be auto, fp32 or bf16, got {compute!r}"
        )
    wanted = DTYPES[compute]
    if wanted == weights:
        return Precision(DTYPES[stream], weights, None, device.type)
    if torch.finfo(wanted).bits > torch.finfo(weights).bits:
        raise UserError(
            f"reversible: rev_compute_dtype {compute} needs weights of at least that precision "
            f"(the model is {weights})"
        )
    return Precision(DTYPES[stream], weights, wanted, device.type)
