"""Exports other tools load: LoRA in PEFT's format, full fine-tuning as a transformers
model; meft_ds's own loader reads both, and LoRA adapters exported before the change."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import save_tiny_base

from meft_ds import export, methods, options
from meft_ds.config import TrainConfig
from meft_ds.inference import load_adapted
from meft_ds.methods.base import Method
from meft_ds.models import loader
from meft_ds.trainer import lm_loss


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> Path:
    """A tiny random LLaMA saved as a model directory, with SmolLM2's tokenizer."""
    return save_tiny_base(tmp_path_factory.mktemp("base"))


def _trained(name: str, base: Path, **opts) -> tuple[Method, torch.nn.Module]:
    """The method applied to the base model, trained a few steps."""
    cls = methods.get(name)
    method = cls(options.build(cls.Options, opts), None)
    module = method.apply(loader.load_model(str(base)).model)
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    torch.manual_seed(1)
    ids = torch.randint(0, 128, (2, 10))
    for _ in range(3):
        lm_loss(method.forward(module, ids, torch.ones_like(ids)), ids).backward()
        optimizer.step()
        optimizer.zero_grad()
    return method, module.eval()


def _export(method: Method, module: torch.nn.Module, base: Path, out: Path) -> None:
    """Export as the launcher does (one process, ZeRO stage 0)."""
    engine = SimpleNamespace(module=module, zero_optimization_stage=lambda: 0)
    cfg = TrainConfig(method=method.name, model=str(base), prompt_format="chat")
    export.save_adapter(method, engine, out, cfg, method.options,
                        loader.load_tokenizer(str(base)))


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


@pytest.mark.unit
def test_lora_export_loads_with_peft_and_with_meft_ds(tiny_base: Path, tmp_path: Path) -> None:
    from peft import PeftModel
    from peft.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME
    from transformers import AutoModelForCausalLM

    method, module = _trained("lora", tiny_base, lora_r=4, lora_dropout=0.0)
    out = tmp_path / "adapter"
    _export(method, module, tiny_base, out)
    assert (CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME) == (export.CONFIG, export.PEFT_WEIGHTS)
    peft_config = json.loads((out / CONFIG_NAME).read_text())
    assert peft_config["peft_type"] == "LORA" and peft_config["r"] == 4
    ids = torch.randint(0, 128, (3, 9))
    want = _logits(module, ids)
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), out)
    torch.testing.assert_close(_logits(peft_model.eval(), ids), want, rtol=0, atol=1e-6)
    # meft_ds's own loader: the metadata in meft_ds.json, the weights PEFT's
    meta = json.loads((out / export.META).read_text())
    assert (meta["method"], meta["model"], meta["prompt_format"]) == ("lora", str(tiny_base),
                                                                      "chat")
    adapted = load_adapted(out)
    mask = torch.ones_like(ids)
    torch.testing.assert_close(adapted.logits(ids, mask), want, rtol=0, atol=1e-6)
    assert adapted.config["prompt_format"] == "chat" and adapted.config["dtype"] == "fp32"
    fresh = load_adapted(out, weights=False)  # as before training: the base model's logits
    torch.testing.assert_close(fresh.logits(ids, mask), _logits(
        AutoModelForCausalLM.from_pretrained(tiny_base), ids), rtol=0, atol=1e-6)
    # an adapter exported before PEFT's format: module parameter names + adapter_config.json
    old = tmp_path / "old"
    old.mkdir()
    Method.save_export(method, module, Method.trainable_state(method, module), old, None)
    (old / export.CONFIG).write_text((out / export.META).read_text())
    torch.testing.assert_close(load_adapted(old).logits(ids, mask), want, rtol=0, atol=1e-6)
    # a PEFT file with a tensor of the wrong shape or lacking one: one line
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(out / export.PEFT_WEIGHTS))
    key = next(iter(tensors))
    for damaged, message in (({**tensors, key: tensors[key][:1]}, "has shape"),
                             (dict(list(tensors.items())[1:]), "lacks 1 of")):
        save_file(damaged, str(out / export.PEFT_WEIGHTS))
        with pytest.raises(export.UserError, match=message):
            load_adapted(out)


