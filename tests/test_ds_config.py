"""DeepSpeed config resolution: batch-size relations and the learning-rate schedule."""

from __future__ import annotations

import pytest
import torch

from meft_ds import ds_config
from meft_ds.errors import UserError

SCHEDULED = {
    "train_micro_batch_size_per_gpu": 2,
    "optimizer": {"type": "AdamW", "params": {"lr": "auto"}},
    "scheduler": {
        "type": "WarmupDecayLR",
        "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto",
                   "warmup_num_steps": "auto", "total_num_steps": "auto",
                   "warmup_type": "linear"},
    },
    "zero_optimization": {"stage": 0},
    "steps_per_print": 10**9,
}


def _finalize(ds: dict, world_size: int = 1, max_steps: int = 10, warmup: float = 0.2,
              lr: float | None = 1e-2) -> dict:
    return ds_config.finalize(ds, world_size=world_size, max_steps=max_steps,
                              warmup_ratio=warmup, lr=lr, micro_batch=None, grad_accum=None,
                              cuda=False)


@pytest.mark.unit
@pytest.mark.parametrize(
    ("sizes", "world", "accum"),
    [
        ({"train_micro_batch_size_per_gpu": 4}, 1, 1),
        ({"train_micro_batch_size_per_gpu": 4, "train_batch_size": 16}, 2, 2),
        ({"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 3,
          "train_batch_size": 12}, 2, 3),
    ],
)
def test_batch_sizes_follow_deepspeed_relation(sizes: dict, world: int, accum: int) -> None:
    ds = _finalize({**SCHEDULED, **sizes}, world_size=world)
    assert ds["gradient_accumulation_steps"] == accum
    assert ds["train_batch_size"] == ds["train_micro_batch_size_per_gpu"] * accum * world


@pytest.mark.unit
@pytest.mark.parametrize(
    ("sizes", "message"),
    [
        ({"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
          "train_batch_size": 7}, r"train_batch_size 7 != .* 4 x .* 1 x 1 rank"),
        ({"train_micro_batch_size_per_gpu": 4, "train_batch_size": 6},
         "not a multiple of"),
    ],
)
def test_contradictory_batch_sizes_are_refused(sizes: dict, message: str) -> None:
    with pytest.raises(UserError, match=message):
        _finalize({**SCHEDULED, **sizes})


@pytest.mark.integration
def test_auto_schedule_fills_and_first_step_trains() -> None:
    """Step k runs at scheduler iteration k: step 1 already trains (DeepSpeed's WarmupLR
    alone would run steps 1 and 2 at the minimum rate), and the rate logged for a step
    is the one its update used."""
    import deepspeed

    ds = _finalize(SCHEDULED, max_steps=10, warmup=0.2, lr=1e-2)
    params = ds["scheduler"]["params"]
    assert params["warmup_num_steps"] == 2 and params["total_num_steps"] == 11
    assert params["warmup_max_lr"] == 1e-2 and params["warmup_min_lr"] == 0.0
    torch.manual_seed(0)
    module = torch.nn.Linear(4, 1)
    engine, *_ = deepspeed.initialize(model=module, model_parameters=list(module.parameters()),
                                      config=ds)
    assert ds_config.start_schedule(engine)
    assert not ds_config.start_schedule(engine), "only a fresh scheduler is moved"
    rates = []
    for _ in range(10):
        before = module.weight.detach().clone()
        rates.append(engine.get_lr()[0])
        loss = engine(torch.ones(2, 4)).pow(2).sum()
        engine.backward(loss)
        engine.step()
        assert not torch.equal(module.weight, before), "every step must change the weights"
    # warm-up 1/2, then linear decay from the peak over the remaining 9 iterations
    expected = [5e-3] + [1e-2 * (11 - k) / 9 for k in range(2, 11)]
    assert rates == pytest.approx(expected)
    assert rates[-1] > 0


@pytest.mark.unit
@pytest.mark.parametrize("name", ["Foo", 3, None])
def test_unknown_optimizer_type_is_refused(name) -> None:
    ds = {**SCHEDULED, "optimizer": {"type": name, "params": {}}}
    with pytest.raises(UserError, match="optimizer.type .* is neither a DeepSpeed optimizer"):
        _finalize(ds)


@pytest.mark.unit
@pytest.mark.parametrize("name", ["AdamW", "adam", "Lamb", "SGD", "RMSprop"])
def test_deepspeed_and_torch_optimizer_names_pass(name: str) -> None:
    _finalize({**SCHEDULED, "optimizer": {"type": name, "params": {}}})


@pytest.mark.unit
def test_schema_errors_are_one_line() -> None:
    """DeepSpeed's own config schema (pydantic) rejects an unknown ZeRO key: one line."""
    ds = _finalize({**SCHEDULED, "zero_optimization": {"stage": 0, "bogus_key": 1}})
    module = torch.nn.Linear(4, 1)
    with pytest.raises(UserError) as info:
        ds_config.initialize(model=module, model_parameters=list(module.parameters()),
                             config=ds)
    text = str(info.value)
    assert "bogus_key" in text and "Extra inputs are not permitted" in text
    assert "\n" not in text
