"""The sparse parallel adapter beside one FFN: ``FFN(h) + sum_i g_{t,e(i)} act(h.k_i) v_i``.

For token ``t`` the sum runs over its top-K keys ``i`` (chosen on the CPU among the keys
of the ``E`` experts the router picked). ``g_{t,e}`` is the router's softmax over all ``N``
experts at the picked expert ``e``, times ``N/E`` (a uniform router gives each chosen
expert ``1/E``, together 1): as in Switch Transformers, this is how the router gets a
gradient, also with ``E = 1``.

The adapter's only engine parameter is the router; keys and values are rows of the CPU
store, fetched per micro-batch as the working set ``W = [K_U | V_U]``:

    S = h K_U^T  (T x U),   G = gates scattered to each token's K columns (0 elsewhere),
    out = (act(S) * G) V_U

With the values initialised to zero the adapted model starts as the pretrained one.

The working set is no autograd leaf: :class:`_SparseRows` computes ``out`` and, in its
backward, hands ``dW`` to the store. So the rows' gradient arrives whenever backward
passes through the adapter towards ``h`` or the router, under ``loss.backward()`` and
under ``torch.autograd.grad(out, [h, *params])`` (the reversible backward) alike. The
backward recomputes ``S`` instead of saving it.

With ``--sparse_prefetch`` the decision is started earlier, from the layer's attention
input (:meth:`SparseAdapter.prefetch`, called by a forward pre-hook of the layer's input
norm): the router picks the experts from that input put through the FFN norm, and the
selection and row fetch run on a worker thread while attention computes (see
:mod:`meft_ds.sparse.runtime`). The gates still come from the router on the FFN input.

Decisions (the router's experts, the selected rows, the working set) are made once per
layer and micro-batch and reused by a recomputation of it: cached in training mode
(activation checkpointing), or recorded and replayed explicitly through
:meth:`SparseAdapter.rev_capture` / :meth:`SparseAdapter.rev_replay` (reversible layers,
whose recomputed inputs may differ from the forward's in the last bits): the adapter is
:class:`~meft_ds.reversible.replay.Replayable` with :class:`Record` as its record.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from meft_ds.reversible.replay import Replayable
from meft_ds.sparse.context import Carry, data_parallel_mean, prefix_mean, row_sum
from meft_ds.sparse.router import Selection
from meft_ds.sparse.runtime import SparseRuntime

_ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}


class _SparseRows(torch.autograd.Function):
    """``out = (act(x K^T) * G) V`` for the working set ``W = [K | V]``, where ``G`` holds
    token ``t``'s gates ``gates[t]`` at its columns ``local[t]`` and zeros elsewhere.
    ``dW`` goes to ``sink`` during backward instead of being returned. Saved for backward:
    ``x``, the ``[T, K]`` gates and columns (``G`` and ``x K^T`` are rebuilt), ``W``."""

    @staticmethod
    def forward(ctx, x, gates, local, working, activation: str, sink: Callable):
        hidden = working.shape[1] // 2
        keys, values = working[:, :hidden], working[:, hidden:]
        gate_matrix = _scatter(gates, local, working.shape[0])
        out = (_ACTIVATIONS[activation](x @ keys.t()) * gate_matrix) @ values
        ctx.save_for_backward(x, gates, local, working)
        ctx.activation = activation
        ctx.sink = sink
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, gates, local, working = ctx.saved_tensors
        hidden = working.shape[1] // 2
        keys, values = working[:, :hidden], working[:, hidden:]
        gate_matrix = _scatter(gates, local, working.shape[0])
        grad_out = grad_out.to(working.dtype)
        scores = x @ keys.t()
        if ctx.activation == "relu":
            act = F.relu(scores)
        else:
            with torch.enable_grad():
                leaf = scores.detach().requires_grad_(True)
                act_graph = _ACTIVATIONS[ctx.activation](leaf)
            act = act_graph.detach()
        grad_act_gated = grad_out @ values.t()
        grad_values = (act * gate_matrix).t() @ grad_out
        grad_gates = (grad_act_gated * act).gather(1, local)
        grad_act = grad_act_gated * gate_matrix
        if ctx.activation == "relu":
            grad_scores = grad_act * (scores > 0)
        else:
            (grad_scores,) = torch.autograd.grad(act_graph, leaf, grad_act)
        grad_x = grad_scores @ keys
        grad_keys = grad_scores.t() @ x
        ctx.sink(torch.cat([grad_keys, grad_values], dim=1))
        return grad_x, grad_gates, None, None, None, None


def _scatter(gates: torch.Tensor, local: torch.Tensor, columns: int) -> torch.Tensor:
    """``[T, columns]`` zeros with ``gates[t, j]`` at column ``local[t, j]``."""
    return gates.new_zeros(gates.shape[0], columns).scatter_(1, local, gates)


@dataclass
class Decision:
    """One layer's choices for one micro-batch (reused by its recomputation)."""

    shape: torch.Size
    tokens: torch.Tensor | None
    experts: torch.Tensor
    selection: Selection
    working: torch.Tensor
    generation: int = -1


