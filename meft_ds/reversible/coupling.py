"""Reversible coupling layers and the autograd Function that recomputes their inputs.

One coupling: ``y1 = λ·x1 + F(x2)``, ``y2 = β·x2 + G(y1)``; its inverse
``x2 = (y2 − G(y1)) / β``, ``x1 = (y1 − F(x2)) / λ``. With ``swap`` the next layer gets
``(y2, y1)``. A *centred* F (a pre-trained block) uses ``y1 = λ·(x1 − x2) + F(x2)``
(likewise ``y2 = β·(x2 − y1) + G(y1)``): still a coupling, but the extra λ-term is the
difference of neighbouring hidden states instead of a whole hidden state, which keeps
the model close to the base model at step 0.

Stream values live in a :mod:`~meft_ds.reversible.streams` arithmetic (exact fixed point
in fp64 by default); F and G read them as floats. Gradients follow the float coupling
formulas (the lattice rounding is passed straight through).

:class:`RevStackFunction` runs a whole stack of couplings without a graph and saves only
the top layer's two streams (plus the streams at optional *restart points*, which bound
how far reconstruction errors, amplified by ~1/λ or ~1/β per layer, can travel). Its
backward walks down the stack, reconstructs each layer's inputs from its outputs,
recomputes F and G with a graph (same dtypes, same autocast, the forward's RNG state
restored, the adapters' own recorded decisions replayed) and back-propagates through
them. Parameter gradients are returned as gradients of the Function's inputs, so they
reach the parameters (and the DeepSpeed engine's hooks) like any other gradient.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from meft_ds.reversible.blocks import Block, LayerContext, frozen_trainable
from meft_ds.reversible.replay import Replayable
from meft_ds.reversible.streams import FloatStreams, LatticeStreams

log = logging.getLogger(__name__)


@dataclass
class CallState:
    """What a block's recompute needs to reproduce its forward: RNG states + adapter state."""

    cpu_rng: torch.Tensor
    cuda_rng: torch.Tensor | None
    device: torch.device
    hooks: list[tuple[Replayable, Any]]


def _capture(block: Block, device: torch.device) -> CallState:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    hooks = [(m, m.rev_capture()) for m in block.modules() if isinstance(m, Replayable)]
    return CallState(torch.get_rng_state(), cuda, device, hooks)


@contextmanager
def _replay(state: CallState) -> Iterator[None]:
    """Run with the RNG state and adapter decisions of the recorded forward call."""
    devices = [state.device] if state.cuda_rng is not None else []
    with ExitStack() as stack:
        stack.enter_context(torch.random.fork_rng(devices=devices, device_type="cuda"))
        torch.set_rng_state(state.cpu_rng)
        if state.cuda_rng is not None:
            torch.cuda.set_rng_state(state.cuda_rng, state.device)
        for module, saved in state.hooks:
            stack.enter_context(module.rev_replay(saved))
        yield


Scale = Any  # FloatScale | RationalScale
Streams = FloatStreams | LatticeStreams


