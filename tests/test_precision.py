"""The CPU-aware precision choice: both branches of the capability check, mocked."""

from __future__ import annotations

import pytest
import torch

from meft_ds import cli, precision

pytestmark = pytest.mark.unit
BF16 = {"bf16": {"enabled": True}, "zero_optimization": {"stage": 2}}


def _cpu(monkeypatch, bf16_isa: bool, amx: bool, level: str) -> None:
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: bf16_isa)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: level)


@pytest.mark.parametrize(("bf16_isa", "amx", "level", "native"), [
    (False, False, "AVX2", False),          # a common laptop / cloud CPU
    (False, False, "AVX512", False),        # AVX-512 without its bf16 extension
    (True, False, "AVX512", True),          # AVX512-BF16
    (False, True, "AVX512", True),          # AMX tiles
    (True, False, "AVX2", False),           # ATEN_CPU_CAPABILITY=avx2: AVX2 kernels run
])
def test_native_bf16_needs_the_instructions_and_the_kernels(monkeypatch, bf16_isa, amx, level,
                                                             native) -> None:
    _cpu(monkeypatch, bf16_isa, amx, level)
    assert precision.cpu_native_bf16() is native


def test_auto_uses_fp32_on_a_cpu_without_native_bf16_and_says_so(monkeypatch) -> None:
    _cpu(monkeypatch, False, False, "AVX2")
    ds, note = precision.resolve(BF16, "auto", cuda=False)
    assert ds["bf16"] == {"enabled": False} and BF16["bf16"] == {"enabled": True}
    assert note.startswith("precision: fp32, not the config's bf16: this CPU (AVX2)")
    assert "\n" not in note


def test_auto_keeps_bf16_where_it_is_native_or_on_cuda(monkeypatch) -> None:
    _cpu(monkeypatch, True, False, "AVX512")
    assert precision.resolve(BF16, "auto", cuda=False) == (BF16, None)
    _cpu(monkeypatch, False, False, "AVX2")
    assert precision.resolve(BF16, "auto", cuda=True) == (BF16, None)
    fp32 = {"bf16": {"enabled": False}}
    assert precision.resolve(fp32, "auto", cuda=False) == (fp32, None)


def test_an_explicit_choice_wins(monkeypatch) -> None:
    _cpu(monkeypatch, False, False, "AVX2")
    ds, note = precision.resolve(BF16, "bf16", cuda=False)
    assert ds["bf16"]["enabled"] is True and note is None
    ds, _ = precision.resolve({"fp16": {"enabled": True}}, "fp32", cuda=True)
    assert ds == {"bf16": {"enabled": False}}
    ds, _ = precision.resolve({"bfloat16": {"enabled": True}}, "fp32", cuda=False)
    assert ds == {"bf16": {"enabled": False}}


def test_precision_is_a_checked_option(tmp_path) -> None:
    import json

    from meft_ds.errors import UserError

    config = tmp_path / "c.json"
    config.write_text(json.dumps({"precision": "fp8"}))
    with pytest.raises(UserError, match="precision='fp8' is not one of auto, bf16, fp32"):
        cli.parse(["--deepspeed", "ds_configs/cpu.json", "--config", str(config)])
    assert cli.parse(["--deepspeed", "ds_configs/24gb.json", "--precision", "fp32"]
                     ).train.precision == "fp32"


@pytest.mark.unit
def test_cast_parameters_computes_as_from_pretrained_in_that_dtype(tmp_path) -> None:
    """An fp32 model cast for inference computes exactly as ``from_pretrained(dtype=bf16)``
    (and as DeepSpeed's bf16 engine): parameters in bf16, the rotary frequencies fp32."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=97,
                         rope_theta=10000.0)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    reference = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    cast = precision.cast_parameters(LlamaForCausalLM.from_pretrained(tmp_path), torch.bfloat16)
    assert {p.dtype for p in cast.parameters()} == {torch.bfloat16}
    assert cast.model.rotary_emb.inv_freq.dtype == torch.float32
    ids = torch.randint(0, 97, (2, 40))
    with torch.no_grad():
        assert torch.equal(cast.eval()(ids).logits, reference(ids).logits)