@dataclass
class Pending:
    """A decision started by :meth:`SparseAdapter.prefetch`, not yet taken."""

    shape: torch.Size
    tokens: torch.Tensor | None
    experts: torch.Tensor
    future: Future
    generation: int
    counted: bool


class Record:
    """What :meth:`SparseAdapter.rev_capture` returns: filled by the next forward."""

    decision: Decision | None = None


class SparseAdapter(nn.Module):
    """Router (trainable, on the device) + rows from the CPU store (see module docstring)."""

    def __init__(self, runtime: SparseRuntime, layer: int) -> None:
        super().__init__()
        sizes = runtime.sizes
        self.layer = layer
        self.activation = runtime.options.sparse_activation
        self.router = nn.Linear(sizes.hidden, sizes.num_experts, bias=False)
        # logits = ratio * (x W^T) with W stored divided by ratio: any optimizer's step
        # on W then moves the effective router ratio times as fast (Adam's step does not
        # depend on the gradient's scale), under every ZeRO stage and schedule
        self.router_scale = float(runtime.options.sparse_router_lr_ratio)
        # Plain attributes (not submodules/buffers): the store must stay on the CPU.
        object.__setattr__(self, "runtime", runtime)
        object.__setattr__(self, "_cache", None)
        object.__setattr__(self, "_record", None)
        object.__setattr__(self, "_replay", None)
        object.__setattr__(self, "route_norm", None)  # set for --sparse_prefetch
        object.__setattr__(self, "_pending", None)
        # --sparse_route context (meft_ds.sparse.context): the centre is set by the
        # launcher's calibration pass (SparseMethod.calibrate), else by the first training
        # micro-batch, or loaded; the carry continues KV-cached decoding
        self.context = runtime.options.sparse_route == "context"
        object.__setattr__(self, "_carry", None)
        object.__setattr__(self, "_centred", False)
        if self.context:
            self.register_buffer("context_centre", torch.zeros(sizes.hidden))
        self.reset_router()
        read = runtime.options.sparse_read_r
        if read:  # --sparse_read_r: forked RNG, so the run's own random stream is unchanged
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(runtime.options.sparse_init_seed + 7919 * (layer + 1))
                self.read_down = nn.Linear(sizes.hidden, read, bias=False)
            self.read_up = nn.Linear(read, sizes.hidden, bias=False)
            nn.init.zeros_(self.read_up.weight)
            self.read_scale = 2.0  # alpha / r with alpha = 2r, as the attention LoRA

    @torch.no_grad()
    def reset_router(self) -> None:
        """Router row ``e`` = unit centroid of expert ``e``'s keys, so at initialisation a
        token prefers the experts whose keys it matches on average."""
        sizes = self.runtime.sizes
        centroids = self.runtime.store.key_centroids(self.layer)  # [N, d], all experts
        centroids = F.normalize(centroids, dim=1) / math.sqrt(sizes.hidden)
        self.router.weight.copy_((centroids / self.router_scale).to(self.router.weight))

    def route(self, x: torch.Tensor) -> torch.Tensor:
        """Router logits ``[T, N]`` for ``x`` ``[T, d]``."""
        return self.router(x) * self.router_scale

    # --- read-only views of the decision state (tests and diagnostics) ---------------
    @property
    def decision(self) -> Decision | None:
        """This micro-batch's decision, cached for its recomputations (training)."""
        return self._cache

    @property
    def pending(self) -> Pending | None:
        """A decision :meth:`prefetch` started and the next call has not taken yet."""
        return self._pending

    @property
    def recording(self) -> Record | None:
        """The record the next forward call fills (set by :meth:`rev_capture`)."""
        return self._record

    @property
    def replaying(self) -> Decision | None:
        """The recorded decision calls reuse inside :meth:`rev_replay`."""
        return self._replay

    def extra_repr(self) -> str:
        s = self.runtime.sizes
        return (
            f"layer={self.layer}, rank={s.rank}, experts={s.num_experts}x{s.rows_per_expert}, "
            f"experts_per_token={s.experts_per_token}, top_k={s.top_k}"
        )

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        sizes = self.runtime.sizes
        record = self._record  # a rev_capture() applies to this call only
        object.__setattr__(self, "_record", None)
        flat = hidden.reshape(-1, sizes.hidden)
        decision = self._reused(hidden)
        tokens = decision.tokens if decision is not None else self._active_tokens(hidden)
        x = flat if tokens is None else flat.index_select(0, tokens)
        if x.shape[0] == 0:
            return torch.zeros_like(hidden)
        if self.context and self.runtime.calibration is not None:
            # the calibration pass (SparseMethod.calibrate): count the means, add nothing
            # (a fresh adapter's values are 0: the layers above see the same inputs)
            sums = self.runtime.calibration
            total = row_sum(self._context_means(hidden, tokens))
            sums[self.layer] = total if self.layer not in sums else sums[self.layer] + total
            return torch.zeros_like(hidden)

        logits = self.route(self._context_query(hidden, tokens) if self.context else x)
        fresh = decision is None  # not a recomputation (counted once by diagnostics)
        if decision is None:
            decision = self._prefetched(hidden)
        if decision is None:
            decision = self._decide(hidden, tokens, x, logits)
        if record is not None:
            record.decision = decision
        probs = torch.softmax(logits.float(), dim=-1)
        gates = probs.gather(1, decision.experts) * (sizes.num_experts / sizes.experts_per_token)

        selection, working = decision.selection, decision.working
        dtype = working.dtype
        local = selection.local.to(x.device, non_blocking=True)
        slot = selection.slot.to(x.device, non_blocking=True)
        token_gates = gates.gather(1, slot).to(dtype)
        if fresh and self.training and self.runtime.usage is not None:
            self.runtime.usage.add_gates(self.layer, token_gates)
        sink = partial(self.runtime.add_row_grad, self.layer, selection.rows)
        if hasattr(self, "read_up"):  # selection above used x itself (fixed addresses)
            x = x + self.read_up(self.read_down(x)) * self.read_scale
        out = _SparseRows.apply(x.to(dtype), token_gates, local, working, self.activation, sink)
        out = out.to(hidden.dtype)
        if tokens is None:
            return out.reshape(hidden.shape)
        full = torch.zeros_like(flat)
        return full.index_copy(0, tokens, out).reshape(hidden.shape)

    def _context_query(self, hidden: torch.Tensor, tokens: torch.Tensor | None,
                       keep_carry: bool = True) -> torch.Tensor:
        """The router's input under context routing: each active token's centred causal
        mean ``[T_active, d]`` (see :mod:`meft_ds.sparse.context`); ``keep_carry``: this
        call's running sums are the ones the next cached decoding step continues."""
        flat = self._context_means(hidden, tokens, keep_carry)
        if self.training and not self._centred:  # no calibration pass ran: this batch's
            with torch.no_grad():  # (a collective on the group: every rank gets here)
                self.set_context_centre(data_parallel_mean(row_sum(flat),
                                                           self.runtime.group))
        return (flat - self.context_centre.float()).to(hidden.dtype)

    def _context_means(self, hidden: torch.Tensor, tokens: torch.Tensor | None,
                       keep_carry: bool = True) -> torch.Tensor:
        """Each active token's causal mean ``[T_active, d]`` (fp32), not centred."""
        runtime = self.runtime
        carry = self._carry if runtime.continuing and not self.training else None
        if carry is not None and carry.total.shape[0] != hidden.shape[0]:
            raise RuntimeError("sparse_route context: a cached decoding step changed the "
                               "batch size (a cache reordered without reorder_cache?)")
        means, after = prefix_mean(hidden, runtime.token_mask, carry)
        if keep_carry:
            object.__setattr__(self, "_carry", None if self.training else after)
        flat = means.reshape(-1, means.shape[-1])
        return flat if tokens is None else flat.index_select(0, tokens)

    def reorder_carry(self, order: torch.Tensor) -> None:
        """Keep the running sums with a reordered KV cache: sequence ``i`` continues as
        ``order[i]`` did (beam search)."""
        carry = self._carry
        if carry is not None:
            object.__setattr__(self, "_carry", Carry(
                carry.total.index_select(0, order.to(carry.total.device)),
                carry.count.index_select(0, order.to(carry.count.device))))

    @property
    def centred(self) -> bool:
        """Whether the context-routing centre is set (calibrated or loaded)."""
        return self._centred

    def set_context_centre(self, centre: torch.Tensor) -> None:
        """Fix the context-routing centre ``[d]`` (calibrated, or loaded from an export)."""
        with torch.no_grad():
            self.context_centre.copy_(centre)
        object.__setattr__(self, "_centred", True)

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001, ANN202 (nn.Module's)
        # the centre stays fp32 under .to(bf16)/.half(): it cancels most of the mean it is
        # subtracted from, so its rounding would be of the size of what is left
        centre = self._buffers.get("context_centre")
        out = super()._apply(fn, recurse)
        if centre is not None:
            self._buffers["context_centre"] = centre.to(self._buffers["context_centre"].device)
        return out

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # a checkpoint's centre (engine resume) counts as calibrated
        if self.context and prefix + "context_centre" in state_dict:
            object.__setattr__(self, "_centred", True)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _active_tokens(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """Indices of the non-padding tokens (training only), ``None`` = all tokens (found
        once per micro-batch: :meth:`SparseRuntime.active_tokens`)."""
        if not self.training:
            return None
        return self.runtime.active_tokens(hidden.shape[:-1], hidden.device)

    def _reused(self, hidden: torch.Tensor) -> Decision | None:
        """The decision to reuse for this call: a replayed one, or this micro-batch's."""
        if self._replay is not None:
            return self._replay
        cache = self._cache
        if (
            self.training and cache is not None
            and cache.generation == self.runtime.generation and cache.shape == hidden.shape
        ):
            return cache
        return None

    def _decide(
        self, hidden: torch.Tensor, tokens: torch.Tensor | None, x: torch.Tensor,
        logits: torch.Tensor,
    ) -> Decision:
        runtime = self.runtime
        experts = logits.detach().topk(runtime.sizes.experts_per_token, dim=-1).indices
        selection = runtime.select(self.layer, x, experts, count=self.training)
        working = runtime.fetch(
            self.layer, selection.rows, x.device, runtime.working_dtype(x.dtype),
            count=self.training,
        )
        return self._keep(Decision(
            hidden.shape, tokens, experts, selection, working, runtime.generation
        ))

    def _keep(self, decision: Decision) -> Decision:
        """Cache a new decision for recomputations of this micro-batch (training)."""
        if self.training:
            object.__setattr__(self, "_cache", decision)
        return decision

    # --- prefetch (--sparse_prefetch) ---------------------------------------------------
    def route_from(self, norm: nn.Module) -> None:
        """Prefetch from the attention input put through ``norm`` (the layer's FFN norm;
        kept as a plain attribute, it is already a submodule of the layer)."""
        object.__setattr__(self, "route_norm", norm)

    @torch.no_grad()
    def prefetch(self, residual: torch.Tensor) -> None:
        """Start this call's decision from the layer's attention input ``residual``
        (same shape as the FFN input), unless the call will reuse one anyway."""
        if (self.route_norm is None or self._reused(residual) is not None
                or self.runtime.calibration is not None):  # calibration selects no rows
            return
        runtime = self.runtime
        tokens = self._active_tokens(residual)
        normed = self.route_norm(residual)
        x = normed.reshape(-1, runtime.sizes.hidden)
        if tokens is not None:
            x = x.index_select(0, tokens)
        object.__setattr__(self, "_pending", None)
        if x.shape[0] == 0:
            return
        # context routing: the mean of the attention inputs instead (the carry stays the
        # forward's; a first training batch sets the centre from these inputs)
        r = self._context_query(normed, tokens, keep_carry=False) if self.context else x
        experts = self.route(r).topk(runtime.sizes.experts_per_token, dim=-1).indices
        future = runtime.prefetch(
            self.layer, x, experts, runtime.working_dtype(x.dtype), count=self.training
        )
        object.__setattr__(self, "_pending", Pending(
            residual.shape, tokens, experts, future, runtime.generation, self.training
        ))

    def _prefetched(self, hidden: torch.Tensor) -> Decision | None:
        """The prefetched decision for this call, if one was started for it."""
        pending = self._pending
        object.__setattr__(self, "_pending", None)
        if pending is None:
            return None
        runtime = self.runtime
        selection, working = runtime.take(self.layer, pending.future, count=pending.counted)
        if pending.generation != runtime.generation or pending.shape != hidden.shape:
            return None  # started for another call (its traffic is counted, nothing else)
        return self._keep(Decision(
            hidden.shape, pending.tokens, pending.experts, selection, working,
            pending.generation,
        ))

    # --- the replay contract (meft_ds.reversible.replay.Replayable) -------------------
    def rev_capture(self) -> Record:
        """Record the decisions of the next forward call."""
        record = Record()
        object.__setattr__(self, "_record", record)
        return record

    @contextmanager
    def rev_replay(self, record: Record) -> Iterator[None]:
        """Recompute with the recorded call's experts, rows and working set."""
        object.__setattr__(self, "_replay", record.decision)
        try:
            yield
        finally:
            object.__setattr__(self, "_replay", None)

    def clear_cache(self) -> None:
        object.__setattr__(self, "_cache", None)


if TYPE_CHECKING:  # the sparse adapter satisfies the reversible stack's replay contract
    _REPLAYABLE: type[Replayable[Record]] = SparseAdapter
