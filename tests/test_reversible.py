"""Reversible adapters (MEFT1/2/3): exact gradients at full depth, step-0 fidelity, bad input."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_lambda_error
from transformers import LlamaConfig, LlamaForCausalLM

from meft_ds import cli, methods, options
from meft_ds.errors import UserError, cli_message
from meft_ds.memory import SavedTensorMeter
from meft_ds.reversible.model import ReversibleLM
from meft_ds.reversible.options import ReversibleOptions
from meft_ds.reversible.streams import LatticeStreams, RationalScale
from meft_ds.runner import run

ROOT = Path(__file__).resolve().parents[1]
CPU = str(ROOT / "ds_configs" / "cpu.json")


def _tiny(layers: int = 4) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config).eval()


def _perturb_adapters(model: ReversibleLM, seed: int = 1) -> None:
    """Non-zero adapter outputs, so every adapter parameter gets a gradient."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad and name.endswith("up.weight"):
                param.copy_(torch.randn(param.shape, generator=gen) * 0.02)


def _grads(model: ReversibleLM, ids: torch.Tensor, reversible: bool) -> dict[str, torch.Tensor]:
    model.reversible = reversible
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1234)  # same dropout masks in both runs
    logits = model(ids)
    logits.float().log_softmax(-1)[:, :-1].gather(-1, ids[:, 1:, None]).mean().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _rel(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    num = sum((a[k].double() - b[k].double()).pow(2).sum() for k in b)
    den = sum(b[k].double().pow(2).sum() for k in b)
    return float((num / den).sqrt())


# --- exactness at full depth (SmolLM2, 30 layers, dropout on) ---------------------------


@pytest.mark.integration
@pytest.mark.parametrize(
    ("variant", "compute", "attention"),
    [("meft1", "auto", "sdpa"), ("meft2", "auto", "sdpa"), ("meft3", "auto", "sdpa"),
     ("meft3", "bf16", "sdpa"), ("meft1", "auto", "eager")],
)
def test_gradients_equal_autograd_at_full_depth(smollm2, variant: str, compute: str,
                                                attention: str) -> None:
    """The reversible backward's gradients equal autograd's through all 30 layers, with
    either attention kernel (``--attn_implementation``) recomputed in backward."""
    opts = ReversibleOptions(rev_variant=variant, rev_adapter_dropout=0.1,
                             rev_compute_dtype=compute, rev_adapter_size=16)
    base = copy.deepcopy(smollm2.model)
    base.set_attn_implementation(attention)
    assert base.config._attn_implementation == attention
    model = ReversibleLM(base, opts).train()
    assert len(model.rev_layers) == 30
    _perturb_adapters(model)
    model.record_errors = True
    ids = torch.randint(0, 49152, (2, 10), generator=torch.Generator().manual_seed(0))
    rev = _grads(model, ids, reversible=True)
    errors = model.last_run.errors
    ref = _grads(model, ids, reversible=False)
    assert set(rev) == set(ref) and len(ref) > 60
    tol = 1e-5 if compute == "auto" else 1e-3
    assert _rel(rev, ref) <= tol
    # Every layer's inputs are reconstructed exactly (fixed-point fp64 streams).
    assert sorted(errors) == list(range(30))
    assert max(errors.values()) == 0.0
    # Dropout was active: another RNG state gives other logits.
    with torch.no_grad():
        torch.manual_seed(1)
        a = model(ids)
        torch.manual_seed(2)
        b = model(ids)
    assert not torch.equal(a, b)


@pytest.mark.unit
def test_float_streams_error_grows_and_restart_points_bound_it() -> None:
    model = ReversibleLM(_tiny(12), ReversibleOptions(
        rev_variant="meft3", rev_exact=False, rev_restart_every=0, rev_adapter_size=8))
    _perturb_adapters(model)
    model.record_errors = True
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    _grads(model, ids, reversible=True)
    free = dict(model.last_run.errors)
    assert free[0] > 1e6 * max(free[11], 1e-16)  # grows ~1/(λβ) per layer going down
    assert free[0] > 1.0
    model.options.rev_restart_every = 1
    _grads(model, ids, reversible=True)
    assert max(model.last_run.errors.values()) < 1e-5


@pytest.mark.unit
@pytest.mark.parametrize("shape", [(10000,), (3, 7, 5)])  # odd sizes: packing pads
def test_rational_scale_is_exactly_invertible(shape: tuple[int, ...]) -> None:
    gen = torch.Generator().manual_seed(0)
    a = torch.randint(-2**54, 2**54, shape, generator=gen)
    c = torch.randint(-2**50, 2**50, shape, generator=gen)
    n = a.numel()
    # value: remainders packed per byte (q**k <= 256)
    for value, per_byte in ((0.1, 2), (0.5, 8), (1 / 3, 5), (3 / 7, 2), (0.37, 1), (2.5, 8),
                            (1.0, None)):
        scale = RationalScale(value)
        y, rem = scale.mul_add(a, c)
        assert torch.equal(scale.inverse(y, c, rem), a)
        if per_byte is None:
            assert rem is None
        else:
            assert rem.dtype == torch.uint8 and rem.numel() == -(-n // per_byte)
    assert (RationalScale(0.1).p, RationalScale(0.1).q) == (1, 10)


@pytest.mark.unit
def test_lattice_rejects_values_outside_its_range() -> None:
    streams = LatticeStreams()
    streams.quantize(torch.tensor([1.0, float("inf")]))
    with pytest.raises(FloatingPointError, match="`rev_exact` false"):
        streams.check()


# --- step 0 -------------------------------------------------------------------------


@pytest.mark.integration
def test_step0_output_close_to_base_model(smollm2) -> None:
    tok = smollm2.tokenizer
    ids = tok(["The capital of France is Paris. Many tourists visit it every year to see "
               "the Eiffel Tower."], return_tensors="pt").input_ids
    with torch.no_grad():
        base = smollm2.model(input_ids=ids).logits.log_softmax(-1)
    kl: dict[tuple[str, bool], float] = {}
    for variant in ("meft1", "meft2", "meft3"):
        for center in (True, False):
            opts = ReversibleOptions(rev_variant=variant, rev_center=center)
            model = ReversibleLM(copy.deepcopy(smollm2.model), opts).eval()
            with torch.no_grad():
                out = model(ids).log_softmax(-1)
            kl[variant, center] = float((base.exp() * (base - out)).sum(-1).mean())
            if center:
                agree = (out.argmax(-1) == base.argmax(-1)).float().mean()
                assert agree >= 0.8, (variant, float(agree))
    for variant in ("meft1", "meft2", "meft3"):
        assert kl[variant, True] < 0.2
        assert kl[variant, True] < 0.1 * kl[variant, False]


@pytest.mark.unit
def test_tiny_lambda_reproduces_base_model_exactly_enough() -> None:
    assert tiny_lambda_error(_tiny(4), torch.randint(0, 128, (2, 8))) < 0.02


# --- layer ranges ---------------------------------------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize("position", ["top", "bottom"])
def test_partial_stacks_train_only_their_layers(position: str) -> None:
    model = ReversibleLM(_tiny(6), ReversibleOptions(
        rev_variant="meft1", rev_layers=2, rev_position=position, rev_adapter_size=8))
    _perturb_adapters(model)
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    rev, ref = _grads(model, ids, True), _grads(model, ids, False)
    assert _rel(rev, ref) <= 1e-5
    assert list(model.span) == ([4, 5] if position == "top" else [0, 1])
    assert all(not p.requires_grad for p in model.lm.parameters())
    if position == "top":
        # Layers below the stack keep nothing: each extra MEFT1 layer adds exactly its
        # λ remainders, two to a byte (β = 1 needs none).
        saved = []
        for k in (2, 6):
            top = ReversibleLM(_tiny(6), ReversibleOptions(rev_variant="meft1", rev_layers=k))
            meter = SavedTensorMeter()
            with meter.record():
                top(ids)
            saved.append(meter.total_bytes)
        assert saved[1] - saved[0] == 4 * ids.numel() * 32 // 2


@pytest.mark.unit
def test_kept_top_layers_store_activations_with_the_same_gradients() -> None:
    """rev_keep_top: the top layers run with plain autograd on top of the reversible
    stack; gradients equal the all-reversible backward's, saved bytes grow per kept layer."""
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    grads, saved = {}, {}
    for keep in (0, 1, 3):
        model = ReversibleLM(_tiny(6), ReversibleOptions(rev_keep_top=keep,
                                                         rev_adapter_dropout=0.1)).train()
        _perturb_adapters(model)
        grads[keep] = _grads(model, ids, reversible=True)
        assert len(model.last_run.layers) == 6 - keep
        meter = SavedTensorMeter()
        with meter.record():
            model(ids)
        saved[keep] = meter.total_bytes
    reference = _grads(model, ids, reversible=False)
    for keep in (0, 1, 3):
        assert grads[keep].keys() == reference.keys()
        assert _rel(grads[keep], reference) <= 1e-6
    one_layer = saved[1] - saved[0]
    assert one_layer > 0 and saved[3] - saved[0] == pytest.approx(3 * one_layer, rel=0.05)


@pytest.mark.unit
def test_saved_bytes_do_not_grow_with_depth() -> None:
    ids = torch.randint(0, 128, (2, 8))
    sizes = []
    for depth in (2, 8):
        model = ReversibleLM(_tiny(depth), ReversibleOptions(rev_variant="meft3"))
        plain = ReversibleLM(_tiny(depth), ReversibleOptions(rev_variant="meft3",
                                                             rev_backward="autograd"))
        for m in (model, plain):
            meter = SavedTensorMeter()
            with meter.record():
                m(ids)
            sizes.append(meter.total_bytes)
    rev2, plain2, rev8, plain8 = sizes
    # Per layer: two remainders per element for MEFT3 (λ = β = 1/10, two to a byte),
    # versus full activations.
    assert (rev8 - rev2) <= 6 * 2 * ids.numel() * 32 * 0.5 * 1.01
    assert (plain8 - plain2) > 10 * (rev8 - rev2)


@pytest.mark.unit
@pytest.mark.parametrize("variant", ["meft1", "meft2", "meft3"])
def test_training_steps_leave_no_graph_behind(variant: str) -> None:
    """Each block's forward runs as the backward recomputes it, in grad mode, and drops
    that graph at once: no tensor may outlive its step (a saved output kept as itself made
    a cycle through C++ that gc cannot collect: ~100 MB a step at 135M)."""
    import gc

    model = ReversibleLM(_tiny(4), ReversibleOptions(rev_variant=variant)).train()
    ids = torch.randint(0, 128, (2, 8))

    def live_after_step() -> int:
        model(ids).float().logsumexp(-1).mean().backward()
        model.zero_grad(set_to_none=True)
        gc.collect()
        return sum(1 for o in gc.get_objects() if torch.is_tensor(o))

    counts = [live_after_step() for _ in range(4)]
    assert counts[1] == counts[2] == counts[3], counts


# --- training -------------------------------------------------------------------------


@pytest.mark.integration
def test_thirty_steps_lower_the_loss(smollm2) -> None:
    # Top 8 of 30 layers reversible (the 22 below run without a graph) to keep CI short.
    model = ReversibleLM(copy.deepcopy(smollm2.model), ReversibleOptions(
        rev_variant="meft1", rev_adapter_dropout=0.1, rev_adapter_size=32, rev_layers=8)).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=3e-3)
    ids = smollm2.tokenizer(["Q: Who wrote Hamlet? A: William Shakespeare."],
                            return_tensors="pt").input_ids
    losses = []
    for _ in range(30):
        logits = model(ids)
        loss = torch.nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5


TINY_RUN = ["--train_examples", "8", "--max_seq_len", "40", "--eval_trained", "0",
            "--eval_heldout", "0", "--progress", "false", "--micro_batch_size", "2"]


@pytest.mark.integration
@pytest.mark.parametrize("variant", ["meft1", "meft2", "meft3"])
def test_variant_runs_under_deepspeed(tmp_path: Path, variant: str) -> None:
    spec = cli.parse(["--deepspeed", CPU, "--output_dir", str(tmp_path), *TINY_RUN,
                      "--method", "reversible", "--rev_variant", variant, "--rev_layers", "6",
                      "--max_steps", "2", "--lr", "3e-3"])
    run(spec)
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    assert records[-1]["grad_norm"] > 0
    assert all(r["rev_inexact_backwards"] == 0 for r in records)


@pytest.mark.unit
def test_a_recompute_that_differs_from_the_forward_is_detected(caplog) -> None:
    """Exact streams checksum the stack's inputs: weights changed between forward and
    backward (as a non-deterministic kernel would) make the reconstruction inexact."""
    model = ReversibleLM(_tiny(4), ReversibleOptions(rev_variant="meft1", rev_adapter_size=8))
    _perturb_adapters(model)
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    model(ids).float().mean().backward()
    assert model.stats.get("inexact_backwards", 0) == 0
    loss = model(ids).float().mean()
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if n.endswith("up.weight")).mul_(1.5)
    with caplog.at_level("WARNING", logger="meft_ds.reversible.coupling"):
        loss.backward()
    assert model.stats["inexact_backwards"] == 1
    assert any("did not reproduce the forward exactly" in r.getMessage() for r in caplog.records)


