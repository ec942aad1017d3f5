"""Sparse adapter parts in isolation: options, Key-Experts selection, row-sparse AdamW,
the adapter's output and gradients against a dense autograd reference."""

from __future__ import annotations

import argparse

import pytest
import torch

from meft_ds import options as opt
from meft_ds.errors import UserError
from meft_ds.reversible.replay import Replayable
from meft_ds.sparse import optim
from meft_ds.sparse.adapter import SparseAdapter
from meft_ds.sparse.optim import RowAdamW
from meft_ds.sparse.options import SparseOptions, resolve_sizes
from meft_ds.sparse.router import select_rows
from meft_ds.sparse.runtime import SparseRuntime


# --- options ---------------------------------------------------------------------------
@pytest.mark.unit
@pytest.mark.parametrize(
    "values, message",
    [
        ({"sparse_rank": 0}, "sparse_rank must be >= 1"),
        ({"sparse_top_k": -3}, "sparse_top_k must be >= 1"),
        ({"sparse_param_fraction": 0}, "sparse_param_fraction"),
        ({"layer_start": 4, "layer_end": 2}, "layer_end"),
        ({"sparse_lr_ratio": 0}, "sparse_lr_ratio"),
        ({"sparse_key_lr_ratio": 1.5}, "sparse_key_lr_ratio"),
        ({"sparse_router_lr_ratio": 0}, "sparse_router_lr_ratio"),
        ({"sparse_diagnostics": -1}, "sparse_diagnostics"),
        ({"sparse_beta2": 1.0}, "sparse_beta2"),
        ({"sparse_eps": 0}, "sparse_eps"),
        ({"sparse_weight_decay": -1}, "sparse_weight_decay"),
        ({"sparse_activation": "tanh"}, "sparse_activation"),
        ({"sparse_optimizer": "sgd"}, "sparse_optimizer"),
        ({"sparse_rank": "many"}, "not a valid int"),
    ],
)
def test_bad_options_are_user_errors(values, message):
    with pytest.raises(UserError, match=message):
        opt.build(SparseOptions, values, context="sparse")


@pytest.mark.unit
def test_options_are_cli_flags():
    parser = argparse.ArgumentParser()
    opt.add_dataclass_args(parser, SparseOptions, "sparse")
    args = parser.parse_args(
        ["--sparse_rank", "512", "--sparse_top_k", "16", "--sparse_activation", "silu"]
    )
    built = opt.build(SparseOptions, vars(args))
    assert (built.sparse_rank, built.sparse_top_k, built.sparse_activation) == (512, 16, "silu")
    assert built.sparse_experts is None


@pytest.mark.unit
def test_resolve_sizes_defaults_and_errors():
    base = SparseOptions()
    # 10% of a 1M-parameter model, 4 layers of width 64: ~195 rows -> 14 experts x 14.
    sizes = resolve_sizes(base, 64, range(4), 1_000_000)
    assert sizes.rank % sizes.num_experts == 0
    assert abs(sizes.rank - 195) < sizes.num_experts
    assert sizes.candidates >= 2 * base.sparse_top_k or sizes.experts_per_token == sizes.num_experts
    sizes = resolve_sizes(SparseOptions(sparse_rank=4096, sparse_top_k=64), 64, range(2), 1)
    assert (sizes.num_experts, sizes.rows_per_expert, sizes.experts_per_token) == (64, 64, 2)
    with pytest.raises(UserError, match="must divide"):
        resolve_sizes(SparseOptions(sparse_rank=100, sparse_experts=7), 64, range(2), 1)
    with pytest.raises(UserError, match="top_k"):
        resolve_sizes(SparseOptions(sparse_rank=64, sparse_experts=8, sparse_experts_per_token=1,
                                    sparse_top_k=16), 64, range(2), 1)
    with pytest.raises(UserError, match="exceeds sparse_experts"):
        resolve_sizes(SparseOptions(sparse_rank=64, sparse_experts=8, sparse_experts_per_token=9),
                      64, range(2), 1)


