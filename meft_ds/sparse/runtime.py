"""Everything of the sparse adapter that lives outside the DeepSpeed engine.

:class:`SparseRuntime` owns the CPU :class:`~meft_ds.sparse.store.RowStore` and its
:class:`~meft_ds.sparse.optim.RowAdamW`, moves each layer's working set of rows to the
device (through a pinned staging buffer when the device is a GPU), takes the rows'
gradients back from the adapter's backward, and steps the store once per
optimizer step. It also counts what moved (rows, bytes each way, rows updated).
"""

from __future__ import annotations

import time
from collections import defaultdict

import torch

from meft_ds.sparse.optim import RowAdamW
from meft_ds.sparse.options import SparseOptions, SparseSizes
from meft_ds.sparse.router import Selection, select_rows
from meft_ds.sparse.store import RowStore

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class SparseRuntime:
    """CPU row store + its optimizer + the host<->device traffic of the working sets."""

    def __init__(self, options: SparseOptions, sizes: SparseSizes) -> None:
        self.options = options
        self.sizes = sizes
        self.store = RowStore(sizes, seed=options.sparse_init_seed)
        self._optimizer: RowAdamW | None = None
        self.generation = 0
        self.token_mask: torch.Tensor | None = None
        self.engine = None
        self.group = None
        self._staging: dict[int, torch.Tensor] = {}
        self._staging_done: dict[int, torch.cuda.Event] = {}
        self._counters: dict[str, float] = defaultdict(float)
        self._last: dict[str, float] = {}
        self._grads: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None

    def row_optimizer(self) -> RowAdamW:
        """The store's AdamW, made on first use (inference never builds its kernel)."""
        if self._optimizer is None:
            options = self.options
            self._optimizer = RowAdamW(
                backend=options.sparse_optimizer,
                betas=(options.sparse_beta1, options.sparse_beta2),
                eps=options.sparse_eps,
                weight_decay=options.sparse_weight_decay,
            )
        return self._optimizer

    # --- per micro-batch --------------------------------------------------------------
    def begin_micro_batch(self, attention_mask: torch.Tensor | None) -> None:
        """A new micro-batch: new row selections; padding tokens select no rows."""
        self.generation += 1
        self.token_mask = attention_mask

    def working_dtype(self, hidden_dtype: torch.dtype) -> torch.dtype:
        wanted = self.options.sparse_working_dtype
        return hidden_dtype if wanted == "auto" else _DTYPES[wanted]

    def select(
        self, layer: int, hidden: torch.Tensor, experts: torch.Tensor, count: bool = True
    ) -> Selection:
        """Top-K rows per token for ``hidden`` ``[T, d]`` routed to ``experts`` ``[T, E]``.

        ``count``: add to the step's figures (training calls; evaluation is not counted)."""
        start = time.perf_counter()
        hidden_cpu = hidden.detach().to("cpu")
        experts_cpu = experts.to("cpu")
        selection = select_rows(
            self.store.keys(layer), hidden_cpu, experts_cpu, self.sizes.num_experts,
            self.sizes.top_k,
        )
        if count:
            self._counters["d2h_bytes"] += (
                hidden_cpu.numel() * hidden_cpu.element_size()
                + experts_cpu.numel() * experts_cpu.element_size()
            )
            self._counters["select_s"] += time.perf_counter() - start
            self._counters["tokens"] += hidden.shape[0]
        return selection

    def fetch(
        self, layer: int, rows: torch.Tensor, device: torch.device, dtype: torch.dtype,
        count: bool = True,
    ) -> torch.Tensor:
        """The rows ``[U, 2d]`` of ``layer`` on ``device`` (a leaf without grad)."""
        start = time.perf_counter()
        if device.type == "cuda":
            staged = self._stage(layer, rows, dtype)
            working = staged.to(device, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
            self._staging_done[layer] = done
        else:
            working = self.store.layers[layer].weight.index_select(0, rows).to(dtype)
        if count:
            self._counters["rows_moved"] += rows.numel()
            self._counters["h2d_bytes"] += working.numel() * working.element_size()
            self._counters["fetch_s"] += time.perf_counter() - start
        return working

    def add_row_grad(self, layer: int, rows: torch.Tensor, grad: torch.Tensor) -> None:
        """Take ``dW`` of a working set (``[U, 2d]`` on the device) back to the store."""
        start = time.perf_counter()
        host = grad.detach().to("cpu")
        self._counters["d2h_bytes"] += host.numel() * host.element_size()
        host = host.float()
        scale = self._loss_scale()
        if scale != 1.0:
            host.div_(scale)
        self.store.add_grad(layer, rows, host)
        self._grads = None
        self._counters["grad_s"] += time.perf_counter() - start

    # --- engine integration -------------------------------------------------------------
    def _loss_scale(self) -> float:
        """fp16 engines scale the loss: the store's gradients are unscaled here."""
        engine = self.engine
        if engine is None or not getattr(engine, "fp16_enabled", lambda: False)():
            return 1.0
        optimizer = getattr(engine, "optimizer", None)
        for attr in ("cur_scale", "loss_scale"):
            value = getattr(optimizer, attr, None)
            if isinstance(value, (int, float)) and value > 0:
                return float(value)
        return 1.0

    def grads(self) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """The coalesced (and, data-parallel, averaged) gradients of this step."""
        if self._grads is None:
            self._grads = self.store.coalesce(self.group)
        return self._grads

    def grad_sq_norm(self) -> float:
        return float(
            sum(g.double().pow(2).sum() for _, g in self.grads().values() if g.numel())
        )

    def step(self, lr: float, clip_coef: float = 1.0, skip: bool = False) -> None:
        """Apply AdamW to the rows that got gradients since the last step."""
        start = time.perf_counter()
        grads = self.grads()
        self._grads = None
        self.store.clear_grads()
        finite = all(bool(torch.isfinite(g).all()) for _, g in grads.values() if g.numel())
        updated = 0
        if skip or not finite:
            self._counters["store_steps_skipped"] += 1
        else:
            store_lr = lr * self.options.sparse_lr_ratio
            for layer, (rows, grad) in grads.items():
                if not rows.numel():
                    continue
                if clip_coef < 1.0:
                    grad = grad * clip_coef
                state = self.store.layers[layer]
                self.row_optimizer().step(
                    state.weight, state.exp_avg, state.exp_avg_sq, state.steps, rows, grad,
                    store_lr,
                )
                updated += rows.numel()
        self._counters["rows_updated"] += updated
        self._counters["optim_s"] += time.perf_counter() - start
        self._last = dict(self._counters)
        self._counters.clear()
        # The rows changed: no cached selection or working set may be reused.
        self.generation += 1

    def metrics(self) -> dict[str, float]:
        """Figures of the last completed step, ``sparse_``-prefixed: ``tokens`` routed,
        ``rows_moved`` host->device (sum over layers and micro-batches of the working-set
        sizes), ``h2d_bytes`` / ``d2h_bytes`` (rows; hidden states, expert ids and row
        gradients; counted whatever the device, a CPU one included), ``rows_updated``,
        ``store_steps_skipped``, and seconds spent in ``select_s``, ``fetch_s``,
        ``grad_s``, ``optim_s``."""
        return {f"sparse_{key}": value for key, value in self._last.items()}
