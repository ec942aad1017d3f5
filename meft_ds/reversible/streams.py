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

from meft_ds.reversible import fused

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
        """uint8 bytes of ``digits`` base-``q`` digits each.

        Digit ``i`` of a byte comes from the ``i``-th of ``digits`` equal chunks of the
        last dimension (as :func:`fused.pack`); if it does not divide, of the flat tensor
        zero-padded.
        """
        if self.digits == 1:
            return remainder.to(torch.uint8)
        if remainder.shape[-1] % self.digits == 0:
            return fused.pack(remainder, self.q, self.digits)
        flat = remainder.reshape(-1)
        pad = -flat.numel() % self.digits
        return fused.pack(torch.cat([flat, flat.new_zeros(pad)]), self.q, self.digits)

    def _unpack(self, packed: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """The remainders of :meth:`_pack`, shaped as ``like`` (int64)."""
        if self.digits == 1:
            return packed.to(torch.int64)
        rest = fused.unpack(packed, self.q, self.digits)
        if like.shape[-1] % self.digits == 0:
            return rest
        return rest[: like.numel()].view(like.shape)


class _Coupling:
    """One coupling's stream arithmetic, from the primitives every stream kind defines."""

    def quantize(self, value: torch.Tensor, check: bool = True) -> torch.Tensor:
        raise NotImplementedError  # pragma: no cover

    def couple(
        self, scale: FloatScale | RationalScale, a: torch.Tensor, value: torch.Tensor,
        base: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """State ``scale·(a − base) + value`` (``base`` optional) and what the inverse needs."""
        return scale.mul_add(a - base if base is not None else a, self.quantize(value))

    def uncouple(
        self, scale: FloatScale | RationalScale, y: torch.Tensor, value: torch.Tensor,
        aux: torch.Tensor | None, base: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The ``a`` of :meth:`couple` from its output and the same ``value`` and ``base``."""
        a = scale.inverse(y, self.quantize(value, check=False), aux)
        return a + base if base is not None else a


class FloatStreams(_Coupling):
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


class LatticeStreams(_Coupling):
    """Streams as int64 multiples of ``2**-bits``, read as fp64 (exactly invertible).

    ``fused``: run :meth:`couple` and :meth:`uncouple` as compiled kernels
    (:mod:`~meft_ds.reversible.fused`; bit-identical to the eager ops, which remain the
    fallback).
    """

    exact = True
    dtype = torch.float64

    def __init__(self, bits: int = 32, limit_bits: int = 22, fused: bool = False) -> None:
        self.bits = bits
        self.unit = 2.0**bits
        self.limit = float(2**limit_bits)
        self.fused = fused
        self._extremes: list[torch.Tensor] = []

    @property
    def extremes(self) -> tuple[torch.Tensor, ...]:
        """The ``(min, max)`` pairs recorded since the last :meth:`check` (read-only)."""
        return tuple(self._extremes)

    def _fusable(self, scale: RationalScale, *tensors: torch.Tensor | None) -> bool:
        first = tensors[0]
        return (
            self.fused and fused.enabled() and first.numel() > 0
            and first.shape[-1] % scale.digits == 0
            and all(t is None or t.shape == first.shape for t in tensors)
        )

    def couple(
        self, scale: RationalScale, a: torch.Tensor, value: torch.Tensor,
        base: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self._fusable(scale, a, value, base):
            out = fused.run_couple(a, value, base, scale.p, scale.q, scale.digits, self.unit)
            if out is not None:
                y, packed, extremes = out
                self._extremes.append(extremes)
                return y, packed
        return super().couple(scale, a, value, base)

    def uncouple(
        self, scale: RationalScale, y: torch.Tensor, value: torch.Tensor,
        aux: torch.Tensor | None, base: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self._fusable(scale, y, value, base):
            out = fused.run_uncouple(y, value, aux, base, scale.p, scale.q, scale.digits,
                                     self.unit)
            if out is not None:
                return out
        return super().uncouple(scale, y, value, aux, base)

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
        return (v * self.unit).round_().to(torch.int64)

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
                "the exact fp64 streams' range; use `rev_exact` false"
            )


def streams_for(
    stream: torch.dtype, exact: bool, fused: bool = False
) -> FloatStreams | LatticeStreams:
    """The stream arithmetic for a stream dtype (exact lattice only for fp64; ``fused``:
    its compiled kernels)."""
    if stream == torch.float64 and exact:
        return LatticeStreams(fused=fused)
    return FloatStreams(stream)