# --- bad input ------------------------------------------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"rev_variant": "meft4"}, "unknown rev_variant 'meft4'"),
        ({"rev_lambda": 0.0}, "rev_lambda must be > 0"),
        ({"rev_beta": -1.0}, "rev_beta must be > 0"),
        ({"rev_lambda": 1e-4}, r"rev_lambda must be in \[1/255, 255\]"),
        ({"rev_layers": 0}, "rev_layers must be >= 1"),
        ({"rev_adapter_dropout": 1.0}, "rev_adapter_dropout must be in"),
        ({"rev_restart_every": -1}, "rev_restart_every must be >= 0"),
        ({"rev_keep_top": -1}, "rev_keep_top must be >= 0"),
        ({"rev_fused": "maybe"}, "rev_fused='maybe' is not a valid bool"),
    ],
)
def test_bad_options_raise_one_line(values: dict, message: str) -> None:
    with pytest.raises(UserError, match=message) as info:
        options.build(ReversibleOptions, values)
    assert "\n" not in str(info.value)


@pytest.mark.unit
def test_bad_flags_through_the_cli() -> None:
    with pytest.raises(UserError, match="rev_lambda must be > 0"):
        cli.parse(["--deepspeed", CPU, "--method", "reversible", "--rev_lambda", "-0.5"])


