"""``--sparse_prefetch``: rows selected from the attention input and fetched on a worker
thread while attention runs; recomputations never fetch again."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, tiny_llama

from meft_ds import cli, methods
from meft_ds import options as opt
from meft_ds.errors import UserError
from meft_ds.models import arch
from meft_ds.sparse.router import select_rows

# token routing: the expected selections are computed from each token's own input here
# (prefetch under context routing: tests/test_sparse_context.py)
SMALL = dict(sparse_rank=256, sparse_experts=16, sparse_top_k=8, sparse_optimizer="torch",
             sparse_route="token")


def _method(model, **values):
    cls = methods.get("sparse")
    options = opt.build(cls.Options, {**SMALL, **values}, context="sparse")
    method = cls(options, model.config)
    module = method.apply(model)
    for rows in method.runtime.store.layers.values():  # nonzero values
        rows.weight[:, 64:].normal_(generator=torch.Generator().manual_seed(1))
    return method, module


def _batch():
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    return ids, mask


def _loss(logits, ids, mask):
    labels = ids.masked_fill(mask == 0, -100)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                           labels[:, 1:].reshape(-1), ignore_index=-100)


@pytest.mark.unit
def test_rows_are_selected_from_the_attention_input():
    method, module = _method(tiny_llama(), sparse_prefetch=True)
    layers = arch.layers(module)
    inputs = {}
    for index, layer in enumerate(layers):
        layer.register_forward_pre_hook(
            lambda m, args, kwargs, i=index: inputs.__setitem__(i, args[0] if args
                                                                else kwargs["hidden_states"]),
            with_kwargs=True,
        )
    module.train()
    ids, mask = _batch()
    method.forward(module, ids, mask)
    sizes = method.runtime.sizes
    real = mask.reshape(-1).bool()
    for index, adapter in method.adapters.items():
        with torch.no_grad():
            x = layers[index].post_attention_layernorm(inputs[index]).reshape(-1, 64)[real]
            experts = adapter.route(x).topk(sizes.experts_per_token, dim=-1).indices
        keys = method.runtime.store.layers[index].weight[:, :64]
        expected = select_rows(keys, x, experts, sizes.num_experts, sizes.top_k)
        decision = adapter.decision
        assert torch.equal(decision.experts, experts)
        assert torch.equal(decision.selection.rows, expected.rows)
        assert torch.equal(decision.selection.local, expected.local)


def _train_once(prefetch: bool, decisions: dict | None = None):
    """One forward/backward; ``decisions``: force these (a layer -> Decision map)."""
    method, module = _method(tiny_llama(), sparse_prefetch=prefetch)
    module.train()
    ids, mask = _batch()
    if decisions is not None:
        runtime = method.runtime
        runtime.begin_micro_batch(mask)
        for index, adapter in method.adapters.items():
            decisions[index].generation = runtime.generation
            object.__setattr__(adapter, "_cache", decisions[index])
        runtime.begin_micro_batch = lambda mask, continuing=False: None  # keep injected decisions
    loss = _loss(method.forward(module, ids, mask), ids, mask)
    loss.backward()
    grads = {k: g.clone() for k, (_, g) in method.runtime.grads().items()}
    routers = [a.router.weight.grad.clone() for a in method.adapters.values()]
    taken = {i: a.decision for i, a in method.adapters.items()}
    return float(loss.detach()), grads, routers, taken


@pytest.mark.unit
def test_prefetch_trains_like_the_default_path_given_its_selection():
    """Same rows chosen -> same loss, router and row gradients: only the selection
    differs between the two orderings (forced equal here by giving the default path the
    prefetched decisions)."""
    l0, g0, r0, taken = _train_once(prefetch=True)
    l1, g1, r1, _ = _train_once(prefetch=False, decisions=taken)
    assert l0 == pytest.approx(l1, rel=1e-6)
    assert g0.keys() == g1.keys()
    for layer in g0:
        torch.testing.assert_close(g0[layer], g1[layer])
    for a, b in zip(r0, r1):
        torch.testing.assert_close(a, b)


@pytest.mark.unit
def test_checkpointed_recompute_does_not_prefetch_again_and_training_lowers_the_loss():
    method, module = _method(tiny_llama(), sparse_prefetch=True, sparse_cache_rows=32)
    module.activation_checkpointing_enable(
        activation_checkpointing_kwargs={"use_reentrant": False}
    )
    module.train()
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    ids, mask = _batch()
    losses = []
    for _ in range(8):
        loss = _loss(method.forward(module, ids, mask), ids, mask)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        method.after_engine_step(1e-2, 1.0)
        losses.append(float(loss.detach()))
        metrics = method.step_metrics()
        assert metrics["sparse_prefetched_layers"] == len(method.adapters)
        assert metrics["sparse_rows_updated"] > 0
    assert losses[-1] < losses[0]


@pytest.mark.unit
def test_evaluation_prefetches_every_call_without_counting():
    method, module = _method(tiny_llama(), sparse_prefetch=True)
    module.eval()
    ids, mask = _batch()
    with torch.no_grad():
        first = method.forward(module, ids, mask)
        again = method.forward(module, ids, mask)
    torch.testing.assert_close(first, again)
    assert all(a.pending is None for a in method.adapters.values())
    assert "prefetched_layers" not in method.runtime.counters.current


@pytest.mark.unit
def test_bad_prefetch_flags_are_one_line_errors(capsys):
    cpu = str(ROOT / "ds_configs" / "cpu.json")
    with pytest.raises(UserError, match="sparse_prefetch needs sparse_store replicated"):
        cli.parse(["--deepspeed", cpu, "--method", "sparse", "--sparse_prefetch",
                   "--sparse_store", "sharded"])
    with pytest.raises(SystemExit) as stop:
        cli.parse(["--deepspeed", cpu, "--method", "sparse", "--sparse_prefetch", "maybe"])
    errors = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert stop.value.code == 2 and len(errors) == 1 and "--sparse_prefetch" in errors[0]
    with pytest.raises(UserError, match="does not apply to method lora"):
        cli.parse(["--deepspeed", cpu, "--method", "lora", "--sparse_prefetch"])


@pytest.mark.unit
@pytest.mark.parametrize("variant", ["meft1", "meft3"])
def test_reversible_recompute_reuses_the_prefetched_rows(variant):
    """``--sparse_prefetch --reversible``: the backward's recomputation of each layer
    replays the prefetched rows; gradients equal plain autograd through the same net."""
    results = []
    for backward in ("autograd", "reversible"):
        method, module = _method(
            tiny_llama(), sparse_prefetch=True, reversible=True, rev_variant=variant,
            rev_backward=backward,
        )
        module.train()
        ids, mask = _batch()
        _loss(method.forward(module, ids, mask), ids, mask).backward()
        grads = {k: (r.clone(), g.clone()) for k, (r, g) in method.runtime.grads().items()}
        routers = [a.router.weight.grad.clone() for a in method.adapters.values()]
        method.after_engine_step(1e-3, 1.0)
        metrics = method.step_metrics()
        assert metrics["sparse_prefetched_layers"] == len(method.adapters)
        results.append((grads, routers, metrics["sparse_rows_moved"]))
    (g0, r0, moved0), (g1, r1, moved1) = results
    assert moved0 == moved1
    for layer, (rows, grad) in g0.items():
        assert rows.numel() > 0 and torch.equal(g1[layer][0], rows)
        torch.testing.assert_close(g1[layer][1], grad, rtol=1e-4, atol=1e-6)
    for a, b in zip(r0, r1):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
