"""``transformers.Trainer`` with a :class:`~meft_ds.api.MeftModel`: :class:`MeftCallback`.

::

    model = meft_ds.get_sparse_model(AutoModelForCausalLM.from_pretrained(name))
    trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=collate,
                      callbacks=[MeftCallback()])
    trainer.train()                                   # or resume_from_checkpoint=True
    model.save_pretrained("adapter")

The Trainer steps the routers (``model.parameters()``); the callback steps the sparse
row store after each optimizer step at the rate that step applied, clips routers and rows
together by ``args.max_grad_norm`` (it turns the Trainer's own clipping, which sees only
the routers, off while training), divides a ``GradScaler``'s scale out of the rows'
gradients, and writes the store (rows, Adam moments, counts) into each checkpoint
directory, from where it restores it on ``resume_from_checkpoint``. The Trainer's own
DeepSpeed / FSDP integrations are not supported (use the launcher for DeepSpeed).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from meft_ds.api import MeftModel


class MeftCallback(TrainerCallback):
    """Row-store step, global clipping and checkpoints of a :class:`MeftModel` in a Trainer.

    ``resume_from``: the checkpoint a resumed run starts from, when it is not
    ``<output_dir>/checkpoint-<step>`` (the Trainer does not tell its callbacks).
    After each step, ``grad_norm`` is the global norm before clipping (routers and rows;
    the Trainer logs the routers' alone) and ``clip_coef`` the factor applied.
    """

    def __init__(self, resume_from: str | Path | None = None) -> None:
        self.resume_from = resume_from
        self.max_grad_norm = 0.0
        self.grad_norm: float | None = None
        self.clip_coef = 1.0
        self._loss_scale = 1.0

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None,
                       **kwargs: Any) -> None:
        meft = _meft(model)
        if kwargs.get("optimizer") is not None:
            meft.check_optimizer(kwargs["optimizer"])
        self.max_grad_norm = float(args.max_grad_norm or 0.0)
        args.max_grad_norm = 0.0  # clipped in on_pre_optimizer_step, rows included
        if state.global_step > 0:  # resume_from_checkpoint: the Trainer restored the rest
            meft.method.load_state(Path(self.resume_from or _checkpoint(args, state)))

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        args.max_grad_norm = self.max_grad_norm

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None,
                              optimizer: Any = None, **kwargs: Any) -> None:
        self._loss_scale = _unscaled(optimizer)
        self.grad_norm, self.clip_coef = _meft(model).clip_grad_norm_(
            self.max_grad_norm, self._loss_scale)

    def on_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None,
                          optimizer: Any = None, **kwargs: Any) -> None:
        meft = _meft(model)
        if meft.has_row_store:
            meft.row_optimizer().step(
                optimizer.param_groups[0]["lr"], self._loss_scale, self.clip_coef,
                skip=bool(getattr(optimizer, "step_was_skipped", False)))

    def on_save(self, args: Any, state: Any, control: Any, model: Any = None,
                **kwargs: Any) -> None:
        _meft(model).method.save_state(_checkpoint(args, state))


def _meft(model: Any) -> MeftModel:
    if not isinstance(model, MeftModel):
        raise TypeError("MeftCallback trains a MeftModel (meft_ds.get_sparse_model, ...), got "
                        f"{type(model).__name__}")
    return model


def _checkpoint(args: Any, state: Any) -> Path:
    """The checkpoint directory the Trainer writes at this step."""
    return Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"


def _unscaled(optimizer: Any) -> float:
    """Unscale the parameters' gradients of an fp16 run (accelerate's ``GradScaler``), if
    the Trainer has not yet; returns the scale left on the rows' gradients (1 without)."""
    scaler = getattr(optimizer, "scaler", None)
    if scaler is None or not scaler.is_enabled():
        return 1.0
    inner = optimizer
    while hasattr(inner, "scaler") and hasattr(inner, "optimizer"):  # AcceleratedOptimizer
        inner = inner.optimizer
    try:
        scaler.unscale_(inner)
    except RuntimeError:  # "unscale_() has already been called" (the Trainer's grad norm)
        pass
    return float(scaler.get_scale())