@pytest.mark.unit
def test_layers_outside_the_model_and_unsplittable_layers() -> None:
    cls = methods.get("reversible")
    model = _tiny(4)
    method = cls(options.build(cls.Options, {"rev_layers": 5}), model.config)
    with pytest.raises(UserError, match=r"rev_layers=5 is outside the model's 1..4 layers"):
        method.check_model(model)
    for values in ({"rev_keep_top": 4}, {"rev_keep_top": 2, "rev_layers": 2}):
        method = cls(options.build(cls.Options, values), model.config)
        with pytest.raises(UserError, match=r"rev_keep_top=\d must be below the \d rev"):
            method.apply(_tiny(4))
    broken = _tiny(2)
    del broken.model.layers[0].mlp
    method = cls(options.build(cls.Options, {}), broken.config)
    with pytest.raises(UserError, match="cannot be split into attention and FFN"):
        method.apply(broken)
    bf16 = _tiny(2).to(torch.bfloat16)
    model = ReversibleLM(bf16, ReversibleOptions(rev_compute_dtype="fp32"))
    with pytest.raises(UserError, match="rev_compute_dtype fp32 needs weights"):
        model(torch.zeros(1, 4, dtype=torch.long))


# --- DeepSpeed engine: ZeRO 1/2, gradient accumulation, checkpoint + resume --------------


