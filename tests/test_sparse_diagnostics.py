"""The sparse adapter's usage diagnostics (meft_ds.sparse.diagnostics) count what the
adapter really selected."""

from __future__ import annotations

import math

import pytest
import torch

from meft_ds.sparse.adapter import SparseAdapter
from meft_ds.sparse.diagnostics import Usage, normalised_entropy, summarise, top_share
from meft_ds.sparse.options import SparseOptions, resolve_sizes
from meft_ds.sparse.runtime import SparseRuntime


@pytest.mark.unit
def test_entropy_and_top_share():
    assert normalised_entropy(torch.tensor([5, 5, 5, 5])) == pytest.approx(1.0)
    assert normalised_entropy(torch.tensor([7, 0, 0, 0])) == 0.0
    assert normalised_entropy(torch.zeros(4)) == 0.0
    two = normalised_entropy(torch.tensor([1, 1, 0, 0]))
    assert two == pytest.approx(math.log(2) / math.log(4))
    counts = torch.cat([torch.tensor([50]), torch.ones(199, dtype=torch.int64)])
    assert top_share(counts) == pytest.approx((50 + 1) / 249)  # 1% of 200 rows = 2 rows
    assert top_share(torch.zeros(10)) == 0.0


def _runtime(key_lr_ratio: float = 0.0) -> SparseRuntime:
    options = SparseOptions(sparse_rank=64, sparse_experts=8, sparse_experts_per_token=2,
                            sparse_top_k=6, sparse_optimizer="torch",
                            sparse_key_lr_ratio=key_lr_ratio)
    runtime = SparseRuntime(options, resolve_sizes(options, 16, range(2), 1))
    runtime.usage = Usage(runtime.sizes)
    return runtime


@pytest.mark.unit
def test_usage_counts_every_token_key_and_expert_once():
    torch.manual_seed(0)
    runtime = _runtime()
    sizes = runtime.sizes
    adapter = SparseAdapter(runtime, 1).train()
    hidden = torch.randn(3, 5, sizes.hidden)  # 15 tokens
    seen_rows, seen_experts = [], []
    real_select = runtime.store.select

    def spy(layer, h, experts):  # the selections the adapter really used
        selection = real_select(layer, h, experts)
        seen_rows.append(selection.rows[selection.local].reshape(-1))
        seen_experts.append(experts.reshape(-1))
        return selection

    runtime.store.select = spy
    runtime.begin_micro_batch(None)
    adapter(hidden).sum().backward()
    adapter(hidden)  # a recomputation of the same micro-batch: reused, not counted again
    runtime.begin_micro_batch(None)
    adapter(hidden[:1])
    usage = runtime.usage
    rows, experts = torch.cat(seen_rows), torch.cat(seen_experts)
    assert len(seen_rows) == 2
    assert torch.equal(usage.row_hits[1], torch.bincount(rows, minlength=sizes.rank))
    assert torch.equal(usage.expert_hits[1], torch.bincount(experts, minlength=8))
    assert int(usage.row_hits[1].sum()) == 20 * sizes.top_k  # 15 + 5 tokens
    assert int(usage.expert_hits[1].sum()) == 20 * sizes.experts_per_token
    assert usage.gate_count[1] == 20 * sizes.top_k and int(usage.row_hits[0].sum()) == 0

    runtime.step(1e-2)  # the rows of the first micro-batch got gradients
    figures = summarise(usage, runtime.store)
    layer = figures["layers"][1]
    assert layer["distinct_rows"] == len(set(rows.tolist()))
    assert layer["updated_rows"] == len(set(seen_rows[0].tolist()))
    assert layer["row_steps_max"] == 1 and figures["layers"][0]["updated_rows"] == 0
    assert layer["gate_mean"] > 0 and layer["value_norm_updated_mean"] > 0
    assert figures["mean"]["distinct_rows"] == layer["distinct_rows"] / 2
    usage.reset()
    assert int(usage.row_hits[1].sum()) == 0 and usage.gate_count[1] == 0


@pytest.mark.unit
def test_evaluation_is_not_counted():
    runtime = _runtime()
    adapter = SparseAdapter(runtime, 0).eval()
    runtime.begin_micro_batch(None)
    with torch.no_grad():
        adapter(torch.randn(2, 4, runtime.sizes.hidden))
    assert int(runtime.usage.row_hits[0].sum()) == 0 and runtime.usage.gate_count[0] == 0


@pytest.mark.unit
def test_sparse_diagnostics_option_reports_every_n_steps():
    from conftest import tiny_llama

    from meft_ds.methods.sparse import SparseMethod

    model = tiny_llama(3)
    options = SparseMethod.Options(sparse_rank=32, sparse_experts=4, sparse_top_k=4,
                                   sparse_optimizer="torch", sparse_diagnostics=2)
    method = SparseMethod(options, model.config)
    module = method.apply(model).train()
    ids = torch.randint(0, 128, (2, 6))
    for step in range(1, 5):
        module(input_ids=ids).logits.square().mean().backward()
        method.after_engine_step(1e-2, 1.0)
        figures = method.step_metrics()
        assert ("sparse_usage_row_entropy" in figures) == (step % 2 == 0)
        assert figures["sparse_clip_coef"] == 1.0
    layers = figures["sparse_usage_layers"]
    assert len(layers["distinct_rows"]) == 3 and all(0 < n <= 32 for n in layers["distinct_rows"])
    assert figures["sparse_usage_updated_rows"] > 0


@pytest.mark.unit
@pytest.mark.parametrize("key_lr_ratio", [0.0, 1.0])
def test_selection_kept_follows_the_probe_tokens_across_key_updates(key_lr_ratio):
    torch.manual_seed(1)
    runtime = _runtime(key_lr_ratio)
    runtime.store.layers[0].weight[:, runtime.sizes.hidden:].normal_()  # keys get gradients
    adapter = SparseAdapter(runtime, 0).train()
    hidden = torch.randn(4, 8, runtime.sizes.hidden)
    runtime.begin_micro_batch(None)
    adapter(hidden).square().sum().backward()
    probe = runtime.usage.probe[0]
    assert probe[0].shape == (32, runtime.sizes.hidden) and probe[2].shape == (32, 6)
    assert summarise(runtime.usage, runtime.store)["layers"][0]["selection_kept"] == 1.0
    runtime.step(0.5)  # a large step: trained keys move the selection
    kept = summarise(runtime.usage, runtime.store)["layers"][0]["selection_kept"]
    assert kept == 1.0 if key_lr_ratio == 0 else kept < 1.0
