"""The library API (meft_ds.api): PEFT-style wrappers, state dicts that hold the row store,
the row optimizer, exports in the launcher's format."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import save_tiny_base, tiny_llama
from safetensors.torch import load_file, save_file
from transformers.modeling_outputs import CausalLMOutputWithPast

import meft_ds
from meft_ds import eval as meval
from meft_ds.errors import UserError
from meft_ds.inference import load_adapted
from meft_ds.models import loader
from meft_ds.trainer import lm_loss

pytestmark = pytest.mark.unit

SPARSE = dict(sparse_rank=32, sparse_experts=4, sparse_top_k=4, sparse_optimizer="torch")
CONFIGS = {
    "sparse": lambda: meft_ds.SparseConfig(**SPARSE),
    "sparse_reversible": lambda: meft_ds.SparseConfig(**SPARSE, reversible=True),
    "sparse_noattn": lambda: meft_ds.SparseConfig(**SPARSE, sparse_attn_lora_r=0),
    "reversible": lambda: meft_ds.ReversibleConfig(rev_adapter_size=8),
    "read": lambda: meft_ds.ReadConfig(read_hidden=16),
}


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    return save_tiny_base(tmp_path_factory.mktemp("base"))


def _model(kind: str, base=None, **config) -> meft_ds.MeftModel:
    config = CONFIGS[kind]() if not config else meft_ds.SparseConfig(**{**SPARSE, **config})
    base = tiny_llama() if base is None else base
    return meft_ds.get_meft_model(base, kind.split("_")[0], config)


def _batch(seed: int = 1) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 128, (2, 9), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def _train(model: meft_ds.MeftModel, steps: int = 2, max_norm: float = 0.0) -> None:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(steps):
        model(**_batch(step)).loss.backward()
        _, coef = model.clip_grad_norm_(max_norm)
        optimizer.step()
        optimizer.zero_grad()
        if model.has_row_store:
            model.row_optimizer().step(1e-2, clip_coef=coef)


def _store(model: meft_ds.MeftModel) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.method.external_state(optimizer=True).items()}


def _assert_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_importing_meft_ds_is_light_and_exports_the_api() -> None:
    code = ("import sys, meft_ds; assert 'torch' not in sys.modules, 'torch imported'; "
            "missing = [n for n in meft_ds.__all__ if getattr(meft_ds, n) is None]; "
            "assert not missing, missing")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    assert {"get_sparse_model", "get_reversible_model", "get_read_model", "SparseConfig",
            "ReversibleConfig", "ReadConfig", "MeftModel"} <= set(meft_ds.__all__)


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_forward_returns_the_launchers_logits_and_loss(kind: str) -> None:
    model = _model(kind)
    batch = _batch()
    out = model(**batch)
    assert isinstance(out, CausalLMOutputWithPast)
    logits = model.method.forward(model.model, batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(out.logits, logits, rtol=0, atol=0)
    assert torch.equal(out.loss, lm_loss(logits, batch["labels"]))
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("kind", ["reversible", "sparse_reversible", "sparse", "sparse_noattn",
                                  "read"])
def test_generate_decodes_as_the_launchers_evaluation(kind: str, base_dir: Path) -> None:
    """Greedy ``generate`` gives the answers of the launcher's evaluation (the transformers
    model or, for reversible models, the ReversibleLM it generates with, KV cache on); for
    reversible models also those of a loop recomputing every prefix through the method's
    forward (no cache), left padding included."""
    model = _model(kind, loader.load_model(str(base_dir)).model)
    _train(model)
    model.eval()
    tokenizer = loader.load_tokenizer(str(base_dir))
    prompts = ["Question: who wrote it?\nAnswer:", "Question: where?\nAnswer:"]

    def logits(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return model(ids, mask).logits

    launcher = model.method.generation_model(model.model)
    assert launcher is not None
    want = meval.generate(logits, tokenizer, prompts, 5, 2, progress=False, hf_model=launcher)
    got = meval.generate(logits, tokenizer, prompts, 5, 2, progress=False, hf_model=model)
    assert got == want
    if "reversible" in kind:
        assert meval.generate(logits, tokenizer, prompts, 5, 2, progress=False) == want


def test_state_dict_holds_the_rows_and_tied_weights_once(tmp_path: Path) -> None:
    """``state_dict()`` carries the store's rows and each tied tensor once (so safetensors
    writes it); a fresh model loading it computes the trained logits; without the rows,
    they are missing keys."""
    def tied() -> torch.nn.Module:
        base = tiny_llama()
        base.config.tie_word_embeddings = True
        base.tie_weights()
        return base

    model = _model("sparse", tied())
    _train(model)
    state = model.state_dict()
    assert "sparse_store.layer1.weight" in state and "model.lm_head.weight" not in state
    save_file(state, str(tmp_path / "model.safetensors"))
    batch = _batch(5)
    for saved in (load_file(str(tmp_path / "model.safetensors")),
                  torch.load(io.BytesIO(_saved(state)), weights_only=True)):
        fresh = _model("sparse", tied())
        fresh.load_state_dict(saved)
        torch.testing.assert_close(fresh(**batch).logits, model(**batch).logits, rtol=0, atol=0)
    without_rows = {k: v for k, v in state.items() if not k.startswith("sparse_store.")}
    result = fresh.load_state_dict(without_rows, strict=False)
    assert sorted(result.missing_keys) == [f"sparse_store.layer{i}.weight" for i in range(3)]
    with pytest.raises(RuntimeError, match="sparse_store.layer0.weight"):
        fresh.load_state_dict(without_rows)


def test_row_optimizer_state_resumes_bit_for_bit() -> None:
    """Model and row-optimizer state dicts restore a run: the next steps equal the
    uninterrupted run's; ``adapter_state_dict(with_optimizer_state=True)`` does the same."""
    model = _model("sparse")
    _train(model)
    rows = model.row_optimizer()
    assert rows.lr_ratio == 3.0 and rows.betas == (0.9, 0.999) and rows.weight_decay == 3.0
    saved = torch.load(io.BytesIO(_saved({"model": model.state_dict(),
                                          "rows": rows.state_dict()})), weights_only=True)
    adapter = model.adapter_state_dict(with_optimizer_state=True)
    assert "sparse_store.layer0.exp_avg" in adapter and "sparse_store.layer0.steps" in adapter
    resumed, from_adapter = _model("sparse"), _model("sparse")
    resumed.load_state_dict(saved["model"])
    resumed.row_optimizer().load_state_dict(saved["rows"])
    from_adapter.load_adapter_state_dict(adapter)
    for run in (model, resumed, from_adapter):
        _train(run, steps=1)
    _assert_equal(_store(resumed), _store(model))
    _assert_equal(_store(from_adapter), _store(model))


