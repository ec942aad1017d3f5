"""The sparse adapter's defaults changed (frozen keys, faster routers and rows: see
docs/methods.md); the paper's settings stay reachable and reproduce the earlier
arithmetic bit for bit."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama

from meft_ds.methods.sparse import SparseMethod
from meft_ds.sparse import adapter as adapter_mod
from meft_ds.sparse import optim
from meft_ds.trainer import lm_loss

PAPER = {"sparse_key_lr_ratio": 1.0, "sparse_router_lr_ratio": 1.0, "sparse_lr_ratio": 1.0,
         "sparse_attn_lora_r": 0, "sparse_route": "token", "sparse_weight_decay": 0.0}
TOKEN = {"sparse_route": "token"}  # the routing before context routing became the default
ATTENTION = {"sparse_lora_targets": "attention"}  # the LoRA before it covered the FFN too
NO_DECAY = {"sparse_weight_decay": 0.0}  # the rows' weight decay before it was 3


def _losses(steps: int = 5, **flags) -> list[float]:
    """Losses of a few steps of the sparse method on a tiny model (routers by AdamW)."""
    return _train(steps, **flags)[0]


def _build(**flags) -> tuple[SparseMethod, torch.nn.Module]:
    """The sparse method (tiny store, torch row optimizer) applied to a tiny LLaMA."""
    model = tiny_llama(2)
    options = SparseMethod.Options(sparse_rank=32, sparse_experts=4, sparse_top_k=4,
                                   sparse_optimizer="torch", **flags)
    method = SparseMethod(options, model.config)
    return method, method.apply(model).train()


def _train(steps: int = 5, **flags) -> tuple[list[float], SparseMethod]:
    method, module = _build(**flags)
    routers = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-2)
    torch.manual_seed(3)
    ids = torch.randint(0, 128, (2, 8))
    losses = []
    for _ in range(steps):
        loss = lm_loss(method.forward(module, ids, torch.ones_like(ids)), ids)
        loss.backward()
        routers.step()
        routers.zero_grad()
        method.after_engine_step(1e-2, 1.0)
        losses.append(float(loss.detach()))
    return losses, method


@pytest.mark.unit
def test_paper_settings_reproduce_the_code_before_the_new_options_bit_for_bit(monkeypatch):
    new_code = _losses(**PAPER)
    # the arithmetic before the options existed: no logit multiplier, no key step scaling
    monkeypatch.setattr(adapter_mod.SparseAdapter, "route", lambda self, x: self.router(x))
    monkeypatch.setattr(optim.RowAdamW, "_keys_before", lambda self, weight, rows: None)
    before = _losses(**PAPER)
    assert new_code == before and new_code[-1] < new_code[0]


@pytest.mark.unit
def test_context_routing_changes_only_the_router_input(monkeypatch):
    """The default ``--sparse_route context`` differs from token routing (the code before
    the option) only in what the router sees: fed each token's own input again, it gives
    token routing's losses bit for bit."""
    token = _losses(**TOKEN)
    assert _losses() != token
    # token routing has nothing to calibrate: the trainer starts it exactly as before
    for flags, calibrates in ((TOKEN, False), ({}, True)):
        assert _build(**flags)[0].needs_calibration() == calibrates
    token_input = lambda self, hidden, tokens, keep_carry=True: (  # noqa: E731
        hidden.reshape(-1, hidden.shape[-1]) if tokens is None
        else hidden.reshape(-1, hidden.shape[-1]).index_select(0, tokens))
    monkeypatch.setattr(adapter_mod.SparseAdapter, "_context_query", token_input)
    assert _losses() == token and token[-1] < token[0]


@pytest.mark.unit
def test_defaults_are_the_measured_ones_and_differ_from_the_paper():
    options = SparseMethod.Options()
    assert (options.sparse_key_lr_ratio, options.sparse_router_lr_ratio,
            options.sparse_lr_ratio, options.sparse_attn_lora_r,
            options.sparse_route, options.sparse_top_k,
            options.sparse_lora_targets, options.sparse_weight_decay
            ) == (0.0, 10.0, 3.0, 8, "context", 4, "all", 3.0)
    assert _losses() != _losses(**PAPER)


