"""Every decoder family x every method on tiny random models built from configs (offline):
step 0 equals the base model, one DeepSpeed step lowers the loss, the reversible backward
equals autograd at full depth, and an unsupported family is one line."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import ds_engine, lm_loss, tiny_lambda_error

from meft_ds import methods, options
from meft_ds.errors import UserError
from meft_ds.models import arch, loader
from meft_ds.reversible.blocks import LayerBlock
from meft_ds.reversible.model import ReversibleLM
from meft_ds.reversible.options import ReversibleOptions

VOCAB = 128
COMMON = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64)
# model type -> what its tiny config needs besides COMMON (None: GPT-2's own names)
CONFIGS: dict[str, dict | None] = {
    "llama": {},
    "mistral": {},
    "qwen2": {},
    "qwen3": dict(head_dim=8),
    # sliding and full layers; logit soft-capping strong enough to matter
    "gemma2": dict(head_dim=8, sliding_window=4, final_logit_softcapping=0.5),
    "gemma3_text": dict(head_dim=8, sliding_window=4, sliding_window_pattern=2),
    "phi3": dict(pad_token_id=0),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=32),
    "gpt2": None,  # not in the family table: full, lora and read only
}
OPTIONS = {
    "parallel_adapter": {"adapter_size": 8},
    "sparse": {"sparse_rank": 64, "sparse_experts": 8, "sparse_top_k": 4,
               "sparse_optimizer": "torch"},
    "reversible": {"rev_adapter_size": 8, "rev_adapter_dropout": 0.0},
    "lora": {"lora_r": 4, "lora_dropout": 0.0},
    "full": {},
    "read": {"read_hidden": 8},
}
LR = {"full": 1e-3}


def tiny_config(kind: str, layers: int = 2):
    """The tiny config of family ``kind``."""
    from transformers import CONFIG_MAPPING

    extra = CONFIGS[kind]
    values = (dict(COMMON, num_hidden_layers=layers, **extra) if extra is not None else
              dict(n_embd=32, n_layer=layers, n_head=4, vocab_size=VOCAB, n_positions=64))
    return CONFIG_MAPPING[kind](**values)


def tiny(kind: str, layers: int = 2, attention: str | None = None) -> torch.nn.Module:
    """A seeded random model of family ``kind`` (fp32, eval mode; ``attention``: its kernel,
    default transformers' pick); norm weights random too, so that mixing up two norms
    shows."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(kind, layers)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attention).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 1:
                param.add_(torch.randn_like(param) * 0.3)
    return model


def _ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(seed))


def _method(name: str, config, **values):
    cls = methods.get(name)
    return cls(options.build(cls.Options, {**OPTIONS[name], **values}, context=name), config)


@pytest.mark.unit
@pytest.mark.parametrize("name", list(OPTIONS))
@pytest.mark.parametrize("kind", list(CONFIGS))
def test_family_trains_from_the_base_model(kind: str, name: str) -> None:
    """Step 0 gives the base model's logits (reversible: see the next tests); one step
    through a DeepSpeed engine lowers the loss on the batch it trained on."""
    base = tiny(kind)
    method = _method(name, base.config)
    if kind not in arch.FAMILIES and name not in arch.GENERIC_METHODS:
        with pytest.raises(UserError, match=r"does not support model type 'gpt2' \(supported: "
                                            r"llama, .*\); with any causal LM use `method` "
                                            r"full, lora, read"):
            method.check_config(base.config)
        return
    method.check_config(base.config)
    model = copy.deepcopy(base)
    method.check_model(model)
    module = method.apply(model)
    ids, mask = _ids(), torch.ones(2, 10, dtype=torch.long)
    with torch.no_grad():
        want = base(input_ids=ids, attention_mask=mask).logits
        got = method.forward(module.eval(), ids, mask)
    if name != "reversible":
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    engine = ds_engine(module, LR.get(name, 1e-2))
    method.attach_engine(engine)
    module.train()
    losses = []
    for _ in range(2):
        loss = lm_loss(method.forward(engine, ids, mask), ids)
        losses.append(float(loss))
        method.before_backward()
        engine.backward(loss)
        engine.step()
        method.after_engine_step(LR.get(name, 1e-2), 1.0)
    assert losses[1] < losses[0], losses