def _qa_file(path: Path) -> Path:
    """Sums whose prompts and answers have the same token counts (no padding), so the
    mean of two one-example micro-batch losses equals the loss of the batch of two."""
    rows = [{"question": f"What is {a} plus {b}?", "answer": str(a + b)}
            for a, b in [(1, 2), (3, 4), (2, 5), (4, 4), (1, 7), (3, 3), (2, 2), (5, 1)]]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _zero_config(path: Path, stage: int) -> str:
    config = json.loads(Path(CPU).read_text())
    config["zero_optimization"] = {"stage": stage}
    path.write_text(json.dumps(config))
    return str(path)


@pytest.mark.multiprocess
def test_zero1_zero2_accumulation_and_resume(tmp_path: Path) -> None:
    """Top 3 layers reversible. ZeRO-1 with two micro-batches of one equals ZeRO-2 with one
    batch of two (fp32 tolerance; dropout off, as its masks depend on the micro-batch
    shape); the ZeRO-2 run is killed after step 2 and resumed from its checkpoint.
    Bit-exact resume with dropout on is test_resume.py's ``reversible`` case."""
    from test_resume import _losses, _train

    from meft_ds.data import encode, load_split
    from meft_ds.models.loader import load_tokenizer

    data = _qa_file(tmp_path / "sums.jsonl")
    tok = load_tokenizer("smollm2-135m")
    shapes = {(len(e.input_ids), sum(x != -100 for x in e.labels))
              for e in (encode(q, tok, 40, 49152)
                        for q in load_split("", "train", data_file=str(data)))}
    assert len(shapes) == 1, shapes  # the equivalence below needs equal token counts
    common = ("--data_file", str(data), "--heldout_file", str(data), "--train_examples", "8",
              "--max_steps", "4", "--rev_adapter_dropout", "0", "--rev_keep_top", "1")
    one, two = tmp_path / "zero1", tmp_path / "zero2"
    _train(one, "reversible", "--deepspeed", _zero_config(tmp_path / "z1.json", 1),
           "--micro_batch_size", "1", "--grad_accum", "2", *common)
    zero2 = ("--deepspeed", _zero_config(tmp_path / "z2.json", 2), "--micro_batch_size", "2",
             "--grad_accum", "1", *common)
    _train(two, "reversible", *zero2, "--save_steps", "2", "--stop_after", "2")
    assert sorted(_losses(two)) == [1, 2]
    proc = _train(two, "reversible", *zero2, "--resume")
    assert "resumed from step 2" in proc.stdout
    a, b = _losses(one), _losses(two)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in a:
        assert abs(a[step] - b[step]) <= 1e-5 * max(1.0, abs(a[step])), (a, b)
    for out in (one, two):  # gradients reached the engine (a lost one would show as 0)
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        assert all(r["grad_norm"] > 0 for r in rows if "grad_norm" in r)


