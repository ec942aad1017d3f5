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
            assert torch.equal(torch.stack(eager._extremes), torch.stack(fast._extremes))
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
