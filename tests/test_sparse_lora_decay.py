"""``--sparse_lora_weight_decay``: the LoRA beside the rows decays in the engine's own
AdamW (a parameter group of its own), the routers keep the config's decay."""

from __future__ import annotations

import pytest
import torch
from conftest import lm_loss, tiny_llama

from meft_ds import ds_config, methods
from meft_ds import options as opt

LR = 1e-2
CONFIG = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
          "zero_optimization": {"stage": 0}, "steps_per_print": 10**9,
          "optimizer": {"type": "AdamW", "params": {"lr": LR, "weight_decay": 0.0,
                                                    "torch_adam": True}}}


def _one_step(**values) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], object]:
    """The engine-trained tensors before and after one step of the launcher's path
    (``Method.parameter_groups`` into ``deepspeed.initialize`` with the config's AdamW)."""
    cls = methods.get("sparse")
    options = opt.build(cls.Options, dict(sparse_rank=32, sparse_experts=4, sparse_top_k=4,
                                          sparse_optimizer="torch", **values), context="sparse")
    method = cls(options, None)
    module = method.apply(tiny_llama(2))
    trainable = [p for p in module.parameters() if p.requires_grad]
    engine, *_ = ds_config.initialize(model=module,
                                      model_parameters=method.parameter_groups(trainable),
                                      config=CONFIG)
    method.attach_engine(engine)
    named = {n: p for n, p in module.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in named.items()}
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(3))
    engine.backward(lm_loss(method.forward(engine, ids, torch.ones_like(ids)), ids))
    engine.step()
    return before, {n: p.detach().clone() for n, p in named.items()}, engine


@pytest.mark.unit
def test_lora_decay_shrinks_the_lora_by_lr_times_decay_and_leaves_the_routers():
    """One AdamW step with the LoRA decayed against the same step without: the gradients
    and Adam steps are the same, so each LoRA tensor differs by exactly ``lr * decay *``
    its value before (lora_B starts at zero: equal), and every router is equal bit for
    bit. Unset, the engine gets one group, as before the option."""
    decay = 0.5
    before, plain, engine_off = _one_step()
    _, decayed, engine_on = _one_step(sparse_lora_weight_decay=decay)
    assert [g["weight_decay"] for g in engine_off.optimizer.param_groups] == [0.0]
    assert [g["weight_decay"] for g in engine_on.optimizer.param_groups] == [decay, 0.0]
    lora = [n for n in before if "lora_" in n]
    routers = [n for n in before if "lora_" not in n]
    assert lora and routers
    for name in routers:
        assert torch.equal(decayed[name], plain[name]), name
    moved = 0
    for name in lora:
        shrink = LR * decay * before[name]
        torch.testing.assert_close(plain[name] - decayed[name], shrink, rtol=1e-4, atol=1e-7)
        moved += int(bool(shrink.abs().max() > 0))
    assert moved == len(lora) // 2  # every lora_A (random at start), no lora_B (zero)
