"""Uniform access to the parts of a LLaMA / Mistral / Qwen2 decoder.

All three families share the HF layout ``model.model.{embed_tokens, layers, norm,
rotary_emb}`` + ``model.lm_head``, with each layer holding ``input_layernorm``,
``self_attn``, ``post_attention_layernorm`` and ``mlp``. PEFT wrappers are unwrapped.
"""

from __future__ import annotations

from torch import nn

from meft_ds.errors import UserError

LAYER_PARTS = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")


def causal_lm(model: nn.Module) -> nn.Module:
    """The ``*ForCausalLM`` module inside PEFT / wrapper modules."""
    inner = model
    for attr in ("base_model", "model"):
        while hasattr(inner, "lm_head") is False and hasattr(inner, attr):
            inner = getattr(inner, attr)
    if not hasattr(inner, "lm_head") or not hasattr(inner, "model"):
        raise UserError(f"{type(model).__name__} is not a decoder-only causal LM")
    return inner


def decoder(model: nn.Module) -> nn.Module:
    """The decoder stack (``LlamaModel`` etc.)."""
    return causal_lm(model).model


def layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers."""
    stack = decoder(model)
    result = getattr(stack, "layers", None)
    if not isinstance(result, nn.ModuleList):
        raise UserError(f"{type(stack).__name__} has no decoder layers to adapt")
    for part in LAYER_PARTS:
        if not hasattr(result[0], part):
            raise UserError(
                f"{type(result[0]).__name__} cannot be split into attention and FFN blocks "
                f"(no {part})"
            )
    return result


def hidden_size(model: nn.Module) -> int:
    """Model width."""
    return int(causal_lm(model).config.hidden_size)


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