def _saved(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def test_loss_scale_and_global_clipping_reach_the_rows() -> None:
    """Under a GradScaler the rows step as without it (its scale divided out), and global
    clipping counts and clips the rows with the routers."""
    plain, scaled = _model("sparse"), _model("sparse")
    opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
            for m in (plain, scaled)]
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    batch = _batch()
    plain(**batch).loss.backward()
    router_sq = sum(float(p.grad.pow(2).sum()) for p in plain.parameters() if p.grad is not None)
    rows_sq = plain.row_optimizer().extra_grad_sq_norm()
    norm, coef = plain.clip_grad_norm_(0.1)
    assert rows_sq > 0 and norm == pytest.approx((router_sq + rows_sq) ** 0.5, rel=1e-6)
    assert coef == pytest.approx(0.1 / norm, rel=1e-5)
    opts[0].step()
    plain.row_optimizer().step(1e-2, clip_coef=coef)

    scaler.scale(scaled(**batch).loss).backward()
    scaler.unscale_(opts[1])
    scale = scaler.get_scale()
    assert scaled.row_optimizer().extra_grad_sq_norm(scale) == pytest.approx(rows_sq, rel=1e-6)
    norm_s, coef_s = scaled.clip_grad_norm_(0.1, loss_scale=scale)
    assert (norm_s, coef_s) == pytest.approx((norm, coef), rel=1e-6)
    scaler.step(opts[1])
    scaled.row_optimizer().step(1e-2, loss_scale=scale, clip_coef=coef_s)
    scaler.update()
    for key, value in _store(scaled).items():
        torch.testing.assert_close(value, _store(plain)[key], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kind", ["sparse", "sparse_noattn", "reversible", "read"])
def test_save_pretrained_writes_the_launchers_export(kind: str, base_dir: Path,
                                                     tmp_path: Path) -> None:
    """``save_pretrained`` -> ``MeftModel.from_pretrained`` and the launcher's own loader
    (``load_adapted``, as evaluate.py) both rebuild the trained model."""
    model = _model(kind, loader.load_model(str(base_dir)).model)
    _train(model)
    model.eval()
    model.save_pretrained(tmp_path / "adapter")
    again = meft_ds.MeftModel.from_pretrained(loader.load_model(str(base_dir)).model,
                                              tmp_path / "adapter").eval()
    adapted = load_adapted(tmp_path / "adapter")
    batch = _batch(3)
    with torch.no_grad():
        want = model(**batch).logits
        torch.testing.assert_close(again(**batch).logits, want, rtol=0, atol=0)
        torch.testing.assert_close(adapted.logits(batch["input_ids"], batch["attention_mask"]),
                                   want, rtol=0, atol=0)


def test_attention_lora_sits_on_the_adapted_layers_and_old_exports_load_without(
        base_dir: Path, tmp_path: Path) -> None:
    """``sparse_attn_lora_r``: LoRA on q/k/v/o of the sparse layers only, zero at step 0; an
    export written before the option existed loads as it was (no attention LoRA)."""
    base = tiny_llama()
    ids = _batch()["input_ids"]
    with torch.no_grad():
        want = base(input_ids=ids).logits
    model = meft_ds.get_sparse_model(base, meft_ds.SparseConfig(
        **SPARSE, layer_start=1, sparse_attn_lora_r=4, sparse_lora_targets="attention"))
    lora = [n for n, p in model.named_parameters() if p.requires_grad and "lora_" in n]
    assert len(lora) == 2 * 4 * 2  # layers 1, 2 x q, k, v, o x A, B
    assert {n.split(".layers.")[1].split(".")[0] for n in lora} == {"1", "2"}
    assert {n.split(".self_attn.")[1].split(".")[0] for n in lora} == {
        "q_proj", "k_proj", "v_proj", "o_proj"}
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, want)

    old = _model("sparse", loader.load_model(str(base_dir)).model, sparse_attn_lora_r=0)
    _train(old)
    old.eval().save_pretrained(tmp_path / "old")
    config = tmp_path / "old" / "adapter_config.json"
    meta = json.loads(config.read_text())
    del meta["options"]["sparse_attn_lora_r"]
    config.write_text(json.dumps(meta))
    again = meft_ds.MeftModel.from_pretrained(loader.load_model(str(base_dir)).model,
                                              tmp_path / "old").eval()
    assert not any("lora_" in n for n, _ in again.named_parameters())
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, old(input_ids=ids).logits)


