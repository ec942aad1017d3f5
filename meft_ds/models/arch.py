"""Uniform access to the parts of a decoder-only causal LM.

Any ``AutoModelForCausalLM`` (PEFT and other wrappers unwrapped) has a decoder with a
list of layers and a final norm: :func:`layers` and :func:`final_norm` find them (what
``full``, ``lora`` and ``read`` need). The methods that split a layer into its attention
and FFN blocks (``sparse``, ``parallel_adapter``, ``reversible``) find those parts
through :data:`FAMILIES`, one small entry per family naming its modules: a pre-norm
layer computes

    h = x + attn_out(attention(attn_norm(x)));   y = h + ffn_out(ffn(ffn_norm(h)))

where ``attn_out``/``ffn_out`` are Gemma's post-block norms or Phi-3's residual dropout
(identity elsewhere) and ``ffn`` is the whole FFN block (a mixture of experts included).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from meft_ds.errors import UserError

GENERIC_METHODS = ("full", "lora", "read")
"""Methods that work with any causal LM (no family entry needed)."""

ATTENTION_AND_FFN = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FINAL_NORMS = ("norm", "ln_f", "final_layer_norm", "norm_f", "final_norm")
"""Names of the final norm in transformers' decoders (``model.norm``, GPT-2's ``ln_f`` ...)."""

_IDENTITY = nn.Identity()


@dataclass(frozen=True)
class Family:
    """Module names of one family's decoder layer (None: the family has no such part)."""

    attention: str = "self_attn"
    ffn: str = "mlp"
    attn_norm: str = "input_layernorm"
    ffn_norm: str = "post_attention_layernorm"
    attn_out: str | None = None  # applied to the attention output before the residual
    ffn_out: str | None = None  # applied to the FFN output before the residual
    lora_targets: tuple[str, ...] = ATTENTION_AND_FFN  # default LoRA target module names

    def part(self, layer: nn.Module, name: str) -> nn.Module:
        """``layer``'s module playing role ``name`` (a field above; identity if absent)."""
        attr = getattr(self, name)
        return _IDENTITY if attr is None else getattr(layer, attr)

    def set_ffn(self, layer: nn.Module, module: nn.Module) -> None:
        """Replace ``layer``'s FFN block by ``module``."""
        setattr(layer, self.ffn, module)

    def missing(self, layer: nn.Module) -> str | None:
        """The first named part ``layer`` lacks (None: it has them all)."""
        names = (self.attention, self.ffn, self.attn_norm, self.ffn_norm, self.attn_out,
                 self.ffn_out)
        return next((n for n in names if n is not None and not hasattr(layer, n)), None)


_PRE_NORM = Family()
FAMILIES: dict[str, Family] = {
    "llama": _PRE_NORM,
    "mistral": _PRE_NORM,
    "qwen2": _PRE_NORM,
    "qwen3": _PRE_NORM,
    # extra norms after each block; the FFN's pre-norm has its own name
    "gemma2": Family(ffn_norm="pre_feedforward_layernorm", attn_out="post_attention_layernorm",
                     ffn_out="post_feedforward_layernorm"),
    "gemma3_text": Family(ffn_norm="pre_feedforward_layernorm",
                          attn_out="post_attention_layernorm",
                          ffn_out="post_feedforward_layernorm"),
    # fused q/k/v and gate/up projections; dropout on each block's output
    "phi3": Family(attn_out="resid_attn_dropout", ffn_out="resid_mlp_dropout",
                   lora_targets=("qkv_proj", "o_proj", "gate_up_proj", "down_proj")),
    # ``mlp`` is the whole mixture-of-experts block; Mixtral's experts are not nn.Linear
    "mixtral": Family(lora_targets=ATTENTION_AND_FFN[:4]),
    "qwen2_moe": _PRE_NORM,  # its shared expert and dense layers have gate/up/down_proj
}


def text_config(config: object) -> object:
    """The text part of a (possibly multimodal) transformers config."""
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def model_type(config: object) -> str | None:
    """The config's ``model_type`` (the text model's)."""
    return getattr(text_config(config), "model_type", None)


def family(config: object, method: str) -> Family:
    """The family entry of ``config``'s model type; ``UserError`` naming the supported
    families and the methods that work with any model if there is none."""
    kind = model_type(config)
    if kind not in FAMILIES:
        raise UserError(
            f"`method` {method} does not support model type {kind!r} (supported: "
            f"{', '.join(FAMILIES)}); with any causal LM use `method` "
            f"{', '.join(GENERIC_METHODS)}"
        )
    return FAMILIES[kind]


def family_of(model: nn.Module, method: str) -> Family:
    """:func:`family` of ``model``, checked against its layers' modules."""
    fam = family(causal_lm(model).config, method)
    for layer in layers(model):
        absent = fam.missing(layer)
        if absent is not None:
            raise UserError(f"{type(layer).__name__} cannot be split into attention and FFN "
                            f"blocks (no {absent})")
    return fam


def causal_lm(model: nn.Module) -> nn.Module:
    """The transformers ``*ForCausalLM`` inside PEFT / engine / wrapper modules."""
    from transformers import PreTrainedModel

    inner = model
    for _ in range(8):
        if isinstance(inner, PreTrainedModel) and inner.get_output_embeddings() is not None:
            return inner
        if callable(getattr(inner, "get_base_model", None)):  # PEFT
            inner = inner.get_base_model()
            continue
        found = [getattr(inner, a, None) for a in ("module", "lm", "model")]
        found = [m for m in found if isinstance(m, nn.Module)]
        if not found:
            break
        inner = found[0]
    raise UserError(f"{type(model).__name__} is not a decoder-only causal LM")


def decoder(model: nn.Module) -> nn.Module:
    """The decoder stack (``LlamaModel``, GPT-2's ``transformer`` ...)."""
    return causal_lm(model).get_decoder()


def layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers: the decoder's list of ``num_hidden_layers`` modules."""
    lm = causal_lm(model)
    stack = lm.get_decoder()
    count = getattr(text_config(lm.config), "num_hidden_layers", None)
    for _, module in sorted(stack.named_modules(), key=lambda item: item[0].count(".")):
        if isinstance(module, nn.ModuleList) and len(module) == count:
            return module
    raise UserError(f"{type(stack).__name__} has no list of {count} decoder layers to adapt")


def final_norm(model: nn.Module) -> nn.Module:
    """The norm after the last decoder layer (one of :data:`FINAL_NORMS`)."""
    stack = decoder(model)
    for name in FINAL_NORMS:
        module = getattr(stack, name, None)
        if isinstance(module, nn.Module):
            return module
    raise UserError(f"{type(stack).__name__} has no final norm (looked for "
                    f"{', '.join(FINAL_NORMS)})")


def hidden_size(model: nn.Module) -> int:
    """Model width."""
    return int(text_config(causal_lm(model).config).hidden_size)


def check_layer_range(model: nn.Module, start: int, end: int | None, what: str) -> range:
    """Validate a layer range ``[start, end)`` (end None = last layer) and return it."""
    return layer_range(len(layers(model)), start, end, what)


def layer_range(n: int, start: int, end: int | None, what: str) -> range:
    """:func:`check_layer_range` for a model of ``n`` layers (from its config)."""
    stop = n if end is None else end
    if start >= stop:
        raise UserError(f"{what}: layer range [{start}, {stop}) is empty")
    if not (0 <= start and stop <= n):
        raise UserError(f"{what}: layer range [{start}, {stop}) is outside the model's 0..{n}")
    return range(start, stop)