# --- selection -------------------------------------------------------------------------
@pytest.mark.unit
def test_select_rows_matches_brute_force():
    gen = torch.Generator().manual_seed(1)
    r, n, d, t, e, k = 96, 8, 16, 40, 3, 10
    m = r // n
    weight = torch.randn(r, 2 * d, generator=gen)
    keys = weight[:, :d]  # strided view, as in the store
    hidden = torch.randn(t, d, generator=gen)
    experts = torch.stack([torch.randperm(n, generator=gen)[:e] for _ in range(t)])
    sel = select_rows(keys, hidden, experts, n, k)
    assert torch.equal(sel.rows, torch.unique(sel.rows))
    chosen = sel.rows[sel.local]  # [t, k] global row ids
    for token in range(t):
        candidates = torch.cat([torch.arange(x * m, (x + 1) * m) for x in experts[token]])
        scores = hidden[token] @ keys[candidates].t()
        expected = set(candidates[scores.topk(k).indices].tolist())
        assert set(chosen[token].tolist()) == expected
        # slot points at the expert that owns each row
        assert torch.equal(experts[token][sel.slot[token]], chosen[token] // m)
    assert set(sel.rows.tolist()) == set(chosen.flatten().tolist())


# --- row-sparse AdamW ------------------------------------------------------------------
def _row_adamw_against_torch(backend: str, selections: list[torch.Tensor], rows: int = 12,
                             width: int = 40, key_lr_ratio: float = 1.0) -> None:
    """RowAdamW over ``selections`` (one tensor of unique rows per step) equals one
    ``torch.optim.AdamW`` per row stepped only when selected; unselected rows stay as is.
    With ``key_lr_ratio``, a row's first half (its key) is a param group at that lr ratio."""
    gen = torch.Generator().manual_seed(0)
    lr, wd, half = 1e-2, 0.1, width // 2
    weight = torch.randn(rows, width, generator=gen)
    m, v = torch.zeros_like(weight), torch.zeros_like(weight)
    steps = torch.zeros(rows, dtype=torch.int64)
    reference = [(torch.nn.Parameter(weight[i, :half].clone()),
                  torch.nn.Parameter(weight[i, half:].clone())) for i in range(rows)]
    ref_opt = [torch.optim.AdamW([{"params": [k], "lr": lr * key_lr_ratio}, {"params": [val]}],
                                 lr=lr, weight_decay=wd) for k, val in reference]
    optimizer = RowAdamW(backend, weight_decay=wd, key_lr_ratio=key_lr_ratio, key_width=half)
    keys_at_start = weight[:, :half].clone()
    for chosen in selections:
        grad = torch.randn(len(chosen), width, generator=gen)
        before = weight.clone(), m.clone(), v.clone()
        optimizer.step(weight, m, v, steps, chosen, grad, lr)
        for j, i in enumerate(chosen.tolist()):
            reference[i][0].grad = grad[j, :half].clone()
            reference[i][1].grad = grad[j, half:].clone()
            ref_opt[i].step()
        untouched = torch.ones(rows, dtype=torch.bool)
        untouched[chosen] = False
        for now, was in zip((weight, m, v), before):
            assert torch.equal(now[untouched], was[untouched]), "lazy rows must not change"
    expected = torch.stack([torch.cat([k.detach(), val.detach()]) for k, val in reference])
    torch.testing.assert_close(weight, expected, rtol=1e-5, atol=1e-6)
    if key_lr_ratio == 0:
        assert torch.equal(weight[:, :half], keys_at_start), "frozen keys must not move"
    for i in range(rows):
        states = [ref_opt[i].state.get(p, {}) for p in reference[i]]
        assert int(steps[i]) == int(states[0].get("step", 0))
        if states[0]:
            torch.testing.assert_close(m[i], torch.cat([s["exp_avg"] for s in states]),
                                       rtol=1e-4, atol=1e-7)
            torch.testing.assert_close(v[i], torch.cat([s["exp_avg_sq"] for s in states]),
                                       rtol=1e-4, atol=1e-9)


# backend, thresholds of meft_ds.sparse.optim, torch's thread count (the op splits rows
# over it; None: as set)
ROW_ADAMW_MODES = {
    "torch": ("torch", {}, None),
    "cpu_adam": ("cpu_adam", {}, None),
    "cpu_adam_threads": ("cpu_adam", {"PARALLEL_MIN_ELEMENTS": 0}, 2),  # rows over threads
}


@pytest.fixture(params=list(ROW_ADAMW_MODES))
def row_adamw_backend(request, monkeypatch) -> str:
    backend, thresholds, threads = ROW_ADAMW_MODES[request.param]
    for name, value in thresholds.items():
        monkeypatch.setattr(optim, name, value)
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    yield backend
    torch.set_num_threads(before)


@pytest.mark.unit
def test_row_adamw_matches_torch_adamw_per_row(row_adamw_backend):
    gen = torch.Generator().manual_seed(1)
    selections = [torch.sort(torch.randperm(12, generator=gen)[:5]).values for _ in range(6)]
    _row_adamw_against_torch(row_adamw_backend, selections)


# Unsorted rows, consecutive rows at one and at different step counts, single rows.
MIXED_SELECTIONS = [
    [0, 1, 2, 3, 7, 8], [3, 2, 1, 9, 8], list(range(12)), [11, 4, 5, 6, 0], [5],
    [10, 11, 0, 1], [6, 7, 8, 9, 10, 11, 2], [1, 0, 3, 4, 5],
]


@pytest.mark.unit
@pytest.mark.parametrize("width", [40, 1157])  # kernel's SIMD tails; a wide row
def test_row_adamw_unsorted_rows_mixed_step_counts(row_adamw_backend, width):
    selections = [torch.tensor(s) for s in MIXED_SELECTIONS]
    _row_adamw_against_torch(row_adamw_backend, selections, width=width)


@pytest.mark.unit
@pytest.mark.parametrize("ratio", [0.0, 0.1])
def test_row_adamw_key_lr_ratio_is_a_key_param_group_at_that_rate(row_adamw_backend, ratio):
    selections = [torch.tensor(s) for s in MIXED_SELECTIONS]
    _row_adamw_against_torch(row_adamw_backend, selections, width=40, key_lr_ratio=ratio)


@pytest.mark.unit
def test_row_adamw_step_bias_correction_is_sparse_adam(row_adamw_backend):
    """``--sparse_bias_correction step``: the rows move as ``torch.optim.SparseAdam`` moves
    the whole store (moments of the selected rows only, bias correction by the step
    number), which differs from the lazy per-row rule once rows skip steps."""
    gen = torch.Generator().manual_seed(5)
    rows, width, lr = 12, 40, 1e-2
    start = torch.randn(rows, width, generator=gen)
    grads = [torch.randn(len(s), width, generator=gen) for s in MIXED_SELECTIONS]
    param = torch.nn.Parameter(start.clone())
    reference = torch.optim.SparseAdam([param], lr=lr, eps=1e-8)
    results = {}
    for rule in ("step", "row"):
        weight, steps = start.clone(), torch.zeros(rows, dtype=torch.int64)
        m, v = torch.zeros_like(weight), torch.zeros_like(weight)
        taken = [0]
        optimizer = RowAdamW(row_adamw_backend,
                             bias_step=(lambda t=taken: t[0] + 1) if rule == "step" else None)
        for chosen, grad in zip(MIXED_SELECTIONS, grads):
            optimizer.step(weight, m, v, steps, torch.tensor(chosen), grad, lr)
            taken[0] += 1
            if rule == "step":
                param.grad = torch.sparse_coo_tensor(torch.tensor([chosen]), grad, (rows, width))
                reference.step()
        results[rule] = weight
        if rule == "step":  # a row's entry: the step of its last update
            assert steps[11].item() == 7 and steps[1].item() == 8 and steps[10].item() == 7
    torch.testing.assert_close(results["step"], param.detach(), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(results["row"], results["step"], rtol=1e-3, atol=1e-4)


@pytest.mark.unit
def test_row_adamw_step_bias_correction_on_resident_rows():
    """The hot-row cache's update follows the same rule as the store's."""
    gen = torch.Generator().manual_seed(4)
    weight, grad = torch.randn(6, 8, generator=gen), torch.randn(3, 8, generator=gen)
    slots = torch.tensor([4, 0, 2])
    optimizer = RowAdamW("torch", bias_step=lambda: 9)
    outs = []
    for resident in (True, False):
        w, m, v = weight.clone(), torch.zeros_like(weight), torch.zeros_like(weight)
        steps = torch.tensor([3, 0, 1, 7, 2, 5])
        update = optimizer.step_resident if resident else optimizer.step
        update(w, m, v, steps, slots, grad, 1e-2)
        assert steps.tolist() == [9, 0, 9, 7, 9, 5]
        outs.append(w)
    torch.testing.assert_close(outs[0], outs[1])


@pytest.mark.unit
def test_row_adamw_key_lr_ratio_on_resident_rows():
    """The hot-row cache's update scales the key step the same way."""
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(6, 8, generator=gen)
    grad = torch.randn(3, 8, generator=gen)
    slots = torch.tensor([4, 0, 2])
    results = {}
    for ratio in (1.0, 0.25):
        w, m, v = weight.clone(), torch.zeros_like(weight), torch.zeros_like(weight)
        RowAdamW("torch", key_lr_ratio=ratio, key_width=4).step_resident(
            w, m, v, torch.zeros(6, dtype=torch.int64), slots, grad, 1e-2)
        results[ratio] = w
    step = results[1.0] - weight
    torch.testing.assert_close(results[0.25][:, :4] - weight[:, :4], 0.25 * step[:, :4])
    assert torch.equal(results[0.25][:, 4:], results[1.0][:, 4:])


@pytest.mark.integration
@pytest.mark.parametrize("width", [40, 1157, 8240])  # scalar, span-4 and span-8 tails
def test_row_op_equals_deepspeed_cpu_adam_bit_for_bit(width):
    """The in-place row op (span 4) gives exactly what DeepSpeed's own ``adam_update``
    (span 8) gives on each row as its own tensor, at several step counts. (Per row: in one
    call over gathered rows, which elements fall in the kernel's scalar tail depends on
    the layout, and the scalar tail rounds differently.)"""
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    gen = torch.Generator().manual_seed(2)
    lr, betas, eps, wd = 1e-2, (0.9, 0.999), 1e-8, 0.1
    rows = torch.tensor([7, 1, 12, 3, 4])
    store = [torch.randn(16, width, generator=gen) * s for s in (1.0, 0.1, 0.01)]
    store[2].abs_()
    holder = torch.nn.Parameter(torch.zeros(1))
    ds = DeepSpeedCPUAdam([holder], lr=lr, betas=betas, eps=eps, weight_decay=wd)
    for step in (1, 2, 7):
        grad = torch.randn(len(rows), width, generator=gen)
        expected = [t.index_select(0, rows) for t in store]
        for j in range(len(rows)):
            kernel = DeepSpeedCPUAdam.optimizer_id
            DeepSpeedCPUAdam.optimizer_id += 1
            ds.ds_opt_adam.create_adam(kernel, lr, *betas, eps, wd, True, False)
            ds.ds_opt_adam.adam_update(kernel, step, lr, *betas, eps, wd, True,
                                       *(t[j] for t in (expected[0], grad, *expected[1:])))
        steps = torch.full((16,), step - 1, dtype=torch.int64)
        RowAdamW("cpu_adam", betas=betas, eps=eps, weight_decay=wd).step(
            *store, steps, rows, grad, lr)
        for got, want in zip(store, expected):
            assert torch.equal(got.index_select(0, rows), want)


@pytest.mark.unit
def test_row_op_threads_from_a_worker_thread_equal_one_thread(monkeypatch):
    """The op's OpenMP region started from a Python worker thread (as the eager update and
    the prefetcher do), rows split over two threads, gives what one thread gives."""
    from concurrent.futures import ThreadPoolExecutor

    gen = torch.Generator().manual_seed(3)
    rows, width = torch.tensor([9, 0, 33, 4, 17, 21, 2]), 1157
    base = [torch.randn(40, width, generator=gen) * s for s in (1.0, 0.1, 0.01)]
    base[2].abs_()
    grads = [torch.randn(len(rows), width, generator=gen) for _ in range(3)]

    def run(threads: int, in_worker: bool) -> list[torch.Tensor]:
        store, steps = [t.clone() for t in base], torch.zeros(40, dtype=torch.int64)
        optimizer = RowAdamW("cpu_adam", weight_decay=0.1)

        def steps_() -> None:
            torch.set_num_threads(threads)
            for grad in grads:
                optimizer.step(*store, steps, rows, grad, 1e-2)

        if in_worker:
            with ThreadPoolExecutor(1) as pool:
                pool.submit(steps_).result()
        else:
            steps_()
        assert steps[rows].tolist() == [3] * len(rows) and int(steps.sum()) == 3 * len(rows)
        return store

    before = torch.get_num_threads()
    monkeypatch.setattr(optim, "PARALLEL_MIN_ELEMENTS", 0)
    try:
        want = run(1, in_worker=False)
        for got in (run(2, in_worker=True), run(2, in_worker=False)):
            assert all(torch.equal(a, b) for a, b in zip(got, want))
    finally:
        torch.set_num_threads(before)


@pytest.mark.unit
def test_row_adamw_cpu_adam_refuses_tensors_it_cannot_update_in_place():
    optimizer = RowAdamW("cpu_adam")
    store = torch.zeros(40, 12).t()  # [12, 40], not contiguous
    m, v = torch.zeros(12, 40), torch.zeros(12, 40)
    steps = torch.zeros(12, dtype=torch.int64)
    with pytest.raises(ValueError, match="contiguous"):
        optimizer.step(store, m, v, steps, torch.tensor([1, 2]), torch.ones(2, 40), 1e-2)
    with pytest.raises(ValueError, match="grad"):
        optimizer.step(m, store.contiguous(), v, steps, torch.tensor([1]), torch.ones(2, 40), 1)
    # the op counts steps itself: a bad row index anywhere leaves every count as it was
    with pytest.raises(RuntimeError, match="out of range"):
        optimizer.step(m, store.contiguous(), v, steps, torch.tensor([1, 12]), torch.ones(2, 40), 1)
    with pytest.raises(RuntimeError, match="one per store row"):
        optimizer.step(m, store.contiguous(), v, steps[:5], torch.tensor([1]), torch.ones(1, 40), 1)
    assert not steps.any(), "a refused step must not count"


# --- adapter against a dense reference ---------------------------------------------------
def _runtime(rank=64, experts=8, per_token=2, top_k=6, hidden=16, activation="relu",
             router_ratio=1.0):
    options = SparseOptions(
        sparse_rank=rank, sparse_experts=experts, sparse_experts_per_token=per_token,
        sparse_top_k=top_k, sparse_router_lr_ratio=router_ratio,
        sparse_activation=activation, sparse_optimizer="torch",
        sparse_route="token",  # the mechanics on bare [N, d] inputs: no sequences to average
    )
    sizes = resolve_sizes(options, hidden, range(1), 1)
    return SparseRuntime(options, sizes)


@pytest.mark.unit
@pytest.mark.parametrize("activation, router_ratio", [("relu", 1.0), ("silu", 1.0),
                                                      ("relu", 10.0)])
def test_adapter_output_and_grads_match_dense_reference(activation, router_ratio):
    torch.manual_seed(0)
    runtime = _runtime(activation=activation, router_ratio=router_ratio)
    sizes = runtime.sizes
    store = runtime.store.layers[0]
    store.weight[:, sizes.hidden :].normal_()  # nonzero values
    adapter = SparseAdapter(runtime, 0).train()
    x = torch.randn(3, 5, sizes.hidden, requires_grad=True)
    runtime.begin_micro_batch(None)
    out = adapter(x)
    target = torch.randn_like(out)
    (out * target).sum().backward()

    # Dense reference: the full store as a parameter, each token's K rows masked in.
    flat = x.detach().reshape(-1, sizes.hidden).clone().requires_grad_(True)
    full = store.weight.clone().requires_grad_(True)
    router = adapter.router.weight.detach().clone().requires_grad_(True)
    logits = router_ratio * (flat @ router.t())
    experts = logits.topk(sizes.experts_per_token, dim=-1).indices
    probs = torch.softmax(logits, dim=-1)
    sel = select_rows(store.weight[:, : sizes.hidden], flat.detach(), experts,
                      sizes.num_experts, sizes.top_k)
    chosen = sel.rows[sel.local]
    gate = torch.zeros(flat.shape[0], sizes.rank).scatter(
        1, chosen, (probs.gather(1, experts) * sizes.num_experts / sizes.experts_per_token)
        .gather(1, sel.slot))
    act = {"relu": torch.relu, "silu": torch.nn.functional.silu}[activation]
    ref = (act(flat @ full[:, : sizes.hidden].t()) * gate) @ full[:, sizes.hidden :]
    (ref * target.reshape(ref.shape)).sum().backward()

    torch.testing.assert_close(out.reshape(ref.shape), ref.detach())
    torch.testing.assert_close(x.grad.reshape(ref.shape), flat.grad)
    torch.testing.assert_close(adapter.router.weight.grad, router.grad)
    (rows, grad), = runtime.grads().values()
    dense_grad = torch.zeros_like(full).index_copy(0, rows, grad)
    torch.testing.assert_close(dense_grad, full.grad)
    # only the working set came back, and every other row got exactly zero
    assert torch.equal(rows, sel.rows)
    outside = torch.ones(sizes.rank, dtype=torch.bool)
    outside[rows] = False
    assert full.grad[outside].abs().max() == 0


@pytest.mark.unit
def test_padding_tokens_select_no_rows_and_do_not_change_real_tokens():
    torch.manual_seed(0)
    runtime = _runtime()
    runtime.store.layers[0].weight[:, runtime.sizes.hidden :].normal_()
    adapter = SparseAdapter(runtime, 0).train()
    x = torch.randn(2, 6, runtime.sizes.hidden)
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, 2:] = 0
    with torch.no_grad():
        runtime.begin_micro_batch(None)
        full = adapter(x)
        runtime.begin_micro_batch(mask)
        masked = adapter(x)
    real = mask.bool()
    torch.testing.assert_close(masked[real], full[real])
    assert masked[~real].abs().max() == 0
    assert adapter.decision.selection.local.shape[0] == int(real.sum())


@pytest.mark.unit
def test_selection_is_reused_within_a_micro_batch_only():
    runtime = _runtime()
    adapter = SparseAdapter(runtime, 0).train()
    x = torch.randn(4, runtime.sizes.hidden)
    runtime.begin_micro_batch(None)
    adapter(x)
    first = adapter.decision
    adapter(x + 1.0)  # a recomputation of the same micro-batch: same rows, same tensors
    assert adapter.decision is first
    runtime.begin_micro_batch(None)
    adapter(x)
    assert adapter.decision is not first
    adapter.eval()
    runtime.begin_micro_batch(None)
    cached = adapter.decision
    adapter(x)
    assert adapter.decision is cached, "eval calls (generation) never use the cache"


@pytest.mark.unit
def test_coalesce_sums_micro_batches_and_survives_repeated_calls():
    runtime = _runtime()
    store = runtime.store
    width = 2 * runtime.sizes.hidden
    g1, g2 = torch.ones(3, width), 2 * torch.ones(2, width)
    store.add_grad(0, torch.tensor([1, 4, 7]), g1)
    store.add_grad(0, torch.tensor([4, 9]), g2)
    (rows, grad), = store.coalesce().values()
    assert rows.tolist() == [1, 4, 7, 9]
    assert grad[:, 0].tolist() == [1.0, 3.0, 1.0, 2.0]
    store.add_grad(0, torch.tensor([9]), torch.ones(1, width))  # a later micro-batch
    (rows, grad), = store.coalesce().values()
    assert rows.tolist() == [1, 4, 7, 9] and grad[:, 0].tolist() == [1.0, 3.0, 1.0, 3.0]
    store.clear_grads()
    (rows, grad), = store.coalesce().values()
    assert rows.numel() == 0 and grad.shape == (0, width)


@pytest.mark.unit
def test_no_grad_pass_then_grad_recompute_fetches_once():
    runtime = _runtime()
    runtime.store.layers[0].weight[:, runtime.sizes.hidden :].normal_()
    adapter = SparseAdapter(runtime, 0).train()
    x = torch.randn(5, runtime.sizes.hidden)
    runtime.begin_micro_batch(None)
    with torch.no_grad():
        first = adapter(x)
    again = adapter(x)  # the recomputation with grad (activation checkpointing)
    torch.testing.assert_close(again, first)
    again.sum().backward()
    (rows, grad), = runtime.grads().values()
    assert rows.numel() > 0 and grad.abs().sum() > 0
    runtime.step(1e-3)
    assert runtime.metrics()["sparse_rows_moved"] == rows.numel()


@pytest.mark.unit
def test_reversible_capture_replay_and_autograd_grad_reach_the_store():
    """The reversible backward's pattern: a no-grad forward recorded with rev_capture,
    then a replay on a slightly different input under torch.autograd.grad that asks
    only for the input's and the parameters' gradients."""
    torch.manual_seed(0)
    runtime = _runtime()
    runtime.store.layers[0].weight[:, runtime.sizes.hidden :].normal_()
    adapter = SparseAdapter(runtime, 0).train()
    x = torch.randn(6, runtime.sizes.hidden)
    runtime.begin_micro_batch(None)
    record = adapter.rev_capture()
    with torch.no_grad():
        first = adapter(x)
    adapter.clear_cache()  # only the record may carry the decisions over
    leaf = (x + 1e-3 * torch.randn_like(x)).requires_grad_(True)
    with adapter.rev_replay(record):
        again = adapter(leaf)
        grads = torch.autograd.grad(again.sum(), [leaf, adapter.router.weight])
    assert record.decision is not None and adapter.replaying is None
    torch.testing.assert_close(again, first, rtol=0.0, atol=1e-2)
    assert all(g.abs().sum() > 0 for g in grads)
    (rows, grad), = runtime.grads().values()
    assert torch.equal(rows, record.decision.selection.rows) and grad.abs().sum() > 0
    runtime.step(1e-3)
    assert runtime.metrics()["sparse_rows_moved"] == rows.numel()


@pytest.mark.unit
def test_evaluation_traffic_is_not_counted_in_step_figures():
    runtime = _runtime()
    adapter = SparseAdapter(runtime, 0)
    x = torch.randn(4, runtime.sizes.hidden)
    adapter.eval()
    with torch.no_grad():
        adapter(x)
    adapter.train()
    runtime.begin_micro_batch(None)
    adapter(x).sum().backward()
    runtime.step(1e-3)
    assert runtime.metrics()["sparse_tokens"] == 4


@pytest.mark.unit
def test_capture_records_a_cached_decision_and_applies_to_one_call_only():
    runtime = _runtime()
    adapter = SparseAdapter(runtime, 0).train()
    x = torch.randn(4, runtime.sizes.hidden)
    runtime.begin_micro_batch(None)
    with torch.no_grad():
        adapter(x)
        record = adapter.rev_capture()
        adapter(x)  # served from this micro-batch's cache
    assert record.decision is adapter.decision
    later = adapter.rev_capture()
    with torch.no_grad():
        adapter(x[:0])  # no tokens: nothing decided, the capture is used up anyway
    assert later.decision is None and adapter.recording is None
    assert isinstance(adapter, Replayable)  # the reversible stack's replay contract


@pytest.mark.unit
def test_router_lr_ratio_starts_at_the_same_router_and_steps_ratio_times_as_far():
    """The logit multiplier leaves the initial routing as it was and makes one AdamW step
    move the effective router ``ratio`` times as far (Adam ignores the gradient's scale)."""
    torch.manual_seed(0)
    x = torch.randn(12, 16)
    moved, start = {}, {}
    for ratio in (1.0, 10.0):
        runtime = _runtime(router_ratio=ratio)
        adapter = SparseAdapter(runtime, 0)
        start[ratio] = adapter.route(x).detach()
        effective = adapter.router.weight.detach() * ratio
        optimizer = torch.optim.AdamW(adapter.router.parameters(), lr=1e-3, weight_decay=0.0)
        adapter.route(x).square().sum().backward()
        optimizer.step()
        moved[ratio] = adapter.router.weight.detach() * ratio - effective
    torch.testing.assert_close(start[10.0], start[1.0])
    torch.testing.assert_close(moved[10.0], 10 * moved[1.0], rtol=1e-4, atol=1e-9)
