"""The sparse adapter's hot-row cache and eager row update give the same training as
the plain path: same outputs, same rows, same Adam state, also across checkpoints."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_backward, tiny_sparse_engine

from meft_ds.sparse.adapter import SparseAdapter
from meft_ds.sparse.cache import cache_capacity
from meft_ds.sparse.options import SparseOptions, resolve_sizes
from meft_ds.sparse.runtime import SparseRuntime

# token routing: these adapters are called on bare [N, d] inputs, no sequences to average
SIZES = dict(sparse_rank=64, sparse_experts=8, sparse_experts_per_token=2, sparse_top_k=6,
             sparse_route="token")


def _runtime(backend: str, cache_rows: float, layers: int = 2) -> SparseRuntime:
    options = SparseOptions(**SIZES, sparse_optimizer=backend, sparse_cache_rows=cache_rows)
    return SparseRuntime(options, resolve_sizes(options, 16, range(layers), 1))


def _inputs(steps: int, micro: int, hidden: int = 16):
    """Per step and micro-batch: an input drawn around a few fixed centres (rows repeat
    across steps, the selection still changes) and a target."""
    gen = torch.Generator().manual_seed(7)
    centres = torch.randn(3, hidden, generator=gen)
    out = []
    for _ in range(steps):
        batch = []
        for _ in range(micro):
            pick = torch.randint(0, 3, (5,), generator=gen)
            x = centres[pick] + 0.5 * torch.randn(5, hidden, generator=gen)
            batch.append((x, torch.randn(5, hidden, generator=gen)))
        out.append(batch)
    return out


def _train(runtime: SparseRuntime, adapters, data, lr: float = 1e-2):
    outputs = []
    for batch in data:
        for x, target in batch:
            runtime.begin_micro_batch(None)
            h = x
            for adapter in adapters:  # a chain of layers: layer 1's input depends on layer 0
                h = h + adapter(h)
            outputs.append(h.detach().clone())
            (h * target).sum().backward()
        runtime.step(lr)
        for adapter in adapters:
            adapter.clear_cache()
    return outputs


def _adapters(runtime):
    return [SparseAdapter(runtime, layer).train() for layer in runtime.sizes.layers]


def _state(runtime):
    runtime.flush()
    return {
        layer: [t.clone() for t in (rows.weight, rows.exp_avg, rows.exp_avg_sq, rows.steps)]
        for layer, rows in runtime.store.layers.items()
    }


@pytest.mark.unit
def test_cache_capacity_setting():
    assert cache_capacity(0, 64) == 0
    assert cache_capacity(0.25, 64) == 16
    assert cache_capacity(10, 64) == 10
    assert cache_capacity(1000, 64) == 64


@pytest.mark.unit
@pytest.mark.parametrize("backend", ["torch", "cpu_adam"])
def test_cache_on_trains_exactly_like_cache_off(backend):
    data = _inputs(steps=6, micro=2)
    results = []
    for cache_rows in (0, 12):
        torch.manual_seed(0)
        runtime = _runtime(backend, cache_rows)
        adapters = _adapters(runtime)
        totals: dict[str, float] = {}
        outputs = []
        for step_batch in data:
            outputs += _train(runtime, adapters, [step_batch])
            for key, value in runtime.metrics().items():
                if not isinstance(value, list):
                    totals[key] = totals.get(key, 0.0) + value
            per_layer = runtime.metrics()["sparse_rows_per_layer"]
            assert len(per_layer) == 2 and all(n > 0 for n in per_layer)
        results.append((outputs, _state(runtime), totals))
    (out_off, state_off, m_off), (out_on, state_on, m_on) = results
    # the cache was used, rows were evicted, and it saved copies
    assert m_on["sparse_cache_hits"] > 0 and m_on["sparse_cache_evicted"] > 0
    assert m_on["sparse_rows_moved"] < m_off["sparse_rows_moved"]
    assert m_on["sparse_cache_hits"] + m_on["sparse_cache_misses"] == m_off["sparse_rows_moved"]
    assert m_on["sparse_rows_updated"] == m_off["sparse_rows_updated"]
    exact = backend == "torch"  # the same arithmetic on both sides: bit-identical
    for a, b in zip(out_off, out_on):
        if exact:
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    for layer in state_off:
        for a, b in zip(state_off[layer], state_on[layer]):
            if exact or a.dtype == torch.int64:
                assert torch.equal(a, b)
            else:
                torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


@pytest.mark.unit
def test_cache_flush_and_restore_resume_bit_exactly():
    """Save after 3 of 6 steps (flush + membership), load into a fresh runtime and go on:
    the same weights and moments as an uninterrupted run, with the cpu_adam backend
    (cached rows use torch arithmetic, so the split must be restored too)."""
    data = _inputs(steps=6, micro=1)
    straight = _runtime("cpu_adam", 12)
    _train(straight, _adapters(straight), data)
    expected = _state(straight)

    first = _runtime("cpu_adam", 12)
    _train(first, _adapters(first), data[:3])
    first.flush()
    store_state = {k: v for k, v in first.store.state_dict().items()}
    store_state["layers"] = {
        layer: {name: t.clone() for name, t in rows.items()}
        for layer, rows in store_state["layers"].items()
    }
    cache_state = first.cache_state()
    assert all(s["rows"].numel() > 0 for s in cache_state.values())

    second = _runtime("cpu_adam", 12)
    adapters = _adapters(second)
    second.store.load_state_dict(store_state)
    second.load_cache_state(cache_state)
    _train(second, adapters, data[3:])
    resumed = _state(second)
    for layer in expected:
        for a, b in zip(expected[layer], resumed[layer]):
            assert torch.equal(a, b)


# --- eager update under a real DeepSpeed engine ----------------------------------------
def _engine_run(eager: bool | None, clip: float, cache_rows: float, steps: int = 3,
                coef: float | None = None):
    """``coef``: the clip coefficient handed to the store (default: the trainer's, from
    the engine's norm and the rows')."""
    method, engine = tiny_sparse_engine(
        {"sparse_eager_update": eager, "sparse_cache_rows": cache_rows}, clip=clip)
    gen = torch.Generator().manual_seed(3)
    metrics = []
    for _ in range(steps):
        for _ in range(2):
            ids = torch.randint(0, 128, (2, 12), generator=gen)
            mask = torch.ones_like(ids)
            mask[1, 9:] = 0
            tiny_backward(method, engine, ids, mask)
            lr = engine.get_lr()[0]
            engine.step()
        norm = method.external_grad_sq_norm()
        assert norm > 0
        if coef is None:
            total = (float(engine.get_global_grad_norm() or 0.0) ** 2 + norm) ** 0.5
            step_coef = min(1.0, clip / (total + 1e-6)) if clip > 0 else 1.0
        else:
            step_coef = coef
        method.after_engine_step(lr, step_coef)
        metrics.append(method.step_metrics())
    return _state(method.runtime), metrics


def _assert_same_store(*states) -> None:
    for layer in states[0]:
        for tensors in zip(*(state[layer] for state in states)):
            assert all(torch.equal(tensors[0], t) for t in tensors[1:])


@pytest.mark.unit
def test_eager_row_update_equals_the_end_of_step_update():
    reference, m_ref = _engine_run(eager=False, clip=0.0, cache_rows=0)
    eager, m_eager = _engine_run(eager=True, clip=0.0, cache_rows=0)
    assert all(m["sparse_eager_layers"] == 3 for m in m_eager)
    assert all(m["sparse_eager_backup_bytes"] == 0 for m in m_eager)  # no copy: not speculative
    assert all(m.get("sparse_eager_layers", 0) == 0 for m in m_ref)
    _, m_unset = _engine_run(eager=None, clip=0.0, cache_rows=0, steps=1)
    assert "sparse_eager_layers" not in m_unset[0]  # unset: off where the model runs on CPU
    both, m_both = _engine_run(eager=True, clip=0.0, cache_rows=16)
    assert sum(m["sparse_cache_hits"] for m in m_both) > 0
    _assert_same_store(reference, eager, both)


@pytest.mark.unit
@pytest.mark.parametrize("clip, coef", [(1e9, 1.0), (1e9, 0.37), (1e-9, None)])
def test_speculative_eager_update_under_clipping_equals_the_end_of_step_update(clip, coef):
    """Clipping on: a step that does not clip keeps the speculative updates; one that
    clips (coefficient 0.37) rolls them back and updates again with the clipped gradient;
    a limit the first layer's rows already exceed defers every layer to the step."""
    reference, _ = _engine_run(eager=False, clip=clip, cache_rows=0, coef=coef)
    eager, metrics = _engine_run(eager=True, clip=clip, cache_rows=0, coef=coef)
    _assert_same_store(reference, eager)
    for m in metrics:
        if clip < 1e-3:  # the clip is certain from the first layer on
            assert m["sparse_eager_layers_deferred"] == 3 and m["sparse_eager_layers"] == 0
            assert m["sparse_eager_backup_bytes"] == 0
            continue
        assert m["sparse_eager_layers"] == 3 and m["sparse_eager_backup_bytes"] > 0
        assert m["sparse_eager_layers_redone"] == (3 if coef < 1.0 else 0)
        assert m["sparse_rows_updated"] > 0


@pytest.mark.unit
def test_a_skipped_step_rolls_the_speculative_updates_back():
    """As the end-of-step path, a skipped step (fp16 overflow, a non-finite gradient)
    leaves every row as it was: weights, moments and step counts."""
    runtime = _runtime("torch", 0.0)
    before = _state(runtime)
    runtime.eager.arm(1e-2, clip=1e9)
    for layer in runtime.store.layers:
        rows = torch.tensor([1, 5, 9])
        runtime.add_row_grad(layer, rows, torch.randn(3, 32))
    runtime.grad_sq_norm()
    runtime.step(1e-2, 1.0, skip=True)
    _assert_same_store(before, _state(runtime))
    assert runtime.metrics()["sparse_eager_layers_redone"] == 2