@pytest.mark.unit
def test_full_export_is_a_transformers_model(tiny_base: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    method, module = _trained("full", tiny_base)
    out = tmp_path / "adapter"
    (out / "stale").mkdir(parents=True)  # an earlier export's files do not stay
    _export(method, module, tiny_base, out)
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            export.META} <= names
    assert export.CONFIG not in names and "stale" not in names  # not a PEFT adapter
    ids = torch.randint(0, 128, (3, 9))
    want = _logits(module, ids)
    model = AutoModelForCausalLM.from_pretrained(out)
    torch.testing.assert_close(_logits(model.eval(), ids), want, rtol=0, atol=0)
    text = "Question: who wrote it?\nAnswer:"
    assert AutoTokenizer.from_pretrained(out)(text)["input_ids"] == loader.load_tokenizer(
        str(tiny_base))(text)["input_ids"]
    adapted = load_adapted(out)
    torch.testing.assert_close(adapted.logits(ids, torch.ones_like(ids)), want, rtol=0, atol=0)
    assert adapted.config["method"] == "full"
    # weights=False: the base model the run started from
    base = load_adapted(out, weights=False)
    torch.testing.assert_close(base.logits(ids, torch.ones_like(ids)), _logits(
        AutoModelForCausalLM.from_pretrained(tiny_base), ids), rtol=0, atol=0)
    (out / "model.safetensors").unlink()
    with pytest.raises(export.UserError, match="is not an exported adapter"):
        load_adapted(out)


@pytest.mark.unit
@pytest.mark.parametrize("name", ["lora", "full"])
def test_evaluator_reads_the_recorded_prompt_format_of_any_layout(name, tiny_base, tmp_path):
    from meft_ds.evaluate_cli import _adapter_meta

    method, module = _trained(name, tiny_base)
    _export(method, module, tiny_base, tmp_path / "out")
    meta = _adapter_meta(str(tmp_path / "out"))
    assert meta["prompt_format"] == "chat" and meta["method"] == name
    assert _adapter_meta(str(tmp_path / "missing")) == {}


@pytest.mark.unit
def test_sparse_export_from_before_the_router_multiplier_loads_as_trained(tiny_base, tmp_path):
    """An export whose options predate --sparse_router_lr_ratio was trained without the
    multiplier: it loads with 1, not today's default, and gives the trained logits."""
    paper = {"sparse_rank": 32, "sparse_experts": 4, "sparse_top_k": 4,
             "sparse_optimizer": "torch", "sparse_router_lr_ratio": 1.0}
    method, module = _trained("sparse", tiny_base, **paper)
    _export(method, module, tiny_base, tmp_path / "out")
    config = tmp_path / "out" / export.CONFIG
    meta = json.loads(config.read_text())
    del meta["options"]["sparse_router_lr_ratio"]
    config.write_text(json.dumps(meta))
    ids = torch.randint(0, 128, (2, 7))
    adapted = load_adapted(tmp_path / "out")
    assert adapted.method.options.sparse_router_lr_ratio == 1.0
    torch.testing.assert_close(adapted.logits(ids, torch.ones_like(ids)), _logits(module, ids))


@pytest.mark.unit
def test_sparse_context_routing_export_loads_as_trained(tiny_base, tmp_path):
    """The launcher's export carries context routing's centres (fp32 under a bf16 load);
    one whose options predate --sparse_route loads routed by token, as trained then."""
    tiny = {"sparse_rank": 32, "sparse_experts": 4, "sparse_top_k": 4,
            "sparse_optimizer": "torch"}
    ids = torch.randint(0, 128, (2, 7))
    for route in ("context", "token"):
        method, module = _trained("sparse", tiny_base, **tiny, sparse_route=route)
        out = tmp_path / route
        _export(method, module, tiny_base, out)
        if route == "token":
            config = out / export.CONFIG
            meta = json.loads(config.read_text())
            del meta["options"]["sparse_route"]
            config.write_text(json.dumps(meta))
        adapted = load_adapted(out)
        assert adapted.method.options.sparse_route == route
        torch.testing.assert_close(adapted.logits(ids, torch.ones_like(ids)),
                                   _logits(module, ids))
