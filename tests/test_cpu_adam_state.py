"""DeepSpeedCPUAdam continues bit for bit after its state is saved and loaded."""

from __future__ import annotations

import pytest
import torch

from meft_ds import cpu_adam_state


def _run(opt: torch.optim.Optimizer, params: list[torch.Tensor], steps: range) -> None:
    for step in steps:
        gen = torch.Generator().manual_seed(step)
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()


def _fresh(params: list[torch.Tensor]) -> torch.optim.Optimizer:
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    return DeepSpeedCPUAdam(params, lr=1e-2, betas=(0.9, 0.999), weight_decay=0.01)


@pytest.mark.integration
def test_replayed_steps_match_an_uninterrupted_run() -> None:
    init = [torch.randn(37, generator=torch.Generator().manual_seed(0)), torch.randn(5, 3)]
    whole = [t.clone() for t in init]
    _run(_fresh(whole), whole, range(1, 7))
    results = {}
    for replay in (False, True):
        params = [t.clone() for t in init]
        first = _fresh(params)
        _run(first, params, range(1, 3))
        saved = first.state_dict()
        resumed = _fresh(params)  # a new process: a new C++ optimizer
        resumed.load_state_dict(saved)
        wrapper = type("Wrapper", (), {"optimizer": resumed})()  # as ZeRO holds it
        assert cpu_adam_state.replay_steps(wrapper if replay else None) == (2 if replay else 0)
        _run(resumed, params, range(3, 7))
        results[replay] = params
    assert all(torch.equal(a, b) for a, b in zip(results[True], whole, strict=True))
    # Without the replay step 3 uses pow(0.999, 3) in float32, one bit off the product.
    assert not all(torch.equal(a, b) for a, b in zip(results[False], whole, strict=True))


@pytest.mark.unit
def test_nothing_to_replay_without_cpu_adam() -> None:
    params = [torch.zeros(3, requires_grad=True)]
    assert cpu_adam_state.replay_steps(torch.optim.AdamW(params)) == 0