def test_lora_on_all_projections_exports_and_loads(base_dir: Path, tmp_path: Path) -> None:
    """``sparse_lora_targets all`` (the default): the LoRA also adapts the FFN projections
    of the sparse layers (and only those), starts as the identity, and its export loads to
    the same logits; an export written before the option loads with the attention LoRA."""
    base = tiny_llama()
    ids = _batch()["input_ids"]
    with torch.no_grad():
        want = base(input_ids=ids).logits
    model = meft_ds.get_sparse_model(base, meft_ds.SparseConfig(
        **SPARSE, layer_start=1, sparse_attn_lora_r=4, sparse_lora_targets="all"))
    lora = [n for n, p in model.named_parameters() if p.requires_grad and "lora_" in n]
    assert len(lora) == 2 * 7 * 2  # layers 1, 2 x q, k, v, o, gate, up, down x A, B
    assert {n.split(".layers.")[1].split(".")[0] for n in lora} == {"1", "2"}
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in lora} == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, want)

    for targets, per_layer in (("all", 7), ("attention", 4)):
        flags = {} if targets == "all" else {"sparse_lora_targets": targets}
        trained = _model("sparse", loader.load_model(str(base_dir)).model,
                         sparse_attn_lora_r=4, **flags)
        _train(trained)
        trained.eval().save_pretrained(tmp_path / targets)
        if targets == "attention":  # as written before the option existed
            config = tmp_path / targets / "adapter_config.json"
            meta = json.loads(config.read_text())
            del meta["options"]["sparse_lora_targets"]
            config.write_text(json.dumps(meta))
        again = meft_ds.MeftModel.from_pretrained(loader.load_model(str(base_dir)).model,
                                                  tmp_path / targets).eval()
        assert sum("lora_" in n for n, _ in again.named_parameters()) == 3 * per_layer * 2
        with torch.no_grad():
            assert torch.equal(again(input_ids=ids).logits, trained(input_ids=ids).logits)


