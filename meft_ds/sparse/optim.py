"""Row-sparse AdamW over a CPU row store.

Each row (one key and one value of the adapter) is its own little AdamW problem:

- **Lazy rows.** A row not selected in a step is not touched: its weights, both moments
  and its step count stay as they are (no weight decay either). A row's step count
  counts only the steps that updated it, so its bias correction is that of a fresh
  AdamW started when the row was first used. This is exactly ``torch.optim.AdamW`` run
  on each row separately and stepped only when the row has a gradient.
- **In place, no copies (``cpu_adam``).** DeepSpeedCPUAdam's kernel updates
  ``param.contiguous()``: a fancy-indexed copy or a strided view would be updated in a
  temporary and the update silently lost. A row of a row-major ``[r, width]`` store is
  contiguous, and so is a slice ``store[a:b]`` of consecutive rows, so the kernel is
  called directly on the store's own slices (checked: the store must be contiguous): one
  call per *run* (:func:`row_runs`: rows consecutive both in ``rows`` and in the store, at
  one step count; their gradient rows are a contiguous slice of the gradient too).
  Each call costs ~5-10 us of view making and call overhead, so this path is taken when
  the calls average ``IN_PLACE_MIN_ELEMENTS`` or more (wide rows, e.g. 8192 at 7B
  shape); narrower rows (SmolLM2: 1152) are gathered into contiguous buffers sorted by
  step count, updated with one call per step count and scattered back, which moves six
  extra copies of the rows. Measured on one 7B-shape layer (``bench/sparse_adam.py``,
  one thread): in place 1.4-2.6x the kernel on already contiguous rows, gathered 4.2-5x.
  Calls below ``PARALLEL_MIN_ELEMENTS`` run on one OpenMP thread (set for the calling
  thread only): a parallel region per small call costs more than it saves, and far more
  on a shared, oversubscribed CPU.

Backends: ``cpu_adam`` (DeepSpeed's vectorised CPU AdamW kernel, built on first use) and
``torch`` (the same arithmetic in plain torch on gathered rows, per-row bias correction
as a broadcast).
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from meft_ds.errors import UserError

# Kernel calls on fewer elements than this run on one thread (a parallel region costs tens
# of microseconds when the cores are busy; an 8192-element row update ~15 us on one core).
PARALLEL_MIN_ELEMENTS = 1 << 20
# In place when the kernel calls average at least this many elements: each call costs ~5-10
# us of view making and call overhead, a gathered row ~6 copies of itself (measured on two
# cores: both paths cost the same near 2048 elements per row).
IN_PLACE_MIN_ELEMENTS = 2048


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
        self._omp: tuple[Callable[[], int], Callable[[int], None]] | None = None
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
        self._omp = _omp_controls(op.__file__)

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

        ``rows`` must be unique, in any order. ``steps`` (int64, one per row of ``weight``)
        counts the updates each row has had; the selected rows' counts are incremented.
        ``cpu_adam``: the kernel on the store's own row slices, one call per run of rows
        (:func:`row_runs`), when a call averages at least ``IN_PLACE_MIN_ELEMENTS``;
        otherwise on gathered rows sorted by step count (one call per step count).
        ``torch``: on gathered rows. Gathered rows are scattered back.
        """
        if rows.numel() == 0:
            return
        g = grad.to(torch.float32).contiguous()
        expected = (rows.numel(), weight.shape[1])
        if g.shape != expected:
            raise ValueError(f"grad is {tuple(g.shape)}, expected {expected}")
        if self._op is not None:
            _check_in_place(weight=weight, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq)
        steps[rows] += 1
        row_steps = steps[rows]
        if self._op is not None:
            runs = row_runs(rows, row_steps)
            if g.numel() >= IN_PLACE_MIN_ELEMENTS * len(runs):
                self._update_runs(weight, exp_avg, exp_avg_sq, g, runs, lr)
                return
            if not bool((row_steps == row_steps[0]).all()):
                order = torch.argsort(row_steps, stable=True)
                rows, row_steps = rows[order], row_steps[order]
                g = torch.index_select(g, 0, order, out=self._buffer("g", g, len(order)))
        n = rows.numel()
        p = torch.index_select(weight, 0, rows, out=self._buffer("p", weight, n))
        m = torch.index_select(exp_avg, 0, rows, out=self._buffer("m", weight, n))
        v = torch.index_select(exp_avg_sq, 0, rows, out=self._buffer("v", weight, n))
        if self._op is not None:  # rows of one step count are contiguous slices now
            self._update_runs(p, m, v, g, row_runs(torch.arange(n), row_steps), lr)
        else:
            torch_adamw_(p, g, m, v, row_steps, lr, self.betas, self.eps, self.weight_decay)
        weight.index_copy_(0, rows, p)
        exp_avg.index_copy_(0, rows, m)
        exp_avg_sq.index_copy_(0, rows, v)

    def _buffer(self, name: str, like: torch.Tensor, rows: int) -> torch.Tensor:
        """A reused contiguous ``[rows, width]`` fp32 buffer (no fresh allocation, and
        no page faults, on every step)."""
        width = like.shape[1]
        buf = self._buffers.get(name)
        if buf is None or buf.shape[1] != width or buf.shape[0] < rows:
            buf = torch.empty(max(rows, 1), width, dtype=torch.float32)
            self._buffers[name] = buf
        return buf[:rows]

    def _update_runs(
        self,
        weight: torch.Tensor,
        exp_avg: torch.Tensor,
        exp_avg_sq: torch.Tensor,
        g: torch.Tensor,
        runs: list[tuple[int, int, int, int]],
        lr: float,
    ) -> None:
        """The kernel on ``weight[r0:r0 + j1 - j0]`` (and the moments) with ``g[j0:j1]``
        at ``step``, for each run ``(j0, j1, r0, step)``; all four are contiguous slices
        (checked by the caller), so the kernel's ``.contiguous()`` is a no-op and the update
        lands in ``weight`` itself. Calls below ``PARALLEL_MIN_ELEMENTS`` on one thread."""
        width = weight.shape[1]
        b1, b2 = self.betas
        update = self._op.adam_update
        small = [run for run in runs if (run[1] - run[0]) * width < PARALLEL_MIN_ELEMENTS]
        large = [run for run in runs if (run[1] - run[0]) * width >= PARALLEL_MIN_ELEMENTS]
        for group, threads in ((small, 1), (large, None)):
            with self._omp_threads(threads):
                for j0, j1, r0, step in group:
                    if j1 - j0 == 1:  # an int index makes a view faster than a slice
                        views = weight[r0], g[j0], exp_avg[r0], exp_avg_sq[r0]
                    else:
                        r1 = r0 + j1 - j0
                        views = weight[r0:r1], g[j0:j1], exp_avg[r0:r1], exp_avg_sq[r0:r1]
                    update(self._opt_id, step, lr, b1, b2, self.eps, self.weight_decay, True,
                           *views)

    @contextmanager
    def _omp_threads(self, threads: int | None) -> Iterator[None]:
        """The kernel's OpenMP thread count for the calling thread only (``None``: as
        is). Unlike ``torch.set_num_threads`` this leaves other threads, MKL and torch's
        global setting alone."""
        if threads is None or self._omp is None:
            yield
            return
        get_threads, set_threads = self._omp
        before = get_threads()
        set_threads(threads)
        try:
            yield
        finally:
            set_threads(before)

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


