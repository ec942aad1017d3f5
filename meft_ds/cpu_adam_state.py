"""Make DeepSpeedCPUAdam continue after a checkpoint load exactly as it would have run on.

The C++ optimizer behind DeepSpeedCPUAdam keeps the bias-correction powers β₁ᵗ, β₂ᵗ in
float32 and advances them by one multiplication per step; a fresh instance that meets
step t > 1 (a resumed run) sets them with ``pow(β, t)`` instead. The two differ in the
last bits, the first resumed update differs by ~1e-7 relative, and bf16 weights magnify
it. :func:`replay_steps` calls the kernel once per earlier step and parameter, in the
order ``step()`` does, with empty tensors: nothing is updated, but the powers are the
product an uninterrupted run would hold.
"""

from __future__ import annotations

from typing import Any

import torch


def find_cpu_adam(optimizer: Any) -> Any | None:
    """The DeepSpeedCPUAdam inside ``optimizer`` (ZeRO/bf16 wrappers hold it as
    ``.optimizer``), or None."""
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    seen = 0
    while optimizer is not None and seen < 8:
        if isinstance(optimizer, DeepSpeedCPUAdam):
            return optimizer
        optimizer = getattr(optimizer, "optimizer", None)
        seen += 1
    return None


def _stepped(opt: Any) -> list[tuple[dict, torch.Tensor, dict]]:
    """(group, parameter, state) of every parameter with optimizer state, in step order."""
    out = []
    for group in opt.param_groups:
        for p in group["params"]:
            state = opt.state.get(p)
            if state and "step" in state:
                out.append((group, p, state))
    return out


def replay_steps(optimizer: Any) -> int:
    """Advance the C++ bias-correction state of the DeepSpeedCPUAdam in ``optimizer`` to
    its loaded step count; returns the steps replayed (0: nothing to do or not uniform)."""
    opt = find_cpu_adam(optimizer)
    if opt is None:
        return 0
    stepped = _stepped(opt)
    steps = {int(state["step"]) for _, _, state in stepped}
    if len(steps) != 1:  # parameters that started at different steps: leave as DeepSpeed does
        return 0
    (last,) = steps
    for step in range(1, last + 1):
        for group, p, state in stepped:
            beta1, beta2 = group["betas"]
            empty = p.data.new_empty(0)
            opt.ds_opt_adam.adam_update(
                opt.opt_id, step, group["lr"], beta1, beta2, group["eps"],
                group["weight_decay"], group["bias_correction"], empty, empty.clone(),
                state["exp_avg"].new_empty(0), state["exp_avg_sq"].new_empty(0),
            )
    return last
