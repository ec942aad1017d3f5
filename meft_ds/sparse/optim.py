"""Row-sparse AdamW over a CPU row store.

Each row (one key and one value of the adapter) is its own little AdamW problem:

- **Lazy rows.** A row not selected in a step is not touched: its weights, both moments
  and its step count stay as they are (no weight decay either). A row's step count
  counts only the steps that updated it, so its bias correction is that of a fresh
  AdamW started when the row was first used. This is exactly ``torch.optim.AdamW`` run
  on each row separately and stepped only when the row has a gradient.
- **Contiguous buffers.** The selected rows' weights, gradients and moments are gathered
  into contiguous buffers (allocated once and reused), sorted by step count (skipped
  when all rows share one), updated there and scattered back.
  DeepSpeedCPUAdam updates ``param.contiguous()``: a fancy-indexed copy or a strided view
  would be updated in a temporary and the update silently lost. Rows of equal step count
  are contiguous slices of the sorted buffers, one kernel call each.

Backends: ``cpu_adam`` (DeepSpeed's vectorised CPU AdamW kernel, built on first use) and
``torch`` (the same arithmetic in plain torch, per-row bias correction as a broadcast).
"""

from __future__ import annotations

import torch

from meft_ds.errors import UserError


class RowAdamW:
    """AdamW over selected rows of 2-D fp32 CPU tensors (see the module docstring)."""

    def __init__(
        self,
        backend: str = "cpu_adam",
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        self.backend = backend
        self.betas = betas
        self.eps = eps
        self.weight_decay = weight_decay
        self._op = None
        self._opt_id: int | None = None
        self._buffers: dict[str, torch.Tensor] = {}
        if backend == "cpu_adam":
            self._load_cpu_adam()
        elif backend != "torch":
            raise UserError(f"unknown row optimizer backend {backend!r}")

    def _load_cpu_adam(self) -> None:
        try:
            from deepspeed.ops.adam import DeepSpeedCPUAdam
            from deepspeed.ops.op_builder import CPUAdamBuilder

            op = CPUAdamBuilder().load(verbose=False)
        except Exception as exc:  # the op's JIT build failed or DeepSpeed is missing
            raise UserError(
                f"sparse: DeepSpeed's cpu_adam op is unavailable ({type(exc).__name__}: {exc}); "
                "use --sparse_optimizer torch"
            ) from None
        # Share DeepSpeedCPUAdam's id counter so our kernel state never collides with an
        # engine optimizer's.
        self._opt_id = DeepSpeedCPUAdam.optimizer_id
        DeepSpeedCPUAdam.optimizer_id += 1
        b1, b2 = self.betas
        op.create_adam(self._opt_id, 1e-3, b1, b2, self.eps, self.weight_decay, True, False)
        self._op = op

    def __del__(self) -> None:
        if self._op is not None and self._opt_id is not None:
            try:
                self._op.destroy_adam(self._opt_id)
            except Exception:  # interpreter shutdown
                pass

    @torch.no_grad()
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

        ``rows`` must be unique. ``steps`` (int64, one per row of ``weight``) counts the
        updates each row has had; the selected rows' counts are incremented.
        """
        if rows.numel() == 0:
            return
        steps[rows] += 1
        row_steps = steps[rows]
        g = grad if grad.dtype == torch.float32 else grad.float()
        if bool((row_steps == row_steps[0]).all()):
            g = g.contiguous()  # one step count: no reordering
        else:
            order = torch.argsort(row_steps, stable=True)
            rows = rows[order]
            row_steps = row_steps[order]
            g = torch.index_select(g, 0, order, out=self._buffer("g", g))
        p = torch.index_select(weight, 0, rows, out=self._buffer("p", weight, rows.numel()))
        m = torch.index_select(exp_avg, 0, rows, out=self._buffer("m", weight, rows.numel()))
        v = torch.index_select(exp_avg_sq, 0, rows, out=self._buffer("v", weight, rows.numel()))
        if self._op is not None:
            self._step_cpu_adam(p, g, m, v, row_steps, lr)
        else:
            self._step_torch(p, g, m, v, row_steps, lr)
        weight.index_copy_(0, rows, p)
        exp_avg.index_copy_(0, rows, m)
        exp_avg_sq.index_copy_(0, rows, v)

    def _buffer(self, name: str, like: torch.Tensor, rows: int | None = None) -> torch.Tensor:
        """A reused contiguous ``[rows, width]`` fp32 buffer (no fresh allocation, and
        no page faults, on every step)."""
        rows = like.shape[0] if rows is None else rows
        width = like.shape[1]
        buf = self._buffers.get(name)
        if buf is None or buf.shape[1] != width or buf.shape[0] < rows:
            buf = torch.empty(max(rows, 1), width, dtype=torch.float32)
            self._buffers[name] = buf
        return buf[:rows]

    def _step_cpu_adam(self, p, g, m, v, row_steps, lr) -> None:
        b1, b2 = self.betas
        values, counts = torch.unique_consecutive(row_steps, return_counts=True)
        start = 0
        for step, count in zip(values.tolist(), counts.tolist()):
            end = start + count
            # Slices along dim 0 of contiguous buffers are contiguous: updated in place.
            self._op.adam_update(
                self._opt_id, int(step), float(lr), b1, b2, self.eps, self.weight_decay, True,
                p[start:end], g[start:end], m[start:end], v[start:end],
            )
            start = end

    def _step_torch(self, p, g, m, v, row_steps, lr) -> None:
        torch_adamw_(p, g, m, v, row_steps, lr, self.betas, self.eps, self.weight_decay)

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
        steps[slots] += 1
        index = slots.to(weight.device, non_blocking=True)
        p = weight.index_select(0, index)
        m = exp_avg.index_select(0, index)
        v = exp_avg_sq.index_select(0, index)
        row_steps = steps[slots].to(weight.device, non_blocking=True)
        torch_adamw_(p, grad, m, v, row_steps, lr, self.betas, self.eps, self.weight_decay)
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