def row_runs(rows: torch.Tensor, row_steps: torch.Tensor) -> list[tuple[int, int, int, int]]:
    """Maximal runs ``(j0, j1, r0, step)``: ``rows[j0:j1]`` is ``r0, r0 + 1, ...`` and all
    of them are at ``step`` (``rows`` in any order; unsorted rows just make shorter runs)."""
    brk = (rows[1:] != rows[:-1] + 1).logical_or_(row_steps[1:] != row_steps[:-1])
    starts = torch.cat([rows.new_zeros(1), brk.nonzero().squeeze(1) + 1])
    ends = torch.cat([starts[1:], rows.new_full((1,), rows.numel())])
    return list(
        zip(starts.tolist(), ends.tolist(), rows[starts].tolist(), row_steps[starts].tolist())
    )


def _check_in_place(**tensors: torch.Tensor) -> None:
    """The kernel updates ``param.contiguous()``: only row slices of contiguous fp32 CPU
    tensors are the store itself (anything else would update a temporary, silently)."""
    for name, t in tensors.items():
        if t.device.type != "cpu" or t.dtype != torch.float32 or not t.is_contiguous():
            raise ValueError(f"cpu_adam rows: {name} must be a contiguous fp32 CPU tensor")


def _omp_controls(library: str) -> tuple[Callable[[], int], Callable[[int], None]] | None:
    """``omp_get_max_threads`` and ``omp_set_num_threads`` of the OpenMP runtime that the
    shared object ``library`` uses (looked up through its dependencies); ``None`` if absent."""
    try:
        lib = ctypes.CDLL(library)
        return lib.omp_get_max_threads, lib.omp_set_num_threads
    except (OSError, AttributeError):
        return None
