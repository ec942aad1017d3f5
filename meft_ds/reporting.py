"""``--report_to``: each logged metrics record to TensorBoard or Weights & Biases (rank 0).

The records are ``metrics.jsonl``'s: a step's loss, lr, grad norm, tokens/s, memory
figures and the method's own figures, and the periodic evaluation's score. Only numbers
are logged (non-scalar values are skipped).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

from meft_ds.errors import UserError

CHOICES = ("none", "tensorboard", "wandb")
TENSORBOARD_DIR = "tensorboard"
_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


def check_available(kind: str) -> None:
    """Refuse a backend whose package is not installed, in one line (before any loading)."""
    package = _PACKAGES.get(kind)
    if package and importlib.util.find_spec(package) is None:
        raise UserError(f"`report_to` {kind} needs the {package} package: pip install {package}")


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The record's numbers (``step`` and non-scalar values left out)."""
    return {k: float(v) for k, v in record.items()
            if k != "step" and isinstance(v, int | float) and not isinstance(v, bool)}


class Reporter:
    """Sends metric records to one backend."""

    def log(self, record: dict[str, Any]) -> None:
        """Log ``record``'s numbers at its ``step``."""

    def close(self) -> None:
        """Flush and close."""


class TensorBoard(Reporter):
    """Scalars under ``<output_dir>/tensorboard`` (``train/<name>``)."""

    def __init__(self, out: Path, first_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # a resumed (or restarted) run hides what an earlier one logged from here on
        self.writer = SummaryWriter(log_dir=str(out / TENSORBOARD_DIR),
                                    purge_step=first_step + 1)

    def log(self, record: dict[str, Any]) -> None:
        for name, value in scalars(record).items():
            self.writer.add_scalar(f"train/{name}", value, record["step"])
        self.writer.flush()  # a crashed run keeps what it logged

    def close(self) -> None:
        self.writer.close()


class Wandb(Reporter):
    """One wandb run (``WANDB_PROJECT``, default ``meft_ds``; ``WANDB_MODE=offline`` is
    wandb's own setting), files under ``<output_dir>``."""

    def __init__(self, out: Path, config: dict[str, Any]) -> None:
        import wandb

        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "meft_ds"),
                              dir=str(out), config=config)

    def log(self, record: dict[str, Any]) -> None:
        self.run.log({f"train/{k}": v for k, v in scalars(record).items()},
                     step=record["step"])

    def close(self) -> None:
        self.run.finish()


def start(kind: str, out: Path, first_step: int, config: dict[str, Any]) -> Reporter:
    """The reporter for ``--report_to kind`` (``none``: one that does nothing)."""
    check_available(kind)
    out.mkdir(parents=True, exist_ok=True)
    if kind == "tensorboard":
        return TensorBoard(out, first_step)
    if kind == "wandb":
        return Wandb(out, config)
    return Reporter()