@pytest.mark.unit
@pytest.mark.parametrize("kind", list(arch.FAMILIES))
def test_layer_blocks_compute_the_family_layer(kind: str) -> None:
    """The reversible F/G blocks, built from the family table with the stack's own masks
    and rotary embeddings, compute exactly what each decoder layer computes in the
    model's own forward (attention then FFN, with the family's extra norms)."""
    model = tiny(kind, layers=3)
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    handles = [layer.register_forward_hook(lambda m, args, out: seen.append((args[0], out)))
               for layer in arch.layers(model)]
    ids = _ids()
    with torch.no_grad():
        model(input_ids=ids)
    for handle in handles:
        handle.remove()
    rev = ReversibleLM(model, ReversibleOptions())
    family = arch.family_of(model, "reversible")
    hidden = model.get_input_embeddings()(ids)
    ctx = rev.layer_context(hidden, None, torch.arange(10).unsqueeze(0))
    assert torch.equal(seen[0][0], hidden)
    with torch.no_grad():
        for i, (layer, (inp, out)) in enumerate(zip(arch.layers(model), seen, strict=True)):
            torch.testing.assert_close(LayerBlock(layer, i, None, family)(inp, ctx), out,
                                       rtol=0, atol=1e-6)


@pytest.mark.unit
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("kind", list(arch.FAMILIES))
def test_reversible_gradients_equal_autograd_at_full_depth(kind: str, attention: str) -> None:
    """Every layer reversible (MEFT1, adapter dropout on), with either attention kernel:
    the reversible backward's gradients equal plain autograd's, every layer's inputs
    rebuilt exactly; with a tiny λ and no centring the stack reproduces the base model."""
    if kind == "gemma2" and attention == "sdpa":  # transformers: eager only (soft-capping)
        with pytest.raises(UserError, match="model type 'gemma2' does not support "
                                            "`attn_implementation` sdpa"):
            loader.attention_for(tiny_config(kind), attention)
        assert loader.attention_for(tiny_config(kind)) == "eager"  # auto
        return
    base = tiny(kind, layers=3, attention=loader.attention_for(tiny_config(kind), attention))
    assert base.config._attn_implementation == attention
    model = ReversibleLM(copy.deepcopy(base), ReversibleOptions(
        rev_variant="meft1", rev_adapter_size=8, rev_adapter_dropout=0.1)).train()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for pname, param in model.named_parameters():
            if param.requires_grad and pname.endswith("up.weight"):
                param.copy_(torch.randn(param.shape, generator=gen) * 0.02)
    ids = _ids()
    grads = []
    for reversible in (True, False):
        model.reversible, model.record_errors = reversible, reversible
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1234)
        lm_loss(model(ids), ids).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()
                      if p.grad is not None})
        if reversible:
            assert sorted(model.last_run.errors) == [0, 1, 2]
            assert max(model.last_run.errors.values()) == 0.0
    rev, ref = grads
    assert rev.keys() == ref.keys() and len(ref) > 10
    num = sum((rev[k].double() - ref[k].double()).pow(2).sum() for k in ref)
    den = sum(ref[k].double().pow(2).sum() for k in ref)
    assert float((num / den).sqrt()) <= 1e-5
    assert tiny_lambda_error(base, ids) < 0.02


@pytest.mark.unit
def test_lora_targets_follow_the_family() -> None:
    """auto: the family's projections (Phi-3's fused ones), every linear layer elsewhere."""
    for kind, wanted in (("phi3", {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}),
                         ("llama", set(arch.ATTENTION_AND_FFN)),
                         ("gpt2", {"c_attn", "c_proj", "c_fc"})):
        model = tiny(kind)
        module = _method("lora", model.config).apply(model)
        names = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in module.named_parameters()
                 if ".lora_A" in n}
        assert names == wanted, (kind, names)
