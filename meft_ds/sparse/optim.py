"""Row-sparse AdamW over a CPU row store.

Each row (one key and one value of the adapter) is its own little AdamW problem:

- **Lazy rows.** A row not selected in a step is not touched: its weights, both moments
  and its step count stay as they are (no weight decay either). A row's step count
  counts only the steps that updated it, so its bias correction is that of a fresh
  AdamW started when the row was first used. This is exactly ``torch.optim.AdamW`` run
  on each row separately and stepped only when the row has a gradient.
- **Bias correction by the step** (``bias_step``, ``--sparse_bias_correction step``):
  the moments move as above, but a row's bias correction uses the store's step number,
  as ``torch.optim.SparseAdam`` does: a row updated in few of the steps has small moments
  corrected by a large step count, so it takes larger steps than a fresh AdamW would.
- **In place, in one call (``cpu_adam``).** The op of :mod:`meft_ds.sparse.row_op`
  runs DeepSpeed's CPU Adam kernel on each selected row's own memory in the store (a row
  of a row-major ``[r, width]`` store is contiguous), rows split over up to torch's
  thread count, each row at its own step count: no gather, no scatter, one Python call
  per step.
  (DeepSpeed's Python entry point updates ``param.contiguous()``, so it cannot take
  scattered rows: a fancy-indexed copy would be updated and the update lost, and one
  call per row costs ~8 us of overhead, measured 1.9x the kernel's own time at 7B
  shape.) Measured in ``bench/sparse_adam.py``.

Backends: ``cpu_adam`` (DeepSpeed's vectorised CPU AdamW kernel, built by ``make setup``
or else on first use) and ``torch`` (the same arithmetic in plain torch on gathered rows,
per-row bias correction as a broadcast).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from meft_ds.errors import UserError

# Each thread takes rows of at least this many elements (rows x width) in all; smaller
# steps run on the calling thread (starting a thread costs tens of microseconds on busy
# cores; one 8192-wide row ~3 us on one core).
PARALLEL_MIN_ELEMENTS = 1 << 17


class RowAdamW:
    """AdamW over selected rows of 2-D fp32 CPU tensors (see the module docstring)."""

    def __init__(
        self,
        backend: str = "cpu_adam",
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        key_lr_ratio: float = 1.0,
        key_width: int = 0,
        bias_step: Callable[[], int] | None = None,
    ) -> None:
        self.backend = backend
        self.betas = betas
        self.eps = eps
        self.weight_decay = weight_decay
        # the first ``key_width`` columns of a row (its key) move by ``key_lr_ratio`` times
        # the AdamW step (0: frozen keys); the moments are those of the plain step
        self.key_lr_ratio = key_lr_ratio
        self.key_width = key_width
        # None: each row's own update count; else the number of the step being taken
        self.bias_step = bias_step
        self._op = None
        if backend == "cpu_adam":
            self._op = _load_op()
        elif backend != "torch":
            raise UserError(f"unknown row optimizer backend {backend!r}")

    def step(
        self,
        weight: torch.Tensor,
        exp_avg: torch.Tensor,
        exp_avg_sq: torch.Tensor,
        steps: torch.Tensor,
        rows: torch.Tensor,
        grad: torch.Tensor,
        lr: float,
    ) -> None:
        """Update ``weight[rows]`` with ``grad`` (``[len(rows), width]``), in place.

        ``rows`` must be unique, in any order. ``steps`` (int64, one per row of ``weight``)
        counts the updates each row has had; the selected rows' counts are incremented.
        ``cpu_adam``: DeepSpeed's kernel on the store's own rows, one call that also counts
        the steps (no torch op at all when the inputs are already fp32/int64 and
        contiguous: at 1% of a 7B layer's rows each small op costs a few percent of the
        update); ``torch``: the same arithmetic on gathered rows, scattered back.
        """
        if rows.numel() == 0:
            return
        g = _as(grad, torch.float32)
        expected = (rows.numel(), weight.shape[1])
        if g.shape != expected:
            raise ValueError(f"grad is {tuple(g.shape)}, expected {expected}")
        rows = _as(rows, torch.int64)
        if self.bias_step is not None:  # both backends count the update on top of this
            steps.index_fill_(0, rows, self.bias_step() - 1)
        old_keys = self._keys_before(weight, rows)
        if self._op is None:
            self._torch_step(weight, exp_avg, exp_avg_sq, steps, rows, g, lr)
        else:
            _check_in_place(weight=weight, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq)
            b1, b2 = self.betas
            self._op.row_adam_step(weight, exp_avg, exp_avg_sq, g, rows, steps, lr, b1, b2,
                                   self.eps, self.weight_decay, PARALLEL_MIN_ELEMENTS)
        self._scale_key_steps(weight, rows, old_keys)

    def _keys_before(self, weight: torch.Tensor, rows: torch.Tensor) -> torch.Tensor | None:
        """The selected rows' keys before the step, when keys take a scaled step."""
        if self.key_lr_ratio == 1.0 or not self.key_width:
            return None
        return weight[:, : self.key_width].index_select(0, rows)

    def _scaled_keys(self, old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        """``k_old + ratio * (k_adamw - k_old)`` (into ``old``): AdamW's step (decay
        included) is linear in the learning rate, so this is the step at ``ratio * lr``."""
        return old.lerp_(new, self.key_lr_ratio)

    @torch.no_grad()
    def _scale_key_steps(self, weight: torch.Tensor, rows: torch.Tensor,
                         old: torch.Tensor | None) -> None:
        """Put the selected rows' keys back at their scaled step (see :meth:`_scaled_keys`)."""
        if old is None:
            return
        keys = weight[:, : self.key_width]
        keys.index_copy_(0, rows, self._scaled_keys(old, keys.index_select(0, rows)))

    @torch.no_grad()
    def _torch_step(self, weight: torch.Tensor, exp_avg: torch.Tensor,
                    exp_avg_sq: torch.Tensor, steps: torch.Tensor, rows: torch.Tensor,
                    g: torch.Tensor, lr: float) -> None:
        """The ``torch`` backend of :meth:`step`."""
        steps[rows] += 1
        row_steps = steps[rows]
        p, m, v = (t.index_select(0, rows) for t in (weight, exp_avg, exp_avg_sq))
        torch_adamw_(p, g, m, v, row_steps, lr, self.betas, self.eps, self.weight_decay)
        weight.index_copy_(0, rows, p)
        exp_avg.index_copy_(0, rows, m)
        exp_avg_sq.index_copy_(0, rows, v)

    @torch.no_grad()
    def step_resident(
        self,
        weight: torch.Tensor,
        exp_avg: torch.Tensor,
        exp_avg_sq: torch.Tensor,
        steps: torch.Tensor,
        slots: torch.Tensor,
        grad: torch.Tensor,
        lr: float,
    ) -> None:
        """Update ``weight[slots]`` of device-resident rows (the hot-row cache) in place.

        Always the ``torch`` arithmetic (on whatever device ``weight`` is), so a row gets
        the same update whether it is cached or not when the store's backend is ``torch``
        (and within fp32 rounding of DeepSpeedCPUAdam's otherwise). ``steps`` and ``slots``
        are host tensors; ``grad`` is ``[len(slots), width]`` on ``weight``'s device.
        """
        if slots.numel() == 0:
            return
        if self.bias_step is not None:
            steps[slots] = self.bias_step() - 1
        steps[slots] += 1
        index = slots.to(weight.device, non_blocking=True)
        p = weight.index_select(0, index)
        scale_keys = self.key_lr_ratio != 1.0 and self.key_width
        old_keys = p[:, : self.key_width].clone() if scale_keys else None
        m = exp_avg.index_select(0, index)
        v = exp_avg_sq.index_select(0, index)
        row_steps = steps[slots].to(weight.device, non_blocking=True)
        torch_adamw_(p, grad, m, v, row_steps, lr, self.betas, self.eps, self.weight_decay)
        if old_keys is not None:
            p[:, : self.key_width] = self._scaled_keys(old_keys, p[:, : self.key_width])
        weight.index_copy_(0, index, p)
        exp_avg.index_copy_(0, index, m)
        exp_avg_sq.index_copy_(0, index, v)


def torch_adamw_(p, g, m, v, row_steps, lr, betas, eps, weight_decay) -> None:
    """AdamW on gathered rows ``p, m, v`` (``[n, w]``) in place; row ``i`` is at step
    ``row_steps[i]`` (already counting this update)."""
    b1, b2 = betas
    t = row_steps.to(torch.float64).unsqueeze(1)
    bc1 = (1.0 - torch.pow(b1, t)).to(torch.float32)
    bc2_sqrt = torch.sqrt(1.0 - torch.pow(b2, t)).to(torch.float32)
    if weight_decay:
        p.mul_(1.0 - lr * weight_decay)
    m.mul_(b1).add_(g, alpha=1.0 - b1)
    v.mul_(b2).addcmul_(g, g, value=1.0 - b2)
    denom = (v.sqrt() / bc2_sqrt).add_(eps)
    p.addcdiv_(m, denom * (bc1 / lr), value=-1.0)


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` as a contiguous ``dtype`` tensor, without a torch call when it already is."""
    if t.dtype == dtype and t.is_contiguous():
        return t
    return t.to(dtype).contiguous()


def _check_in_place(**tensors: torch.Tensor) -> None:
    """The op writes into the store's memory: it must be a contiguous fp32 CPU tensor
    (refused here with a clear error, before any step count moves)."""
    for name, t in tensors.items():
        if t.device.type != "cpu" or t.dtype != torch.float32 or not t.is_contiguous():
            raise ValueError(f"cpu_adam rows: {name} must be a contiguous fp32 CPU tensor")


def _load_op():
    """The row op (JIT-built once)."""
    try:
        from meft_ds.sparse.row_op import load_row_adam

        return load_row_adam()
    except Exception as exc:  # a JIT build failed or DeepSpeed is missing
        raise UserError(
            f"sparse: the row-sparse cpu_adam op is unavailable ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); use `sparse_optimizer` torch"
        ) from None