class RevLayer(nn.Module):
    """One reversible coupling of blocks ``f`` and ``g`` with scales ``lam``, ``beta``."""

    def __init__(
        self, f: Block, g: Block, lam: float, beta: float, swap: bool,
        center: tuple[bool, bool] = (False, False),
    ) -> None:
        super().__init__()
        self.f = f
        self.g = g
        self.lam = float(lam)
        self.beta = float(beta)
        self.swap = swap
        self.center = center

    def forward_states(
        self, s1: torch.Tensor, s2: torch.Tensor, ctx: LayerContext, streams: Streams,
        scales: tuple[Scale, Scale], states: list[CallState], aux: list,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Next layer's stream states (no graph); records call states and remainders."""
        lam, beta = scales
        states.append(_capture(self.f, s2.device))
        f = _as_in_backward(self.f, streams.decode(s2), ctx)
        y1, r1 = streams.couple(lam, s1, f, s2 if self.center[0] else None)
        states.append(_capture(self.g, y1.device))
        g = _as_in_backward(self.g, streams.decode(y1), ctx)
        y2, r2 = streams.couple(beta, s2, g, y1 if self.center[1] else None)
        aux.append((r1, r2))
        return (y2, y1) if self.swap else (y1, y2)

    def forward_graph(
        self, x1: torch.Tensor, x2: torch.Tensor, s1: torch.Tensor, s2: torch.Tensor,
        ctx: LayerContext, streams: Streams, scales: tuple[Scale, Scale],
    ) -> tuple[torch.Tensor, ...]:
        """Plain-autograd twin of :meth:`forward_states`: same values, graph through F, G.

        ``x*`` are float tensors equal to ``decode(s*)``; returns (x1, x2, s1, s2) of the
        next layer.
        """
        lam, beta = scales
        f = self.f(x2, ctx)
        y1_s, _ = streams.couple(lam, s1, f.detach(), s2 if self.center[0] else None)
        y1 = lam.value * (x1 - x2 if self.center[0] else x1) + f
        y1 = _through(y1, streams.decode(y1_s))
        g = self.g(y1, ctx)
        y2_s, _ = streams.couple(beta, s2, g.detach(), y1_s if self.center[1] else None)
        y2 = beta.value * (x2 - y1 if self.center[1] else x2) + g
        y2 = _through(y2, streams.decode(y2_s))
        return (y2, y1, y2_s, y1_s) if self.swap else (y1, y2, y1_s, y2_s)

    def backward_step(
        self, out1: torch.Tensor, out2: torch.Tensor, gout1: torch.Tensor, gout2: torch.Tensor,
        ctx: LayerContext, streams: Streams, scales: tuple[Scale, Scale], aux: tuple,
        f_state: CallState, g_state: CallState, param_grads: dict[nn.Parameter, torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Input states and their gradients from output states and theirs.

        Accumulates the blocks' parameter gradients into ``param_grads``.
        """
        lam, beta = scales
        if self.swap:
            y1, y2, gy1, gy2 = out2, out1, gout2, gout1
        else:
            y1, y2, gy1, gy2 = out1, out2, gout1, gout2
        g_params = self.g.trainable()
        with torch.enable_grad(), _replay(g_state):
            y1_leaf = streams.decode(y1).detach().requires_grad_(True)
            g = self.g(y1_leaf, ctx)
            g_total = g - beta.value * y1_leaf if self.center[1] else g
            grads = torch.autograd.grad(g_total, [y1_leaf, *g_params], gy2, allow_unused=True)
        _accumulate(param_grads, g_params, grads[1:])
        gy1_total = gy1 + grads[0]
        x2 = streams.uncouple(beta, y2, g.detach(), aux[1], y1 if self.center[1] else None)
        f_params = self.f.trainable()
        with torch.enable_grad(), _replay(f_state):
            x2_leaf = streams.decode(x2).detach().requires_grad_(True)
            f = self.f(x2_leaf, ctx)
            f_total = f - lam.value * x2_leaf if self.center[0] else f
            grads = torch.autograd.grad(
                f_total, [x2_leaf, *f_params], gy1_total, allow_unused=True
            )
        _accumulate(param_grads, f_params, grads[1:])
        x1 = streams.uncouple(lam, y1, f.detach(), aux[0], x2 if self.center[0] else None)
        return x1, x2, lam.value * gy1_total, beta.value * gy2 + grads[0]


def _as_in_backward(block: Block, x: torch.Tensor, ctx: LayerContext) -> torch.Tensor:
    """``block(x)`` called exactly as :meth:`RevLayer.backward_step` recomputes it: grad
    mode on, the input a leaf that requires grad. Kernels chosen by grad mode (on a GPU,
    SDPA takes another kernel when it must return softmax statistics for backward) then
    agree between forward and recompute, so the recompute reproduces the forward bit for
    bit. The graph is dropped at once: one block's activations live at a time, and no
    outer saved-tensor hook (activation meters, offloading) sees them."""
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(_keep, _keep):
        return block(x.detach().requires_grad_(True), ctx).detach()


def _keep(tensor: torch.Tensor) -> torch.Tensor:
    # Detached: a saved output kept as itself would link back to its own grad_fn, a cycle
    # through C++ that gc cannot see; this graph never runs backward, so nothing would
    # break it and every step would leak its blocks' activations (~100 MB a step at 135M).
    return tensor.detach()


def _accumulate(
    table: dict[nn.Parameter, torch.Tensor], params: list[nn.Parameter], grads: tuple
) -> None:
    for param, grad in zip(params, grads, strict=True):
        if grad is None:
            continue
        table[param] = table[param] + grad if param in table else grad


@dataclass
class StackRun:
    """One forward of a reversible stack: its layers, shared context and diagnostics.

    ``restart_every``: save both streams at the input of every layer whose index is a
    positive multiple of it (0: never; not needed by exact streams).
    ``record_errors``: keep every layer's true input states (costly; tests and
    benchmarks only) and fill ``errors`` with the max-abs relative reconstruction error
    of each layer's inputs during backward.
    ``stats``: counters shared across runs; ``inexact_backwards`` counts backwards of exact
    streams whose reconstructed stack input differed from the forward's (checked by an
    exact checksum: a recompute that does not reproduce the forward bit for bit).
    """

    layers: list[RevLayer]
    context: LayerContext
    streams: Streams
    restart_every: int = 0
    record_errors: bool = False
    errors: dict[int, float] = field(default_factory=dict)
    scales: list[tuple[Scale, Scale]] = field(default_factory=list)
    stats: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.scales = [
            (self.streams.scale(layer.lam), self.streams.scale(layer.beta))
            for layer in self.layers
        ]


class RevStackFunction(torch.autograd.Function):
    """``(x1, x2, *params) -> top streams`` of a reversible stack, storing no activations.

    Saved for backward: the top layer's two stream states, the remainders of exact
    streams (half a byte per element per scale 1/10) and the restart points, if any.
    """

    @staticmethod
    def forward(ctx, run: StackRun, x1: torch.Tensor, x2: torch.Tensor, *params):  # type: ignore[override]
        streams = run.streams
        states: list[CallState] = []
        aux: list[tuple] = []
        restarts: list[torch.Tensor] = []
        restart_at: list[int] = []
        truth: list[tuple[torch.Tensor, torch.Tensor]] = []
        with torch.no_grad():
            s1, s2 = streams.encode(x1), streams.encode(x2)
            ctx.checksum = _checksum(s1, s2) if streams.exact else None
            for i, layer in enumerate(run.layers):
                if run.restart_every and i and i % run.restart_every == 0:
                    restart_at.append(i)
                    restarts += [s1, s2]
                if run.record_errors:
                    truth.append((s1.clone(), s2.clone()))
                s1, s2 = layer.forward_states(
                    s1, s2, run.context, streams, run.scales[i], states, aux
                )
            streams.check()
            out1, out2 = streams.decode(s1), streams.decode(s2)
        present = [t for pair in aux for t in pair if t is not None]
        ctx.layout = [tuple(t is not None for t in pair) for pair in aux]
        ctx.run, ctx.states, ctx.restart_at, ctx.truth = run, states, restart_at, truth
        ctx.params = params
        ctx.counts = (len(restarts), len(present))
        ctx.save_for_backward(s1, s2, *restarts, *present)
        return out1, out2

    @staticmethod
    def backward(ctx, g1: torch.Tensor | None, g2: torch.Tensor | None):  # type: ignore[override]
        run: StackRun = ctx.run
        s1, s2, *rest = ctx.saved_tensors
        n_restart, _ = ctx.counts
        restarts, present = rest[:n_restart], iter(rest[n_restart:])
        aux = [tuple(next(present) if has else None for has in pair) for pair in ctx.layout]
        dtype = run.streams.dtype
        g1 = torch.zeros(s1.shape, dtype=dtype, device=s1.device) if g1 is None else g1
        g2 = torch.zeros(s2.shape, dtype=dtype, device=s2.device) if g2 is None else g2
        exact = {i: (restarts[2 * k], restarts[2 * k + 1]) for k, i in enumerate(ctx.restart_at)}
        param_grads: dict[nn.Parameter, torch.Tensor] = {}
        for i in range(len(run.layers) - 1, -1, -1):
            s1, s2, g1, g2 = run.layers[i].backward_step(
                s1, s2, g1, g2, run.context, run.streams, run.scales[i], aux[i],
                ctx.states[2 * i], ctx.states[2 * i + 1], param_grads,
            )
            if run.record_errors:
                run.errors[i] = max(_rel_err(s1, ctx.truth[i][0]), _rel_err(s2, ctx.truth[i][1]))
            if i in exact:
                s1, s2 = exact[i]
        run.streams.check()
        if ctx.checksum is not None and not torch.equal(_checksum(s1, s2), ctx.checksum):
            run.stats["inexact_backwards"] = run.stats.get("inexact_backwards", 0) + 1
            _warn_inexact()
        ctx.states = ctx.truth = None
        grads = tuple(param_grads.get(p) for p in ctx.params)
        return (None, g1, g2, *grads)


class _StraightThrough(torch.autograd.Function):
    """Returns ``value`` (the exact stream value) with the gradient of ``x`` passed through."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, value: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return value.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return grad, None


def _through(x: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    return _StraightThrough.apply(x, value)


def _checksum(*states: torch.Tensor) -> torch.Tensor:
    """Exact integer checksum of lattice states: the low and high 32-bit halves summed
    plainly and with a position-dependent weight in [1, 65521] (int64 sums wrap
    identically on every device), so errors of opposite sign at two positions, which
    cancel in a plain sum, change the weighted one."""
    parts = []
    for s in states:
        flat = s.reshape(-1)
        index = torch.arange(flat.numel(), device=flat.device, dtype=torch.int64)
        weight = (index * 2654435761) % 65521 + 1
        for part in (torch.bitwise_and(flat, 0xFFFFFFFF), torch.bitwise_right_shift(flat, 32)):
            parts += [part.sum(), (part * weight).sum()]
    return torch.stack(parts)


@functools.cache
def _warn_inexact() -> None:
    """Warn once per process."""
    log.warning(
        "reversible: the backward's recompute did not reproduce the forward exactly "
        "(the stack's inputs were reconstructed with an error), so gradients are "
        "approximate; look for non-determinism in F/G (kernels, RNG, weights changed "
        "between forward and backward)"
    )


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    scale = want.abs().max().clamp_min(torch.finfo(torch.float64).tiny)
    return float((got - want).abs().max() / scale)


def run_stack(
    run: StackRun, x1: torch.Tensor, x2: torch.Tensor, reversible: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top streams (floats) of the stack: reversible (no stored activations) or autograd."""
    streams = run.streams
    if not reversible:
        s1, s2 = streams.encode(x1.detach()), streams.encode(x2.detach())
        x1 = x1.to(streams.dtype)
        x2 = x2.to(streams.dtype)
        x1, x2 = _through(x1, streams.decode(s1)), _through(x2, streams.decode(s2))
        for layer, scales in zip(run.layers, run.scales, strict=True):
            x1, x2, s1, s2 = layer.forward_graph(x1, x2, s1, s2, run.context, streams, scales)
        streams.check()
        return x1, x2
    if not (x1.requires_grad or x2.requires_grad):
        # The Function's backward must run even with frozen embeddings.
        x1 = x1.detach().requires_grad_(True)
    params = [p for layer in run.layers
              for p in (*layer.parameters(), *frozen_trainable(layer)) if p.requires_grad]
    return RevStackFunction.apply(run, x1, x2, *params)
