"""Parameter counts and host-memory estimates from a model config (no weights needed)."""

from __future__ import annotations

from typing import Any

FULL_STATE_BYTES = 16  # fp32 master copy + grad + two Adam moments per trained parameter


def count_params(config: Any) -> int:
    """Parameters of a LLaMA/Mistral/Qwen2 decoder described by ``config``."""
    d = config.hidden_size
    ff = config.intermediate_size
    layers = config.num_hidden_layers
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or d // heads
    attn = d * heads * head_dim * 2 + d * kv * head_dim * 2
    if getattr(config, "attention_bias", False) or config.model_type == "qwen2":
        attn += heads * head_dim + 2 * kv * head_dim
    per_layer = attn + 3 * d * ff + 2 * d
    embed = config.vocab_size * d
    head = 0 if getattr(config, "tie_word_embeddings", False) else embed
    return embed + head + layers * per_layer + d


def estimate_host_bytes(config: Any, method: str, half: bool, cuda: bool) -> int:
    """Host RAM a run needs before training starts: the loaded weights, plus, on a CPU-only
    machine, the optimizer state of every weight for full fine-tuning."""
    n = count_params(config)
    need = n * (2 if half else 4)
    if method == "full" and not cuda:
        need += n * FULL_STATE_BYTES
    return need
