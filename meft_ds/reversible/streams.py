"""Arithmetic of the two residual streams: exact fixed point in fp64, or plain floats.

The inverse of a coupling divides by λ (or β), so in floating point any rounding of the
forward is amplified ~1/λ per layer on the way down (measured: ×10 a layer for MEFT1,
×100 for MEFT3 at λ=β=0.1; fp64 reaches 1e-2 relative error after ~12 MEFT1 layers).

:class:`LatticeStreams` (the default for fp64 streams) makes the inverse exact at any
depth: stream values are integers times ``2**-bits`` held in int64 (every one is exactly
an fp64 number: F and G read them as fp64). F's and G's outputs are rounded onto the
lattice (a deterministic function of exact inputs), additions are exact, and
``λ = p/q`` (the nearest fraction with ``p, q <= 255``) multiplies exactly as
``floor(a·p / q)`` with the remainder ``a·p mod q`` kept, packed two to a byte for
``q = 10`` (:class:`RationalScale`) — the log2(q) bits a scale < 1 destroys (the idea
of storing the lost bits follows MacKay et al., "Reversible Recurrent Neural Networks",
2018). Nothing else is stored per layer.

:class:`FloatStreams` (fp32, or fp64 with ``exact`` off) is plain float arithmetic;
its error is bounded with restart points instead (see ``coupling.StackRun``).
"""

from __future__ import annotations

from fractions import Fraction

import torch

MAX_DENOMINATOR = 255


class FloatScale:
    """Multiplication by a float scale; the inverse divides."""

    def __init__(self, value: float) -> None:
        self.value = float(value)

    def mul_add(self, a: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, None]:
        """``value·a + c`` and no side information."""
        return self.value * a + c, None

    def inverse(self, y: torch.Tensor, c: torch.Tensor, aux: torch.Tensor | None) -> torch.Tensor:
        """``(y − c) / value``."""
        return (y - c) / self.value


class RationalScale:
    """Exact multiplication of lattice integers by ``p/q``, keeping the remainder.

    Remainders (digits base ``q``) are packed ``digits`` to a byte, as many as ``q**k <=
    256`` allows: two for λ = 1/10, eight for 1/2, one for ``q > 16``.
    """

    def __init__(self, value: float) -> None:
        frac = Fraction(value).limit_denominator(MAX_DENOMINATOR)
        self.p, self.q = frac.numerator, frac.denominator
        self.value = self.p / self.q
        self.digits = 1
        while self.q > 1 and self.q ** (self.digits + 1) <= 256:
            self.digits += 1

    def mul_add(self, a: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``floor(a·p/q) + c`` and the packed remainders ``a·p mod q`` (None if q = 1)."""
        t = a * self.p if self.p != 1 else a
        if self.q == 1:
            return t + c, None
        whole = torch.div(t, self.q, rounding_mode="floor")
        remainder = torch.sub(t, whole, alpha=self.q)
        return whole.add_(c), self._pack(remainder)

    def inverse(self, y: torch.Tensor, c: torch.Tensor, aux: torch.Tensor | None) -> torch.Tensor:
        """The exact ``a`` of :meth:`mul_add`."""
        t = y - c
        if self.q != 1:
            t.mul_(self.q).add_(self._unpack(aux, t))
        return torch.div(t, self.p, rounding_mode="floor") if self.p != 1 else t

    def _pack(self, remainder: torch.Tensor) -> torch.Tensor:
        """uint8 bytes of ``digits`` base-``q`` digits each (the flat tensor, zero-padded)."""
        if self.digits == 1:
            return remainder.to(torch.uint8)
        flat = remainder.reshape(-1)
        pad = -flat.numel() % self.digits
        if pad:
            flat = torch.cat([flat, flat.new_zeros(pad)])
        cols = flat.view(-1, self.digits)
        packed = cols[:, -1].clone()
        for j in range(self.digits - 2, -1, -1):  # Horner: d0 + q·(d1 + q·(d2 + ...))
            packed.mul_(self.q).add_(cols[:, j])
        return packed.to(torch.uint8)

    def _unpack(self, packed: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """The remainders of :meth:`_pack`, shaped as ``like`` (int64)."""
        if self.digits == 1:
            return packed.to(torch.int64)
        rest = packed.to(torch.int64)
        cols = torch.empty(rest.numel(), self.digits, dtype=torch.int64, device=rest.device)
        for j in range(self.digits):
            cols[:, j] = rest % self.q
            rest = rest.div_(self.q, rounding_mode="floor")
        return cols.view(-1)[: like.numel()].view(like.shape)


class FloatStreams:
    """Streams as plain floats of ``dtype``."""

    exact = False

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Stream state of a float tensor."""
        return x.to(self.dtype)

    def decode(self, state: torch.Tensor) -> torch.Tensor:
        """Float value of a state (the stream dtype)."""
        return state

    def quantize(self, value: torch.Tensor, check: bool = True) -> torch.Tensor:
        """State of a block output (already in the stream dtype)."""
        return value

    def scale(self, value: float) -> FloatScale:
        """Multiplier for λ or β."""
        return FloatScale(value)

    def check(self) -> None:
        """Nothing to check."""


class LatticeStreams:
    """Streams as int64 multiples of ``2**-bits``, read as fp64 (exactly invertible)."""

    exact = True
    dtype = torch.float64

    def __init__(self, bits: int = 32, limit_bits: int = 22) -> None:
        self.bits = bits
        self.limit = float(2**limit_bits)
        self._extremes: list[torch.Tensor] = []

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Nearest lattice point of ``x``."""
        return self.quantize(x)

    def decode(self, state: torch.Tensor) -> torch.Tensor:
        """The fp64 value of a lattice state (exact below 2**53 lattice units)."""
        return state.to(torch.float64).mul_(2.0**-self.bits)

    def quantize(self, value: torch.Tensor, check: bool = True) -> torch.Tensor:
        """Round a block output onto the lattice (deterministic, so recomputes agree).

        ``check``: record its range for :meth:`check` (off for the backward's recompute of
        a value the forward already checked).
        """
        v = value.to(torch.float64)
        if check and v.numel():
            # One pass for the range check; NaN propagates through min/max.
            self._extremes.append(torch.stack(torch.aminmax(v)))
        return (v * 2.0**self.bits).round_().to(torch.int64)

    def scale(self, value: float) -> RationalScale:
        """Exact rational multiplier for λ or β."""
        return RationalScale(value)

    def check(self) -> None:
        """Raise if any quantized value was non-finite or outside the fixed-point range."""
        extremes, self._extremes = self._extremes, []
        if not extremes:
            return
        low, high = torch.stack(extremes).abs().max(0).values.tolist()
        if not (low < self.limit and high < self.limit):  # False for NaN
            raise FloatingPointError(
                f"reversible: a hidden value is non-finite or beyond ±{self.limit:g}, outside "
                "the exact fp64 streams' range; use --rev_exact false"
            )


def streams_for(stream: torch.dtype, exact: bool) -> FloatStreams | LatticeStreams:
    """The stream arithmetic for a stream dtype (exact lattice only for fp64)."""
    if stream == torch.float64 and exact:
        return LatticeStreams()
    return FloatStreams(stream)
