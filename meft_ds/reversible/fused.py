"""The exact streams' per-layer arithmetic as single fused kernels (``torch.compile``).

Eagerly, one coupling of :class:`~meft_ds.reversible.streams.LatticeStreams` is a dozen
passes over int64 tensors (cast, scale, round, floor division, remainder, pack, ...),
each a separate kernel, and the integer floor division by ``q`` is slow on CPUs. Here
the forward ``(a, value) -> (floor((a − base)·p/q) + round(value·2^bits), packed
remainders, value range)`` and its inverse are one traced function each, compiled by
Inductor (C++/OpenMP on CPU, Triton on CUDA) into one or two kernels.

The floor division is exact for every int64 without integer division: ``t = hi·2^32 +
lo``; ``floor(hi/q)`` and then ``floor((hi mod q)·2^32 + lo)/q)`` are each estimated in
fp64 on integers below 2^40 through the reciprocal ``x·(1/q)`` and then corrected in
exact arithmetic (:func:`floor_quotient`). No quotient ``x / q`` is left for a compiler
to rewrite: Inductor on CUDA turns ``x / q`` into ``x·(1/q)``, whose floor is one unit low
for some exact multiples (λ = 0.49, q = 49: 61% of values), and the correction step is
what makes that form exact.

Shapes: tensors are viewed as ``[rows, d]`` with ``rows`` dynamic (one compilation
serves every batch and sequence length) and ``d`` static, which keeps the remainder
packing (digit ``i`` of a byte from column chunk ``i``, as in the eager code) contiguous.
``p``, ``q`` and ``digits`` are compile-time constants. If compilation fails the caller
falls back to the eager code with one warning (:func:`enabled`).
"""

from __future__ import annotations

import logging
import types
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)

_state = {"failed": False}


