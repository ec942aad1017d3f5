"""Row-sparse AdamW over a CPU row store.

Each row (one key and one value of the adapter) is its own little AdamW problem:

- **Lazy rows.** A row not selected in a step is not touched: its weights, both moments
  and its step count stay as they are (no weight decay either). A row's step count
  counts only the steps that updated it, so its bias correction is that of a fresh
  AdamW started when the row was first used. This is exactly ``torch.optim.AdamW`` run
  on each row separately and stepped only when the row has a gradient.
- **Contiguous buffers.** The selected rows' weights, gradients and moments are gathered
  into contiguous buffers, sorted by step count, updated there and scattered back.
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
        order = torch.argsort(row_steps, stable=True)
        rows = rows[order]
        row_steps = row_steps[order]
        g = grad.index_select(0, order) if grad.dtype == torch.float32 else grad.float()[order]
        p = weight.index_select(0, rows)
        m = exp_avg.index_select(0, rows)
        v = exp_avg_sq.index_select(0, rows)
        if self._op is not None:
            self._step_cpu_adam(p, g, m, v, row_steps, lr)
        else:
            self._step_torch(p, g, m, v, row_steps, lr)
        weight.index_copy_(0, rows, p)
        exp_avg.index_copy_(0, rows, m)
        exp_avg_sq.index_copy_(0, rows, v)

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
        b1, b2 = self.betas
        t = row_steps.to(torch.float64).unsqueeze(1)
        bc1 = (1.0 - torch.pow(b1, t)).to(torch.float32)
        bc2_sqrt = torch.sqrt(1.0 - torch.pow(b2, t)).to(torch.float32)
        if self.weight_decay:
            p.mul_(1.0 - lr * self.weight_decay)
        m.mul_(b1).add_(g, alpha=1.0 - b1)
        v.mul_(b2).addcmul_(g, g, value=1.0 - b2)
        denom = (v.sqrt() / bc2_sqrt).add_(self.eps)
        p.addcdiv_(m, denom * (bc1 / lr), value=-1.0)