# --- --method sparse --reversible --------------------------------------------------------

SPARSE_TINY = {"sparse_rank": 64, "sparse_experts": 8, "sparse_top_k": 4,
               "sparse_optimizer": "torch"}


@pytest.mark.unit
@pytest.mark.parametrize(("variant", "attn_lora", "route", "targets"), [
    ("meft1", 0, "token", "all"), ("meft3", 0, "token", "all"),
    ("meft1", 4, "token", "attention"), ("meft1", 4, "token", "all"),
    ("meft1", 0, "context", "all")])
def test_sparse_reversible_gradients_equal_autograd(variant: str, attn_lora: int,
                                                    route: str, targets: str) -> None:
    """Through the method's own model: router, dense adapter, LoRA (``sparse_attn_lora_r``
    on attention, or on attention and FFN) and row gradients of the reversible backward
    equal plain autograd through the same network (also routed by context: the router's
    gradient then reaches every earlier position's input)."""
    cls = methods.get("sparse")
    results = []
    for backward, keep in (("autograd", 0), ("reversible", 0), ("reversible", 1)):
        opts = options.build(cls.Options, {**SPARSE_TINY, "reversible": True, "layer_start": 1,
                                           "rev_variant": variant, "rev_backward": backward,
                                           "rev_keep_top": keep, "sparse_attn_lora_r": attn_lora,
                                           "sparse_route": route,
                                           "sparse_lora_targets": targets})
        method = cls(opts, None)
        module = method.apply(_tiny(4)).train()
        assert sorted(method.adapters) == [1, 2, 3] and list(module.span) == [1, 2, 3]
        for rows in method.runtime.store.layers.values():  # nonzero values: live row grads
            rows.weight[:, 32:].normal_(generator=torch.Generator().manual_seed(4))
        _perturb_adapters(module)
        gen = torch.Generator().manual_seed(6)
        for name, param in module.named_parameters():  # LoRA's B starts at zero
            if "lora_B" in name:
                param.data.normal_(0.0, 0.05, generator=gen)
        ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(5))
        logits = method.forward(module, ids, torch.ones_like(ids))
        logits.float().log_softmax(-1)[:, :-1].gather(-1, ids[:, 1:, None]).mean().backward()
        dense = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
        results.append((dense, method.runtime.grads()))
    (dense_ref, rows_ref), *others = results
    assert any(n.endswith("router.weight") for n in dense_ref)
    per_layer = {"attention": 4, "all": 7}[targets]  # q,k,v,o (+ gate,up,down) x 3 layers
    assert sum("lora_A" in n for n in dense_ref) == (3 * per_layer if attn_lora else 0)
    for dense_rev, rows_rev in others:  # all reversible; the top layer kept (rev_keep_top)
        assert dense_ref.keys() == dense_rev.keys()
        assert _rel(dense_rev, dense_ref) <= 1e-5
        assert sorted(rows_ref) == sorted(rows_rev) == [1, 2, 3]
        for layer, (rows, grad) in rows_ref.items():
            assert rows.numel() > 0 and torch.equal(rows_rev[layer][0], rows)
            torch.testing.assert_close(rows_rev[layer][1], grad, rtol=1e-5, atol=1e-7)