def floor_quotient(x: torch.Tensor, q: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact ``(floor(x / q), x mod q)`` of a float tensor holding integers (``|x| < 2^50``
    in fp64, ``< 2^22`` in fp32) for ``1 <= q <= 255``.

    The estimate ``floor(x·(1/q))`` is within one unit of the true floor (its relative
    error is a few ulps, far below ``1/|x|``); one exact step on the remainder corrects it.
    """
    whole = torch.floor(x * (1.0 / q))
    rest = x - whole * q  # exact: integers far below the mantissa's limit
    whole = whole + (rest >= q).to(x.dtype) - (rest < 0).to(x.dtype)
    return whole, x - whole * q


def floordiv(t: torch.Tensor, q: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact ``(floor(t / q), t mod q)`` of int64 ``t`` for ``1 <= q <= 255``, elementwise."""
    hi = torch.bitwise_right_shift(t, 32)
    lo = torch.bitwise_and(t, 0xFFFFFFFF)
    q_hi, r_hi = floor_quotient(hi.to(torch.float64), q)
    mid = torch.bitwise_left_shift(r_hi.to(torch.int64), 32) + lo
    q_lo, r_lo = floor_quotient(mid.to(torch.float64), q)
    whole = torch.bitwise_left_shift(q_hi.to(torch.int64), 32) + q_lo.to(torch.int64)
    return whole, r_lo.to(torch.int64)


def pack(remainder: torch.Tensor, q: int, digits: int) -> torch.Tensor:
    """uint8 ``Σ_i chunk_i · q^i`` over ``digits`` equal chunks of the last dimension."""
    width = remainder.shape[-1] // digits
    packed = remainder[..., (digits - 1) * width:]
    for i in range(digits - 2, -1, -1):  # Horner: c0 + q·(c1 + q·(c2 + ...))
        packed = packed * q + remainder[..., i * width:(i + 1) * width]
    return packed.to(torch.uint8)


def unpack(packed: torch.Tensor, q: int, digits: int) -> torch.Tensor:
    """int64 remainders of :func:`pack` (last dimension ``digits`` times as wide)."""
    # in fp32, which holds bytes exactly
    rest = packed.to(torch.float32)
    chunks = []
    for _ in range(digits):
        rest, remainder = floor_quotient(rest, q)
        chunks.append(remainder.to(torch.int64))
    return torch.cat(chunks, dim=-1)


def couple(
    a: torch.Tensor, value: torch.Tensor, base: torch.Tensor | None,
    p: int, q: int, digits: int, unit: float,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """``(floor((a − base)·p/q) + round(value·unit), packed remainders, [min, max] of value)``."""
    v = value.to(torch.float64)
    extremes = torch.stack(torch.aminmax(v))
    c = torch.round(v * unit).to(torch.int64)
    t = a - base if base is not None else a
    if p != 1:
        t = t * p
    if q == 1:
        return t + c, None, extremes
    whole, remainder = floordiv(t, q)
    return whole + c, pack(remainder, q, digits), extremes


def uncouple(
    y: torch.Tensor, value: torch.Tensor, packed: torch.Tensor | None,
    base: torch.Tensor | None, p: int, q: int, digits: int, unit: float,
) -> torch.Tensor:
    """The exact ``a`` of :func:`couple` from its outputs and the same ``value``."""
    t = y - torch.round(value.to(torch.float64) * unit).to(torch.int64)
    if q != 1:
        t = t * q + unpack(packed, q, digits)
    if p != 1:
        t = floordiv(t, p)[0]
    return t + base if base is not None else t


_compiled: dict[tuple, Callable] = {}
_FUNCTIONS = {"couple": couple, "uncouple": uncouple}


def _kernel(name: str, key: tuple) -> Callable:
    """The compiled ``name`` for one combination of constants.

    Each combination gets its own copy of the function's code object, so each has its
    own (small) compilation cache instead of all sharing Dynamo's per-code recompile limit.
    """
    if (name, key) not in _compiled:
        fn = _FUNCTIONS[name]
        code = fn.__code__.replace(co_name=f"{fn.__name__}_{len(_compiled)}")
        copy = types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__)
        # dynamic=None: only the dims marked below are symbolic, d stays a constant
        _compiled[name, key] = torch.compile(copy, dynamic=None)
    return _compiled[name, key]


def _rows(t: torch.Tensor | None) -> torch.Tensor | None:
    """``[rows, d]`` with ``rows`` marked dynamic: one compilation serves every batch,
    sequence length and generation step (``maybe``: a first call with one row must not
    make Dynamo refuse the mark by specialising it)."""
    if t is None:
        return None
    rows = t.reshape(-1, t.shape[-1])
    torch._dynamo.maybe_mark_dynamic(rows, 0)
    return rows


def enabled() -> bool:
    """False once compilation has failed in this process."""
    return not _state["failed"]


def _run(name: str, *args: object) -> object:
    key = tuple(a if not isinstance(a, torch.Tensor) else a.dtype for a in args)
    try:
        out = _kernel(name, key)(*[_rows(a) if isinstance(a, torch.Tensor) else a for a in args])
    except Exception as exc:  # noqa: BLE001 - any compiler failure means: run eagerly
        _state["failed"] = True
        log.warning("reversible: fused stream kernels unavailable (%s: %s); using eager ops",
                    type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
        return None
    return out


def run_couple(
    a: torch.Tensor, value: torch.Tensor, base: torch.Tensor | None,
    p: int, q: int, digits: int, unit: float,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor] | None:
    """:func:`couple` compiled, on tensors of any leading shape (None if it cannot compile)."""
    out = _run("couple", a, value, base, p, q, digits, unit)
    if out is None:
        return None
    y, packed, extremes = out
    lead = a.shape[:-1]
    return y.view(a.shape), None if packed is None else packed.view(*lead, -1), extremes


def run_uncouple(
    y: torch.Tensor, value: torch.Tensor, packed: torch.Tensor | None,
    base: torch.Tensor | None, p: int, q: int, digits: int, unit: float,
) -> torch.Tensor | None:
    """:func:`uncouple` compiled (None if it cannot compile)."""
    out = _run("uncouple", y, value, packed, base, p, q, digits, unit)
    return None if out is None else out.view(y.shape)
