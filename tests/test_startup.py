"""Start-up order: each rank binds its device before any collective (NCCL needs it)."""

from __future__ import annotations

import pytest
import torch

from meft_ds import cli, runner

pytestmark = pytest.mark.unit


class _Stop(Exception):
    pass


def test_the_device_is_chosen_before_the_group_and_any_collective(monkeypatch) -> None:
    """With CUDA (emulated: no kernel runs) and LOCAL_RANK 1, ``run`` sets cuda:1 before it
    joins the process group and before the first collective (the config check)."""
    import deepspeed

    calls: list[tuple] = []
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", d)))
    monkeypatch.setattr(deepspeed, "init_distributed",
                        lambda **kw: calls.append(("init", kw["dist_backend"])))

    def collective(*args, **kwargs):
        calls.append(("collective",))
        raise _Stop

    monkeypatch.setattr(runner.mdist, "check_same_config", collective)
    monkeypatch.setattr(runner.mdist, "refuse_if_any", collective)
    spec = cli.parse(["--deepspeed", "ds_configs/cpu.json", "--progress", "false"])
    with pytest.raises(_Stop):
        runner.run(spec)
    assert calls == [("set_device", 1), ("init", "nccl"), ("collective",)]


def test_start_process_returns_the_bound_device(monkeypatch) -> None:
    import deepspeed

    monkeypatch.setattr(deepspeed, "init_distributed", lambda **kw: None)
    assert runner.start_process() == (torch.device("cuda", 0) if torch.cuda.is_available()
                                      else torch.device("cpu"))
