"""meft_ds inside other loops: transformers.Trainer with MeftCallback (checkpoint, resume,
global clipping as the launcher's), and the examples (plain PyTorch, accelerate, Trainer) run."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, save_tiny_base, subprocess_env
from transformers import Trainer, TrainerCallback, TrainingArguments

import meft_ds
from meft_ds.data.batches import Encoded, collate
from meft_ds.errors import UserError
from meft_ds.integrations.hf import MeftCallback
from meft_ds.models import loader

SPARSE = dict(sparse_rank=64, sparse_experts=4, sparse_top_k=8)  # the default cpu_adam rows
sys.path.insert(0, str(ROOT / "examples"))
from example_setup import dataset  # noqa: E402  (the examples' facts)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    where = save_tiny_base(tmp_path_factory.mktemp("base"))
    config = loader.model_config(str(where))
    assert config.vocab_size == len(loader.load_tokenizer(str(where)))
    return where


def _data(base_dir: Path) -> list[Encoded]:
    """The examples' facts as question/answer examples (loss on the answer)."""
    return dataset(loader.load_tokenizer(str(base_dir)))


def _collate(rows: list[Encoded]) -> dict[str, torch.Tensor]:
    return collate(rows, pad_id=0)


def _model(base_dir: Path) -> meft_ds.MeftModel:
    base = loader.load_model(str(base_dir)).model
    return meft_ds.get_sparse_model(base, meft_ds.SparseConfig(**SPARSE))


class _StopAt(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def _trainer(model, out: Path, data: list[dict], callbacks: list, optimizer=None,
             **args) -> Trainer:
    settings = dict(output_dir=str(out), max_steps=4, per_device_train_batch_size=2,
                    learning_rate=1e-2, save_steps=2, logging_steps=1, report_to=[],
                    use_cpu=True, disable_tqdm=True, seed=0, max_grad_norm=0.5)
    return Trainer(model=model, args=TrainingArguments(**{**settings, **args}),
                   train_dataset=data, data_collator=_collate, callbacks=callbacks,
                   optimizers=(optimizer, None))


def _state(model: meft_ds.MeftModel) -> dict[str, torch.Tensor]:
    """Rows, their Adam state and the routers."""
    state = {k: v.clone() for k, v in model.method.external_state(optimizer=True).items()}
    state.update({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
    return state


@pytest.mark.integration
def test_trainer_checkpoint_restores_the_store_bit_for_bit(base_dir: Path, tmp_path: Path):
    """A Trainer run stopped after its step-2 checkpoint and resumed from it ends with the
    rows, their Adam state and the routers of the uninterrupted run, bit for bit."""
    data = _data(base_dir)
    whole = _model(base_dir)
    _trainer(whole, tmp_path / "whole", data, [MeftCallback()]).train()
    stopped = _model(base_dir)
    _trainer(stopped, tmp_path / "run", data, [MeftCallback(), _StopAt(2)]).train()
    checkpoint = tmp_path / "run" / "checkpoint-2"
    assert (checkpoint / "sparse_store.pt").is_file()
    assert stopped.row_optimizer().state_dict()["state"]["sparse_store.layer0.steps"].sum() > 0
    resumed = _model(base_dir)
    trainer = _trainer(resumed, tmp_path / "run", data, [MeftCallback()])
    trainer.train(resume_from_checkpoint=True)
    assert trainer.state.global_step == 4 and trainer.args.max_grad_norm == 0.5
    want, got = _state(whole), _state(resumed)
    assert want.keys() == got.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key


@pytest.mark.integration
def test_trainer_takes_the_lora_decay_from_parameter_groups(base_dir: Path, tmp_path: Path):
    """With ``sparse_lora_weight_decay`` the Trainer's own optimizer (one decay for all) is
    refused before the first step; one over ``model.parameter_groups()`` trains with it."""
    base = loader.load_model(str(base_dir)).model
    model = meft_ds.get_sparse_model(
        base, meft_ds.SparseConfig(**SPARSE, sparse_lora_weight_decay=0.5))
    data = _data(base_dir)
    with pytest.raises(UserError, match=r"build it over model\.parameter_groups\(\)"):
        _trainer(model, tmp_path / "plain", data, [MeftCallback()]).train()
    optimizer = torch.optim.AdamW(model.parameter_groups(), lr=1e-2, weight_decay=0.0)
    trainer = _trainer(model, tmp_path / "grouped", data, [MeftCallback()], optimizer,
                       max_steps=1)
    trainer.train()
    assert trainer.state.global_step == 1
    assert [g["weight_decay"] for g in trainer.optimizer.param_groups] == [0.5, 0.0]


@pytest.mark.integration
def test_trainer_clips_like_the_launcher(base_dir: Path, tmp_path: Path):
    """Trainer steps with MeftCallback clip routers and rows by their global norm: the norm
    and coefficient of the launcher's trainer (DeepSpeed engine, same model, same batches).
    Step 2 is compared: at step 1 only the rows have gradients (the values start at 0)."""
    import deepspeed

    from meft_ds.config import TrainConfig
    from meft_ds.data import BatchSchedule
    from meft_ds.trainer import Trainer as LauncherTrainer

    max_norm, lr = 0.05, 1e-2
    data = _data(base_dir)[:2]  # one batch: each step trains on both examples
    callback = MeftCallback()
    _trainer(_model(base_dir), tmp_path / "hf", data, [callback], max_steps=2,
             save_strategy="no", max_grad_norm=max_norm, learning_rate=lr,
             lr_scheduler_type="constant", optim="adamw_torch", weight_decay=0.0).train()

    reference = _model(base_dir)
    params = [p for p in reference.model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(
        model=reference.model, model_parameters=params,
        optimizer=torch.optim.AdamW(params, lr=lr, weight_decay=0.0),
        config={"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
                "gradient_clipping": max_norm, "zero_optimization": {"stage": 0},
                "steps_per_print": 10**9})
    reference.method.attach_engine(engine)
    schedule = BatchSchedule(data, 2, 0, 0)
    launcher = LauncherTrainer(TrainConfig(method="sparse", output_dir=str(tmp_path / "ds")),
                               engine, reference.method, schedule, torch.device("cpu"))
    launcher.train_step()
    record = launcher.train_step()
    assert 0 < record["sparse_store_grad_norm"] < record["grad_norm"]  # rows and routers
    assert record["sparse_clip_coef"] < 1
    assert callback.grad_norm == pytest.approx(record["grad_norm"], rel=1e-9)
    assert callback.clip_coef == pytest.approx(record["sparse_clip_coef"], rel=1e-9)


@pytest.mark.multiprocess
@pytest.mark.parametrize("example", ["plain_pytorch.py", "accelerate_loop.py",
                                     "hf_trainer.py"])
def test_example_runs_on_a_tiny_model(example: str, tmp_path: Path) -> None:
    """The example trains (its loss falls), exports and reloads, in a few seconds."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / example), "--tiny", "--output_dir",
         str(tmp_path)], capture_output=True, text=True, env=subprocess_env(), timeout=300,
        cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    losses = [float(x) for x in re.findall(r"loss (\d+\.\d+)", result.stdout)]
    assert len(losses) >= 2 and losses[-1] < losses[0], result.stdout
    assert (tmp_path / "adapter" / "adapter.safetensors").is_file()
    assert "reloaded: same logits" in result.stdout
