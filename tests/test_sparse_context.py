"""Context routing (``--sparse_route context``, meft_ds.sparse.context): the causal mean,
its centre, KV-cached decoding, exports."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import tiny_llama, tiny_sparse_engine

import meft_ds
from meft_ds import methods
from meft_ds import options as opt
from meft_ds.errors import UserError
from meft_ds.runner import free_port
from meft_ds.sparse.adapter import SparseAdapter
from meft_ds.sparse.context import data_parallel_mean, prefix_mean, row_sum

SPARSE = dict(sparse_rank=32, sparse_experts=4, sparse_top_k=4, sparse_optimizer="torch",
              sparse_route="context")


def context_model(reversible: bool = False) -> meft_ds.MeftModel:
    """A tiny LLaMA with context routing and non-zero values (the adapter changes logits)."""
    model = meft_ds.get_sparse_model(tiny_llama(), meft_ds.SparseConfig(
        **SPARSE, reversible=reversible))
    for rows in model.method.runtime.store.layers.values():
        rows.weight[:, 64:].normal_(0, 0.5, generator=torch.Generator().manual_seed(3))
    return model


def adapters(model) -> list[SparseAdapter]:
    return [m for m in model.modules() if isinstance(m, SparseAdapter)]


@pytest.mark.unit
def test_prefix_mean_skips_padding_and_continues_from_its_carry():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 3)
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    full, _ = prefix_mean(x, mask)
    # row 0: the mean of its real tokens only, as if it had no padding
    alone, _ = prefix_mean(x[:1, 2:], None)
    torch.testing.assert_close(full[0, 2:], alone[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(full[1, 3], x[1, :4].mean(0), rtol=0, atol=1e-6)
    # the first 3 positions, then one position at a time with the carry: the same means
    head, carry = prefix_mean(x[:, :3], mask[:, :3])
    steps = [head]
    for t in range(3, 5):
        step, carry = prefix_mean(x[:, t : t + 1], mask[:, : t + 1], carry)
        steps.append(step)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=0, atol=1e-6)


@pytest.mark.unit
def test_centre_is_set_by_the_first_training_batch_and_then_fixed():
    model = context_model()
    model.train()
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0  # right padding: its positions do not count
    seen = {}
    hooks = [a.register_forward_pre_hook(lambda m, args: seen.setdefault(m.layer, args[0]))
             for a in adapters(model)]
    model(ids, mask)
    for hook in hooks:
        hook.remove()
    for adapter in adapters(model):
        means, _ = prefix_mean(seen[adapter.layer].detach(), mask)
        expected = means[mask.bool()].mean(0)
        torch.testing.assert_close(adapter.context_centre, expected, rtol=0, atol=1e-6)
    before = [a.context_centre.clone() for a in adapters(model)]
    model(torch.randint(0, 128, (2, 6)), torch.ones(2, 6, dtype=torch.long))
    assert all(torch.equal(b, a.context_centre) for b, a in zip(before, adapters(model)))
    assert all(not torch.equal(b, torch.zeros_like(b)) for b in before)


@pytest.mark.unit
def test_calibration_pass_centre_does_not_depend_on_how_the_batch_is_split():
    """The launcher's pass (SparseMethod.calibrate) over a step's micro-batches gives the
    centre of all their tokens: 4 sequences in one micro-batch or in two; no rows move."""
    ids = torch.randint(0, 128, (4, 6), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[2, 5:] = 0
    centres = []
    for split in (1, 2):
        model = context_model()
        model.train()
        assert model.method.needs_calibration()  # fresh: the trainer fetches the batches
        step = ids.shape[0] // split
        model.method.calibrate(model.model, [
            {"input_ids": ids[i : i + step], "attention_mask": mask[i : i + step]}
            for i in range(0, 4, step)])
        counters = model.method.runtime.counters
        counters.close([a.layer for a in adapters(model)])
        figures = counters.metrics()  # no rows selected or moved
        assert figures.get("sparse_rows_moved", 0) == 0
        assert sum(figures["sparse_rows_per_layer"]) == 0
        centres.append([a.context_centre.clone() for a in adapters(model)])
        assert all(a.centred for a in adapters(model)) and not model.method.needs_calibration()
    for one, two in zip(*centres):
        torch.testing.assert_close(one, two, rtol=0, atol=1e-7)
    # and it is the mean of the causal means of the base model's inputs (values add 0)
    model = context_model()
    model.train()
    model.method.calibrate(model.model, [{"input_ids": ids, "attention_mask": mask}])
    seen = {}
    hooks = [a.register_forward_pre_hook(lambda m, args: seen.setdefault(m.layer, args[0]))
             for a in adapters(model)]
    with torch.no_grad():
        model(ids, mask)  # calibrated: no new centre; values non-zero now
    for hook in hooks:
        hook.remove()
    first = adapters(model)[0]  # the first layer's input is the base model's either way
    means, _ = prefix_mean(seen[first.layer], mask)
    torch.testing.assert_close(first.context_centre, means[mask.bool()].mean(0),
                               rtol=0, atol=1e-6)


@pytest.mark.unit
def test_context_routes_rows_by_the_sequence_not_the_token():
    """Two sequences that end in the same tokens pick different experts there (token
    routing picks the same: it sees only the token)."""
    def experts_at_end(route: str) -> list[torch.Tensor]:
        model = meft_ds.get_sparse_model(tiny_llama(layers=1), meft_ds.SparseConfig(
            **{**SPARSE, "sparse_route": route, "sparse_attn_lora_r": 0}))
        model.train()
        ids = torch.randint(0, 128, (64, 8), generator=torch.Generator().manual_seed(1))
        ids[:, -1] = 7  # the same last token everywhere
        model(ids, torch.ones_like(ids))
        return adapters(model)[0].decision.experts.reshape(64, 8, -1)[:, -1]

    # the attention's causal mixing already varies a token's input slightly, so compare
    # how many sequences share the most common expert set at the last position
    def top_share(experts: torch.Tensor) -> float:
        keys = [tuple(sorted(e.tolist())) for e in experts]
        return max(keys.count(k) for k in set(keys)) / len(keys)

    assert top_share(experts_at_end("context")) < top_share(experts_at_end("token"))


@pytest.mark.unit
@pytest.mark.parametrize("reversible", [False, True])
def test_cached_generation_equals_full_recomputation_with_left_padding(monkeypatch, reversible):
    model = context_model(reversible)
    model.train()
    model(torch.randint(0, 128, (2, 6)), torch.ones(2, 6, dtype=torch.long))  # calibrate
    model.eval()
    ids = torch.tensor([[0, 0, 5, 9, 11], [3, 4, 5, 9, 11]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    cached = model.generate(input_ids=ids, attention_mask=mask, use_cache=True, **kwargs)
    full = model.generate(input_ids=ids, attention_mask=mask, use_cache=False, **kwargs)
    assert torch.equal(cached, full)
    alone = model.generate(input_ids=ids[:1, 2:], attention_mask=mask[:1, 2:], use_cache=True,
                           **kwargs)
    assert torch.equal(alone[0], cached[0, 2:])
    # beam search reorders the cache, and the running sums with it (the HF model's own
    # generate: nothing in MeftModel's API special-cases it)
    hf = model.method.generation_model(model.model)
    orders = []
    real = SparseAdapter.reorder_carry
    monkeypatch.setattr(SparseAdapter, "reorder_carry",
                        lambda self, order: (orders.append(order.clone()), real(self, order)))
    beams = hf.generate(input_ids=ids, attention_mask=mask, num_beams=3, use_cache=True,
                        **kwargs)
    assert torch.equal(beams, hf.generate(input_ids=ids, attention_mask=mask, num_beams=3,
                                          use_cache=False, **kwargs))
    # the beams were reordered (not only kept in place) while decoding
    assert any(not torch.equal(o, torch.arange(len(o))) for o in orders)


@pytest.mark.unit
def test_export_keeps_the_fp32_centre(tmp_path):
    model = context_model()
    model.train()
    model(torch.randint(0, 128, (2, 6)), torch.ones(2, 6, dtype=torch.long))
    model.eval()
    ids = torch.randint(0, 128, (1, 7), generator=torch.Generator().manual_seed(2))
    logits = model(ids, torch.ones_like(ids)).logits
    model.save_pretrained(tmp_path / "out")
    loaded = meft_ds.MeftModel.from_pretrained(tiny_llama(), tmp_path / "out")
    loaded.eval()
    for a, b in zip(adapters(model), adapters(loaded)):
        assert torch.equal(a.context_centre, b.context_centre)
    torch.testing.assert_close(loaded(ids, torch.ones_like(ids)).logits, logits,
                               rtol=0, atol=1e-6)
    loaded.to(torch.bfloat16)  # the centre cancels most of its input: it stays fp32
    assert all(a.context_centre.dtype == torch.float32 for a in adapters(loaded))


@pytest.mark.unit
def test_prefetch_routes_by_the_context_of_the_attention_inputs():
    """--sparse_prefetch picks the experts before the FFN input exists: from the centred
    causal mean of the attention inputs put through the FFN norm."""
    model = meft_ds.get_sparse_model(tiny_llama(), meft_ds.SparseConfig(
        **SPARSE, sparse_prefetch=True))
    model.train()
    residuals = {}
    for a in adapters(model):
        a.route_norm.register_forward_pre_hook(
            lambda m, args, layer=a.layer: residuals.setdefault(layer, args[0].detach()))
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(4))
    model(ids, torch.ones_like(ids))
    counters = model.method.runtime.counters
    counters.close([a.layer for a in adapters(model)])  # as a step's end does
    assert counters.metrics()["sparse_prefetched_layers"] == len(adapters(model))
    for a in adapters(model):
        means, _ = prefix_mean(a.route_norm(residuals[a.layer]), None)
        flat = means.reshape(-1, 64)
        torch.testing.assert_close(a.context_centre, flat.mean(0), rtol=0, atol=1e-6)
        want = a.route(flat - a.context_centre).topk(a.decision.experts.shape[1], -1).indices
        assert torch.equal(a.decision.experts.sort(-1).values, want.sort(-1).values)


@pytest.mark.unit
def test_refusals():
    cls = methods.get("sparse")
    with pytest.raises(UserError, match="sparse_route"):
        opt.build(cls.Options, {**SPARSE, "sparse_route": "prompt"}, context="sparse")
    model = context_model()
    state = {k: v for k, v in model.method.trainable_state(model.model).items()
             if not k.startswith("sparse_context.")}
    with pytest.raises(UserError, match="context-routing centres"):
        model.method.load_trainable_state(model.model, state)


def _mean_worker(rank: int, port: int) -> None:
    torch.set_num_threads(1)
    os.environ["LOCAL_RANK"] = str(rank)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)
    try:
        every = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
        mine = every[:2] if rank == 0 else every[2:]  # 2 and 3 tokens: weighted by count
        torch.testing.assert_close(data_parallel_mean(row_sum(mine)), every.mean(0),
                                   rtol=0, atol=1e-6)
    finally:
        dist.destroy_process_group()


@pytest.mark.multiprocess
def test_centre_is_the_mean_over_every_rank_tokens():
    mp.start_processes(_mean_worker, args=(free_port(),), nprocs=2, join=True,
                       start_method="spawn")


@pytest.mark.integration
def test_engine_checkpoint_restores_the_centre(tmp_path: Path):
    """A resumed run routes with the checkpoint's centre, not one from its first batch."""
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(0))
    method, engine = tiny_sparse_engine({"sparse_route": "context"})
    engine(ids, attention_mask=torch.ones_like(ids))
    centres = [a.context_centre.clone() for a in method.adapters.values()]
    engine.save_checkpoint(str(tmp_path), tag="t")
    method, engine = tiny_sparse_engine({"sparse_route": "context"})
    engine.load_checkpoint(str(tmp_path), tag="t")
    other = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(1))
    engine(other, attention_mask=torch.ones_like(other))  # would calibrate if unset
    for centre, adapter in zip(centres, method.adapters.values()):
        assert torch.equal(adapter.context_centre, centre)
