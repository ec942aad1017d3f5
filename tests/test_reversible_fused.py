"""Fused (compiled) exact-stream kernels: bit-identical to the eager ops, exact, fall back."""

from __future__ import annotations

import copy
import logging

import pytest
import torch

from meft_ds.reversible import fused
from meft_ds.reversible.model import ReversibleLM
from meft_ds.reversible.options import ReversibleOptions
from meft_ds.reversible.streams import LatticeStreams
from tests.test_reversible import _grads, _perturb_adapters, _tiny

SCALES = (0.1, 1 / 3, 2.5)  # q = 10, 3, 2 (p = 1, 1, 5); each one more compilation


def _states(shape: tuple[int, ...], seed: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    lattice = LatticeStreams()
    a = lattice.quantize(torch.randn(shape, generator=gen, dtype=torch.float64) * 40)
    base = lattice.quantize(torch.randn(shape, generator=gen, dtype=torch.float64) * 40)
    value = torch.randn(shape, generator=gen, dtype=torch.float64) * 40
    return a, base, value


@pytest.mark.unit
@pytest.mark.parametrize("q", [1, 2, 3, 7, 10, 100, 255])
def test_floordiv_is_exact_over_the_int64_range(q: int) -> None:
    gen = torch.Generator().manual_seed(q)
    t = torch.randint(-2**62, 2**62, (4096,), generator=gen)
    t[:6] = torch.tensor([2**62, -2**62, -1, 0, 1, q * 12345 - 1])
    t[6:2000] //= 2**20  # small magnitudes too
    whole, remainder = fused.floordiv(t, q)
    assert torch.equal(whole, torch.div(t, q, rounding_mode="floor"))
    assert torch.equal(remainder, torch.remainder(t, q))


@pytest.mark.unit
def test_floor_division_is_exact_for_every_divisor_in_the_reciprocal_form() -> None:
    """Every q the options allow (1..255), exact multiples and their neighbours across the
    magnitudes the kernels see. The kernels compute ``x·(1/q)`` themselves, the form Inductor
    on CUDA rewrites ``x / q`` into, so this is the arithmetic a GPU runs; the naive floor
    of that form is wrong for some exact multiples (shown for q = 49), the kernels' is not."""
    k = torch.cat([torch.arange(0, 5000), torch.randint(0, 2**31 // 255, (5000,),
                                                        generator=torch.Generator().manual_seed(0))])
    naive_wrong = 0
    for q in range(1, 256):
        for scale in (1, 2**8):  # up to ~2^40 / q: the range floordiv's halves reach
            t = torch.cat([k * q * scale + d for d in (-1, 0, 1)] + [-(k * q * scale) - 1])
            whole, remainder = fused.floordiv(t, q)
            assert torch.equal(whole, torch.div(t, q, rounding_mode="floor")), q
            assert torch.equal(remainder, torch.remainder(t, q)), q
            if q == 49:
                x = (k * q * scale).to(torch.float64)
                naive_wrong += int((torch.floor(x * (1.0 / q)) != (k * scale).double()).sum())
        most = 1  # digits that fit a byte (q = 1 packs nothing: no remainders)
        while q > 1 and q ** (most + 1) <= 256:
            most += 1
        for digits in range(1, most + 1) if q > 1 else ():
            rem = torch.randint(0, q, (64 * digits,), generator=torch.Generator().manual_seed(q))
            rem[:digits] = q - 1  # the largest packed byte
            assert torch.equal(fused.unpack(fused.pack(rem, q, digits), q, digits), rem), q
    assert naive_wrong > 0


@pytest.mark.integration
@pytest.mark.parametrize("shape", [(2, 9, 60), (3, 5, 60), (2, 3, 7)])
def test_fused_couple_is_bit_identical_to_eager_and_exactly_invertible(shape) -> None:
    """(2, 3, 7): no digit count divides 7, so the fused streams fall back to eager ops."""
    a, base, value = _states(shape, seed=sum(shape))
    for scale_value in SCALES:
        for b in (None, base):
            eager, fast = LatticeStreams(fused=False), LatticeStreams(fused=True)
            scale = eager.scale(scale_value)
            y_e, aux_e = eager.couple(scale, a, value, b)
            y_f, aux_f = fast.couple(scale, a, value, b)
            assert torch.equal(y_e, y_f)
            assert (aux_e is None and aux_f is None) or torch.equal(aux_e, aux_f)
            assert torch.equal(torch.stack(eager.extremes), torch.stack(fast.extremes))
            assert torch.equal(fast.uncouple(scale, y_f, value, aux_f, b), a)
            assert torch.equal(eager.uncouple(scale, y_e, value, aux_e, b), a)
    assert fused.enabled()


@pytest.mark.integration
def test_fused_streams_give_the_same_gradients_as_eager_ones() -> None:
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    base = _tiny(6)
    grads = {}
    for fuse in (True, False):
        opts = ReversibleOptions(rev_variant="meft3", rev_fused=fuse, rev_adapter_size=8,
                                 rev_adapter_dropout=0.1)
        torch.manual_seed(0)  # same adapter initialisation
        model = ReversibleLM(copy.deepcopy(base), opts).train()
        _perturb_adapters(model)
        model.record_errors = True
        grads[fuse] = _grads(model, ids, reversible=True)
        assert max(model.last_run.errors.values()) == 0.0
    assert grads[True].keys() == grads[False].keys()
    assert all(torch.equal(grads[True][k], grads[False][k]) for k in grads[False])


@pytest.mark.unit
def test_a_compiler_failure_falls_back_to_eager_ops_with_one_warning(monkeypatch, caplog) -> None:
    def broken(name: str, key: tuple):
        raise RuntimeError("no compiler here\nsecond line")

    monkeypatch.setattr(fused, "_kernel", broken)
    monkeypatch.setitem(fused._state, "failed", False)
    a, base, value = _states((2, 4, 8), seed=3)
    fast, eager = LatticeStreams(fused=True), LatticeStreams(fused=False)
    scale = fast.scale(0.1)
    with caplog.at_level(logging.WARNING, logger=fused.__name__):
        y, aux = fast.couple(scale, a, value, base)
        again, _ = fast.couple(scale, a, value, base)
    assert not fused.enabled()
    assert torch.equal(y, eager.couple(scale, a, value, base)[0]) and torch.equal(y, again)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "RuntimeError: no compiler here" in warnings[0]


@pytest.mark.integration
def test_one_compilation_serves_every_row_count() -> None:
    """Rows (batch x sequence) are dynamic: padded batches of any length and generation
    steps reuse one compiled couple and one uncouple instead of recompiling per shape until
    Dynamo's cache limit (then falling back to eager ops without a word)."""
    from torch._dynamo.utils import counters

    eager, fast = LatticeStreams(fused=False), LatticeStreams(fused=True)
    scale = fast.scale(2 / 7)  # q = 7: constants no other test compiles
    graphs = lambda: counters["stats"]["unique_graphs"]  # noqa: E731
    start = graphs()
    for i, shape in enumerate([(2, 9, 60), (3, 5, 60), (4, 17, 60), (1, 30, 60), (7, 1, 60)]):
        a, base, value = _states(shape, seed=i)
        y, aux = fast.couple(scale, a, value, base)
        want_y, want_aux = eager.couple(eager.scale(2 / 7), a, value, base)
        assert torch.equal(y, want_y) and torch.equal(aux, want_aux)
        assert torch.equal(fast.uncouple(scale, y, value, aux, base), a)
        if i == 0:
            first = graphs() - start
    assert first == 2 and graphs() - start == 2, (first, graphs() - start)
    assert fused.enabled()