@pytest.mark.unit
def test_sparse_reversible_runs_under_deepspeed(tmp_path: Path) -> None:
    spec = cli.parse(["--deepspeed", CPU, "--output_dir", str(tmp_path), *TINY_RUN,
                      "--method", "sparse", "--reversible", "--rev_variant", "meft1",
                      "--layer_start", "27", "--sparse_rank", "256", "--sparse_experts", "16",
                      "--sparse_top_k", "8", "--max_steps", "2", "--lr", "3e-3"])
    run(spec)
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    assert records[-1]["grad_norm"] > 0
    assert all(r["sparse_rows_updated"] > 0 for r in records)
    assert all(r["rev_inexact_backwards"] == 0 for r in records)
    exported = tmp_path / "adapter" / "adapter.safetensors"
    assert exported.is_file()


@pytest.mark.unit
def test_sparse_reversible_bad_input() -> None:
    with pytest.raises(UserError, match="^sparse: `rev_variant` needs `reversible`$") as error:
        cli.parse(["--deepspeed", CPU, "--method", "sparse", "--rev_variant", "meft3"])
    assert cli_message(error.value) == "sparse: --rev_variant needs --reversible"
    with pytest.raises(UserError, match="not rev_layers/rev_position"):
        cli.parse(["--deepspeed", CPU, "--method", "sparse", "--reversible", "--rev_layers", "2"])
    cls = methods.get("sparse")
    opts = options.build(cls.Options, {**SPARSE_TINY, "reversible": True, "layer_start": 1,
                                       "layer_end": 3})
    with pytest.raises(UserError, match=r"layers \[1, 3\) must reach the top"):
        cls(opts, None).check_model(_tiny(4))


@pytest.mark.unit
@pytest.mark.parametrize(
    "extra", [("--method", "reversible"), ("--method", "sparse", "--reversible")])