@pytest.mark.unit
def test_attention_targets_keep_the_previous_defaults_lora(monkeypatch):
    """``--sparse_lora_targets attention`` (the default before ``all``) adapts only q/k/v/o,
    as before; ``all`` differs from it only in the FFN's LoRA: with the FFN projections
    given no LoRA (the parts ``all`` maps to patched to attention alone) the default gives
    the previous defaults' losses bit for bit."""
    from meft_ds.methods import sparse as sparse_mod

    def adapted(flags: dict) -> set[str]:  # the projection names that carry a LoRA
        module = _build(**flags)[1]
        return {n.split(".lora_A")[0].rsplit(".", 1)[-1]
                for n, _ in module.named_parameters() if "lora_A" in n}

    previous, default = _losses(**ATTENTION), _losses()
    assert previous != default and default[-1] < default[0] and previous[-1] < previous[0]
    assert adapted(ATTENTION) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert adapted({}) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                           "down_proj"}
    monkeypatch.setitem(sparse_mod.LORA_PARTS, "all", sparse_mod.LORA_PARTS["attention"])
    assert _losses() == previous


@pytest.mark.unit
def test_frozen_keys_never_move_and_values_do():
    method, module = _build()
    store = method.runtime.store
    before = {layer: store.full_weight(layer).clone() for layer in store.layers}
    ids = torch.randint(0, 128, (2, 8))
    lm_loss(method.forward(module, ids, torch.ones_like(ids)), ids).backward()
    method.after_engine_step(1e-2, 1.0)
    hidden = store.sizes.hidden
    for layer, was in before.items():
        now = store.full_weight(layer)
        assert torch.equal(now[:, :hidden], was[:, :hidden])
        assert not torch.equal(now[:, hidden:], was[:, hidden:])


@pytest.mark.unit
def test_row_weight_decay_shrinks_only_the_updated_rows_values():
    """The default weight decay (3; 0 before) changes the losses; against the same steps
    without it, keys (frozen) and the rows no step selected are equal bit for bit, and the
    updated rows' values are smaller: AdamW's decay pulls each toward zero."""
    (decayed, on), (plain, off) = _train(), _train(**NO_DECAY)
    assert decayed != plain and decayed[-1] < decayed[0]
    store_on, store_off = on.runtime.store, off.runtime.store
    hidden = store_on.sizes.hidden
    for layer in store_on.layers:
        now, without = store_on.full_weight(layer), store_off.full_weight(layer)
        updated = store_on.layers[layer].steps > 0
        assert torch.equal(updated, store_off.layers[layer].steps > 0)
        assert 0 < updated.sum() < len(now)
        assert torch.equal(now[:, :hidden], without[:, :hidden])
        assert torch.equal(now[~updated], without[~updated])
        assert now[updated, hidden:].norm() < without[updated, hidden:].norm()


@pytest.mark.unit
def test_step_bias_correction_counts_store_steps_through_checkpoints():
    """``--sparse_bias_correction step`` changes the updates (rows skip steps here); the
    store counts its steps either way and a checkpoint carries the count (one written
    before the count existed resumes at its largest row step: the same under ``step``)."""
    lazy, _ = _train(sparse_bias_correction="row")
    assert lazy == _losses()  # the default
    by_step, method = _train(sparse_bias_correction="step")
    assert by_step != lazy and by_step[-1] < by_step[0]
    store = method.runtime.store
    assert store.step_count == 5
    method.runtime.step(1e-2, skip=True)  # a step DeepSpeed skipped (fp16 overflow)
    assert store.step_count == 5
    assert max(int(rows.steps.max()) for rows in store.layers.values()) == 5
    state = store.state_dict()
    assert state["step_count"] == 5
    fresh = _train(0, sparse_bias_correction="step")[1].runtime.store
    assert fresh.step_count == 0
    fresh.load_state_dict(state)
    assert fresh.step_count == 5
    del state["step_count"]
    fresh.step_count = 0
    fresh.load_state_dict(state)
    assert fresh.step_count == 5
