"""Baseline methods under the real DeepSpeed engine on SmolLM2 (short sequences)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from meft_ds import cli, methods, options
from meft_ds.runner import run

ROOT = Path(__file__).resolve().parents[1]
CPU = str(ROOT / "ds_configs" / "cpu.json")
TINY = ["--train_examples", "8", "--max_seq_len", "48", "--eval_trained", "0",
        "--eval_heldout", "0", "--progress", "false", "--micro_batch_size", "2"]


def _run(tmp_path: Path, *argv: str) -> list[dict]:
    spec = cli.parse(["--deepspeed", CPU, "--output_dir", str(tmp_path), *TINY, *argv])
    run(spec)
    return [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.integration
@pytest.mark.parametrize("method", ["parallel_adapter", "lora", "full"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_method_trains_under_deepspeed(tmp_path: Path, method: str, checkpointing: bool) -> None:
    extra = ["--gradient_checkpointing"] if checkpointing else []
    lr = "1e-4" if method == "full" else "3e-3"
    # no final checkpoint: for full that is the whole model with its Adam moments (1.6 GB
    # to write); checkpoints are tested in test_resume.py
    records = _run(tmp_path, "--method", method, "--max_steps", "4", "--lr", lr, *extra,
                   "--save_final", "false")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    assert records[-1]["grad_norm"] > 0
    assert records[0]["saved_activation_bytes"] > 0
    # each method's layout (meft_ds.export): PEFT's, a transformers model, meft_ds's own
    weights = {"lora": "adapter_model.safetensors", "full": "model.safetensors"}
    exported = tmp_path / "adapter" / weights.get(method, "adapter.safetensors")
    assert exported.is_file() and exported.stat().st_size > 0


@pytest.mark.integration
def test_checkpointing_saves_fewer_activation_bytes(tmp_path: Path) -> None:
    plain = _run(tmp_path / "a", "--max_steps", "1")
    ckpt = _run(tmp_path / "b", "--max_steps", "1", "--gradient_checkpointing",
                "--save_final", "false")
    assert ckpt[0]["saved_activation_bytes"] < 0.5 * plain[0]["saved_activation_bytes"]
    # --save_final false: no final checkpoint, the adapter still exported.
    assert (tmp_path / "a" / "checkpoints" / "latest").is_file()
    assert not (tmp_path / "b" / "checkpoints").exists()
    assert (tmp_path / "b" / "adapter" / "adapter.safetensors").is_file()


@pytest.mark.unit
@pytest.mark.parametrize("name", ["parallel_adapter", "lora"])
def test_step0_output_equals_base_model(smollm2, name: str) -> None:
    base = smollm2.model
    cls = methods.get(name)
    opts = options.build(cls.Options, {})
    method = cls(opts, base.config)
    module = method.apply(copy.deepcopy(base))
    ids = torch.randint(0, 1000, (2, 12))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        want = base(input_ids=ids, attention_mask=mask).logits
        got = method.forward(module.eval(), ids, mask)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    assert 0 < trainable < 0.2 * sum(p.numel() for p in base.parameters())


@pytest.mark.integration
def test_parallel_adapter_loss_decreases(tmp_path: Path) -> None:
    records = _run(tmp_path, "--max_steps", "30", "--lr", "3e-3")
    first = sum(r["loss"] for r in records[:5]) / 5
    last = sum(r["loss"] for r in records[-5:]) / 5
    assert last < 0.7 * first


@pytest.mark.integration
@pytest.mark.parametrize("stage", [1, 3])
def test_other_zero_stages_train_and_export(tmp_path: Path, stage: int) -> None:
    config = json.loads(Path(CPU).read_text())
    config["zero_optimization"] = {"stage": stage}
    path = tmp_path / "zero.json"
    path.write_text(json.dumps(config))
    spec = cli.parse(["--deepspeed", str(path), "--output_dir", str(tmp_path / "run"), *TINY,
                      "--max_steps", "3", "--lr", "3e-3"])
    run(spec)
    from transformers.integrations import is_deepspeed_zero3_enabled

    # after a ZeRO-3 run, a model this process builds is whole again (not partitioned)
    assert not is_deepspeed_zero3_enabled()
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    from safetensors.torch import load_file

    tensors = load_file(str(tmp_path / "run" / "adapter" / "adapter.safetensors"))
    ups = [v for k, v in tensors.items() if k.endswith("adapter.up.weight")]
    assert len(ups) == 30 and all(u.shape == (576, 256) for u in ups)
    assert any(float(u.abs().sum()) > 0 for u in ups)  # trained away from the zero init