def test_read_map_starts_at_zero_trains_and_exports(base_dir: Path, tmp_path: Path) -> None:
    """``sparse_read_r``: the adapter's read map starts at zero (the same logits as without),
    trains (its up-projection moves once the values have), and its export loads to the same
    logits."""
    ids = _batch()["input_ids"]
    plain = _model("sparse", loader.load_model(str(base_dir)).model)
    model = _model("sparse", loader.load_model(str(base_dir)).model, sparse_read_r=4)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, plain(input_ids=ids).logits)
    ups = [n for n, p in model.named_parameters() if p.requires_grad and "read_up" in n]
    assert len(ups) == 3
    _train(model, steps=4)  # values start at 0: the map has a gradient from the 2nd step
    assert all(p.abs().sum() > 0 for n, p in model.named_parameters() if "read_up" in n)
    model.eval().save_pretrained(tmp_path / "read")
    again = meft_ds.MeftModel.from_pretrained(loader.load_model(str(base_dir)).model,
                                              tmp_path / "read").eval()
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, model(input_ids=ids).logits)


def test_misuse_is_refused_in_one_line() -> None:
    with pytest.raises(UserError, match="no row store"):
        _model("reversible").row_optimizer()
    with pytest.raises(TypeError, match="SparseMethodOptions"):
        meft_ds.get_sparse_model(tiny_llama(), meft_ds.ReversibleConfig())
    with pytest.raises(UserError, match="sparse_top_k"):
        meft_ds.get_sparse_model(tiny_llama(), meft_ds.SparseConfig(sparse_top_k=0))
    with pytest.raises(UserError, match="sparse_attn_lora_r must be >= 0, got -1"):
        meft_ds.get_sparse_model(tiny_llama(), meft_ds.SparseConfig(sparse_attn_lora_r=-1))
    with pytest.raises(UserError, match="sparse_read_r must be >= 0, got -2"):
        meft_ds.get_sparse_model(tiny_llama(), meft_ds.SparseConfig(sparse_read_r=-2))
    with pytest.raises(UserError, match="sparse_lora_targets='mlp'; choose one of attention, all"):
        meft_ds.get_sparse_model(tiny_llama(), meft_ds.SparseConfig(sparse_lora_targets="mlp"))


def test_parameter_groups_give_the_lora_its_decay_and_a_plain_optimizer_is_refused() -> None:
    """Without an option that groups them, the trainable parameters come as one plain list
    (as before the option); ``sparse_lora_weight_decay`` puts exactly the LoRA in a group
    of its own, and an optimizer built over ``model.parameters()`` is refused in one line."""
    plain = _model("sparse")
    assert all(isinstance(p, torch.nn.Parameter) for p in plain.parameter_groups())
    plain.check_optimizer(torch.optim.AdamW(plain.parameters(), lr=1e-2))
    model = _model("sparse", sparse_lora_weight_decay=0.5)
    groups = model.parameter_groups()
    assert [set(g) for g in groups] == [{"params", "weight_decay"}, {"params"}]
    assert groups[0]["weight_decay"] == 0.5
    lora = {id(p) for n, p in model.named_parameters() if "lora_" in n}
    assert lora and {id(p) for p in groups[0]["params"]} == lora
    assert not lora & {id(p) for p in groups[1]["params"]} and groups[1]["params"]
    model.check_optimizer(torch.optim.AdamW(groups, lr=1e-2))
    trainable = [p for p in model.parameters() if p.requires_grad]
    with pytest.raises(UserError, match=r"weight_decay=0\.5; build it over "
                                        r"model\.parameter_groups\(\)$"):
        model.check_optimizer(torch.optim.AdamW(trainable, lr=1e-2))