def test_zero3_is_refused_with_the_reversible_backward(tmp_path: Path, extra: tuple) -> None:
    """ZeRO-3 releases partitioned weights outside DeepSpeed's own forward/backward, where
    the reversible backward recomputes: refused up front (the autograd reference runs)."""
    argv = ["--deepspeed", str(ROOT / "ds_configs" / "multinode.json"), *extra,
            "--output_dir", str(tmp_path)]
    with pytest.raises(UserError, match="ZeRO stage 3 is not supported"):
        run(cli.parse(argv))
    assert not any(tmp_path.iterdir())  # refused before anything was written


@pytest.mark.unit
def test_checksum_sees_errors_that_cancel_in_a_plain_sum() -> None:
    from meft_ds.reversible.coupling import _checksum

    state = torch.randint(-2**40, 2**40, (3, 5, 7), dtype=torch.int64)
    shifted = state.clone()
    shifted.view(-1)[4] += 1
    shifted.view(-1)[90] -= 1  # the plain sums of both halves stay equal
    assert shifted.sum() == state.sum()
    assert not torch.equal(_checksum(state), _checksum(shifted))
    assert torch.equal(_checksum(state, state), _checksum(state.clone(), state.clone()))


@pytest.mark.unit
def test_forward_runs_each_block_as_the_backward_recomputes_it(monkeypatch) -> None:
    """Kernels chosen by grad mode (SDPA on a GPU) must see the same call in the forward
    and in the recompute: grad mode on, the input a leaf that requires grad."""
    from meft_ds.reversible.coupling import RevLayer

    model = ReversibleLM(_tiny(2), ReversibleOptions(rev_variant="meft1", rev_adapter_size=8))
    seen: list[tuple[bool, bool, bool]] = []
    for layer in model.modules():
        if isinstance(layer, RevLayer):
            for block in (layer.f, layer.g):
                block.register_forward_pre_hook(lambda m, args: seen.append(
                    (torch.is_grad_enabled(), args[0].requires_grad, args[0].is_leaf)))
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    model(ids).float().mean().backward()
    assert len(seen) == 8  # 2 layers x (F, G) x (forward, recompute)
    assert set(seen) == {(True, True, True)}
    assert model.stats.get("inexact_backwards", 0) == 0


# --- decoding with a KV cache -----------------------------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize("variant,position", [("meft1", "top"), ("meft2", "top"),
                                              ("meft3", "top"), ("meft1", "bottom")])
def test_cached_decoding_gives_the_logits_of_recomputing_the_prefix(variant: str,
                                                                     position: str) -> None:
    """A prefill and one-token steps through a DynamicCache give the logits of the whole
    sequence recomputed (left padding included; with ``position="bottom"`` the plain layers
    above the stack use the cache too), and ``generate`` decodes the same tokens with the
    cache as without it."""
    from transformers import DynamicCache

    model = ReversibleLM(_tiny(6), ReversibleOptions(
        rev_variant=variant, rev_layers=4, rev_position=position, rev_adapter_size=8))
    _perturb_adapters(model)
    ids = torch.randint(1, 128, (2, 9), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding
    with torch.no_grad():
        full = model(ids, mask)
        cache = DynamicCache(config=model.lm.config)
        steps = [model(ids[:, :5], mask[:, :5], past_key_values=cache)]
        for t in range(5, 9):
            steps.append(model(ids[:, t:t + 1], mask[:, :t + 1], past_key_values=cache))
    assert cache.get_seq_length() == 9
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=0, atol=1e-5)
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                  pad_token_id=0, eos_token_id=None)
    assert torch.equal(model.generate(**kwargs, use_cache=True),
                       model.generate(**kwargs, use_cache=False))


@pytest.mark.unit
def test_a_kv_cache_with_grad_is_refused() -> None:
    from transformers import DynamicCache

    model = ReversibleLM(_tiny(2), ReversibleOptions(rev_adapter_size=8))
    with pytest.raises(UserError, match="torch.no_grad"):
        model(torch.ones(1, 3, dtype=torch.long),
              past_key_values=DynamicCache(config=model.lm.config))
