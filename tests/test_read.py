"""READ (``--method read``) on the real SmolLM2-135M: identity at step 0, no backbone
gradients, training under DeepSpeed, checkpoints, cached decoding, bad input."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import subprocess_env

from meft_ds import methods
from meft_ds.errors import UserError
from meft_ds.models import arch
from meft_ds.options import build
from meft_ds.read.adapter import read_layer_ids

TEXTS = [
    "Question: who wrote the novel Moby-Dick? Answer: Herman Melville",
    "Question: what is the capital city of Australia? Answer: Canberra",
    "Question: which planet is known as the red planet? Answer: Mars",
    "Question: who painted the ceiling of the Sistine Chapel? Answer: Michelangelo",
]


def make_method(model, **values):
    cls = methods.get("read")
    return cls(build(cls.Options, values), model.config)


def applied(model, **values):
    """A deep copy of ``model`` with READ installed, and its method."""
    method = make_method(model, **values)
    return method, method.apply(copy.deepcopy(model))


def backbone_params(module):
    return [(n, p) for n, p in module.named_parameters() if "read_adapter" not in n]


def randomise_output(module, seed: int = 0) -> None:
    """Give the zero-initialised output projection trained-looking weights."""
    gen = torch.Generator().manual_seed(seed)
    out = arch.causal_lm(module).read_adapter.network.out.weight
    with torch.no_grad():
        out.copy_(torch.randn(out.shape, generator=gen) * 0.05)


def lm_loss(logits, input_ids, attention_mask):
    labels = input_ids[:, 1:].masked_fill(attention_mask[:, 1:] == 0, -100)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten())


@pytest.fixture(scope="module")
def batch(smollm2):
    tok = smollm2.tokenizer
    enc = tok(TEXTS, return_tensors="pt", padding=True)
    return enc["input_ids"], enc["attention_mask"]


@pytest.fixture(scope="module")
def read_model(smollm2):
    """SmolLM2 with READ (width 32) installed; tests must not train it."""
    return applied(smollm2.model, read_hidden=32)


# --- options and bad input ---------------------------------------------------------------
@pytest.mark.unit
@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"read_hidden": 0}, "read_hidden must be > 0, got 0"),
        ({"read_hidden": -4}, "read_hidden must be > 0, got -4"),
        ({"read_stride": 0}, "read_stride must be >= 1, got 0"),
        ({"read_cell": "lstm"}, "read_cell must be one of gru, rnn"),
    ],
)
def test_bad_options_raise_one_line(values, message):
    with pytest.raises(UserError) as info:
        build(methods.get("read").Options, values)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.unit
def test_stride_beyond_model_depth_is_a_user_error(smollm2):
    method = make_method(smollm2.model, read_stride=31)
    message = r"read_stride 31 is outside the model \(it has 30 layers\)"
    with pytest.raises(UserError, match=message):
        method.check_model(smollm2.model)
    make_method(smollm2.model, read_stride=30).check_model(smollm2.model)


@pytest.mark.unit
def test_read_layer_ids_count_back_from_the_last_layer():
    assert read_layer_ids(30, 1) == list(range(30))
    assert read_layer_ids(30, 4) == [1, 5, 9, 13, 17, 21, 25, 29]
    assert read_layer_ids(30, 30) == [29]


# --- identity, gradients, no_grad backbone -----------------------------------------------
@pytest.mark.unit
def test_step0_logits_equal_base_model(smollm2, read_model, batch):
    method, module = read_model
    ids, mask = batch
    with torch.no_grad():
        base = smollm2.model(input_ids=ids, attention_mask=mask).logits
    logits = method.forward(module, ids, mask)
    assert logits.requires_grad  # the correction path is live even though it is zero
    assert torch.equal(logits.detach(), base)


@pytest.mark.unit
def test_only_read_parameters_train_and_count_is_independent_of_depth(smollm2, read_model):
    _, module = read_model
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("read_adapter.network.") for n in trainable)
    assert not any(p.requires_grad for _, p in backbone_params(module))
    # joiner (d*r + r + r*r) + GRU (2 * 3 * (r*r + r)) + output (r*d), d=576, r=32
    d, r = 576, 32
    expected = d * r + r + r * r + 6 * (r * r + r) + r * d
    assert sum(p.numel() for p in module.parameters() if p.requires_grad) == expected
    _, strided = applied(smollm2.model, read_hidden=32, read_stride=7)
    assert sum(p.numel() for p in strided.parameters() if p.requires_grad) == expected


@pytest.mark.unit
def test_backbone_runs_without_grad_and_gets_no_gradient(read_model, batch):
    method, module = read_model
    randomise_output(module)
    ids, mask = batch
    seen: list[tuple[bool, bool]] = []

    def record(mod, args, output):
        seen.append((torch.is_grad_enabled(), output.requires_grad))

    blocks = arch.layers(module)
    handles = [blocks[i].mlp.register_forward_hook(record) for i in (0, 15, 29)]
    network = arch.causal_lm(module).read_adapter.network
    try:
        logits = method.forward(module, ids, mask)
        lm_loss(logits, ids, mask).backward()
        grads = {n: p.grad for n, p in network.named_parameters()}
    finally:
        for handle in handles:
            handle.remove()
        network.zero_grad(set_to_none=True)
        with torch.no_grad():
            network.out.weight.zero_()
    assert seen == [(False, False)] * 3  # gradients off inside every layer ...
    assert torch.is_grad_enabled()  # ... and the caller's mode restored afterwards
    assert all(p.grad is None for _, p in backbone_params(module))
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values()), [
        n for n, g in grads.items() if g is None or g.abs().sum() == 0
    ]


@pytest.mark.unit
def test_grad_mode_restored_when_a_layer_fails(read_model, batch):
    _, module = read_model

    def explode(mod, args):
        raise RuntimeError("boom")

    handle = arch.layers(module)[3].register_forward_pre_hook(explode)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            module(input_ids=batch[0], attention_mask=batch[1])
    finally:
        handle.remove()
    assert torch.is_grad_enabled()


@pytest.mark.unit
def test_stride_reads_every_mth_layer(smollm2, batch):
    method, module = applied(smollm2.model, read_hidden=16, read_stride=4)
    calls = []
    network = arch.causal_lm(module).read_adapter.network
    network.cell.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        method.forward(module, *batch)
    assert len(calls) == len(read_layer_ids(30, 4)) == 8


@pytest.mark.unit
def test_cached_decoding_matches_full_forward(read_model, batch):
    """READ is per position, so KV-cached decoding (generate) includes the correction."""
    _, module = read_model
    randomise_output(module, seed=1)
    ids = batch[0][:1, :12]
    try:
        with torch.no_grad():
            full = module(input_ids=ids).logits[0, -1]
            first = module(input_ids=ids[:, :-1], use_cache=True)
            step = module(input_ids=ids[:, -1:], past_key_values=first.past_key_values).logits
            module.read_adapter.remove()
            plain = module(input_ids=ids).logits[0, -1]
    finally:
        module.read_adapter.install(module)
        with torch.no_grad():
            module.read_adapter.network.out.weight.zero_()
    torch.testing.assert_close(step[0, -1], full, atol=1e-4, rtol=1e-4)
    assert (full - plain).abs().max() > 1e-2  # the correction is really there


@pytest.mark.integration
def test_bf16_backbone_step0_and_backward(smollm2, batch):
    method, module = applied(smollm2.model, read_hidden=16)
    module.to(torch.bfloat16)
    ids, mask = batch[0][:2, :8], batch[1][:2, :8]
    with torch.no_grad():
        base_model = copy.deepcopy(smollm2.model).to(torch.bfloat16)
        base = base_model(input_ids=ids, attention_mask=mask).logits
    del base_model
    logits = method.forward(module, ids, mask)
    assert logits.dtype == torch.bfloat16
    assert torch.equal(logits.detach(), base)
    lm_loss(logits, ids, mask).backward()
    out = arch.causal_lm(module).read_adapter.network.out.weight
    assert out.grad is not None and out.grad.dtype == torch.bfloat16 and out.grad.abs().sum() > 0


# --- DeepSpeed training, checkpoints, exported weights --------------------------------
def _engine(module, lr: float):
    import deepspeed

    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    config = {"train_micro_batch_size_per_gpu": len(TEXTS), "gradient_accumulation_steps": 1}
    engine, *_ = deepspeed.initialize(model=module, optimizer=optimizer, config=config)
    return engine


@pytest.mark.integration
def test_deepspeed_training_lowers_loss_and_checkpoint_roundtrip(smollm2, batch, tmp_path):
    torch.manual_seed(0)
    method, module = applied(smollm2.model, read_hidden=64)
    engine = _engine(module, lr=3e-3)
    ids, mask = batch
    losses = []
    for _ in range(30):
        loss = lm_loss(method.forward(engine, ids, mask), ids, mask)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
    assert all(torch.equal(p, q) for (_, p), (_, q) in zip(
        backbone_params(module), smollm2.model.named_parameters(), strict=True
    ))
    engine.save_checkpoint(str(tmp_path), tag="t30")
    with torch.no_grad():
        trained = method.forward(engine, ids, mask)

    # Resume into a fresh model through DeepSpeed's checkpoint.
    method2, module2 = applied(smollm2.model, read_hidden=64)
    engine2 = _engine(module2, lr=3e-3)
    engine2.load_checkpoint(str(tmp_path), tag="t30")
    with torch.no_grad():
        torch.testing.assert_close(method2.forward(engine2, ids, mask), trained)

    # Exported adapter weights alone reproduce the trained model.
    state = method.trainable_state(module)
    assert all(k.startswith("read_adapter.network.") for k in state)
    method3, module3 = applied(smollm2.model, read_hidden=64)
    method3.load_trainable_state(module3, state)
    with torch.no_grad():
        torch.testing.assert_close(method3.forward(module3, ids, mask), trained)


# --- the launcher ------------------------------------------------------------------
ROOT = Path(__file__).resolve().parents[1]


def launch(*args: str) -> subprocess.CompletedProcess:
    env = {**subprocess_env(), "HF_HUB_OFFLINE": "1"}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_PORT"):
        env.pop(key, None)
    return subprocess.run(
        [sys.executable, str(ROOT / "launch" / "train.py"), *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )


@pytest.mark.multiprocess
def test_launcher_trains_resumes_and_exports_read(tmp_path, batch):
    out = tmp_path / "run"
    common = [
        "--deepspeed", "ds_configs/cpu.json", "--method", "read", "--read_hidden", "32",
        "--read_stride", "2", "--train_examples", "8", "--eval_trained", "2",
        "--eval_heldout", "0", "--max_new_tokens", "3", "--progress", "false",
        "--output_dir", str(out),
    ]
    first = launch(*common, "--max_steps", "3")
    assert first.returncode == 0, first.stderr[-3000:]
    second = launch(*common, "--max_steps", "5", "--resume")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from step 3" in second.stdout
    results = json.loads((out / "results.json").read_text())
    assert results["method"] == "read" and results["steps"] == 5
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    assert all(r["grad_norm"] > 0 for r in records)  # gradients reach the READ network

    from meft_ds.inference import load_adapted

    adapted = load_adapted(out / "adapter")
    assert adapted.config["options"] == {"read_hidden": 32, "read_cell": "gru", "read_stride": 2}
    out_weight = arch.causal_lm(adapted.module).read_adapter.network.out.weight
    assert out_weight.abs().sum() > 0  # trained, no longer the zero initialisation
    assert adapted.logits(*batch).shape[:2] == batch[0].shape


@pytest.mark.multiprocess
@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--read_hidden", "0"], "error: read_hidden must be > 0, got 0"),
        (["--read_stride", "31"], "error: read_stride 31 is outside the model (it has 30 layers)"),
    ],
)
def test_launcher_bad_input_exits_2_with_one_line(tmp_path, flags, message):
    result = launch(
        "--deepspeed", "ds_configs/cpu.json", "--method", "read", "--progress", "false",
        "--output_dir", str(tmp_path), *flags,
    )
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [message]
    assert "Traceback" not in result.stderr
    assert "Loading weights" not in result.stderr  # refused from the config, before loading


@pytest.mark.unit
def test_gradient_checkpointing_flag_changes_nothing(smollm2):
    """The launcher may enable HF checkpointing first; READ's gradients must not change."""
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)

    def read_grads(checkpointing: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        base = copy.deepcopy(smollm2.model)
        if checkpointing:
            base.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        method = make_method(base, read_hidden=16)
        module = method.apply(base)
        module.train()
        randomise_output(module)
        lm_loss(method.forward(module, ids, mask), ids, mask).backward()
        return [p.grad for p in arch.causal_lm(module).read_adapter.network.parameters()]

    plain, checkpointed = read_grads(False), read_grads(True)
    for a, b in zip(plain, checkpointed, strict=True):
        torch.testing.assert_close(a, b)
