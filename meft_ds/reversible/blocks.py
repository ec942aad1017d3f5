"""F and G of the reversible couplings, built from the parts of a pre-norm decoder layer
(found through the layer's family entry, :class:`meft_ds.models.arch.Family`).

Every block maps a stream tensor to a stream tensor: it casts its input to the frozen
weights' dtype, computes its branch under :meth:`Precision.compute`, and adds the
residual back in the stream dtype. The frozen decoder layer is held *unregistered* (it
is already registered once in the causal LM); the adapters are registered submodules.

Adapters are any ``nn.Module`` mapping the block's normalised input ``[..., d]`` to a
correction ``[..., d]`` (the dense :class:`~meft_ds.baselines.adapters.BottleneckAdapter`
or the sparse adapter). An adapter whose forward depends on more than its input and the
RNG (the sparse adapter's row selection) is
:class:`~meft_ds.reversible.replay.Replayable`, so the backward recompute reuses the
forward's decisions (see :mod:`meft_ds.reversible.coupling`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from meft_ds.models.arch import Family
from meft_ds.reversible.precision import Precision


@dataclass
class LayerContext:
    """What every layer of one forward shares: masks, rotary embeddings, dtypes. Masks and
    rotary embeddings are per layer kind (``full_attention``, ``sliding_attention``);
    Gemma 3 has rotary embeddings of its own for sliding layers, others one for all."""

    precision: Precision
    rotary: dict[str, tuple[torch.Tensor, torch.Tensor]]
    masks: dict[str, torch.Tensor | None] = field(default_factory=dict)
    mask_kind: dict[int, str] = field(default_factory=dict)
    cache: Any = None  # a transformers KV cache (decoding without grad only), else None

    def kind(self, layer_index: int) -> str:
        """The attention kind of decoder layer ``layer_index``."""
        return self.mask_kind.get(layer_index, "full_attention")

    def mask(self, layer_index: int) -> torch.Tensor | None:
        """The attention mask of decoder layer ``layer_index``."""
        return self.masks[self.kind(layer_index)]

    def position_embeddings(self, layer_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The rotary embeddings (cos, sin) of decoder layer ``layer_index``."""
        return self.rotary.get(self.kind(layer_index), self.rotary["full_attention"])


class RMSNorm(nn.Module):
    """Trainable RMS norm in front of a stand-alone adapter (raw streams are unscaled)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x / rms(x) * weight``, computed in fp32."""
        x32 = x.float()
        out = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (out * self.weight.float()).to(x.dtype)


class Block(nn.Module):
    """Base of F/G: ``forward(x, ctx)`` on stream tensors."""

    def forward(self, x: torch.Tensor, ctx: LayerContext) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def trainable(self) -> list[nn.Parameter]:
        """Parameters of this block that receive gradients, those inside the frozen layer
        parts it runs included (see :func:`frozen_trainable`)."""
        own = [p for p in self.parameters() if p.requires_grad]
        seen = {id(p) for p in own}
        return own + [p for p in frozen_trainable(self) if id(p) not in seen]


def frozen_trainable(module: nn.Module) -> list[nn.Parameter]:
    """Trainable parameters inside the frozen decoder-layer parts that the blocks in
    ``module`` run, which ``module.parameters()`` misses (the layer is held unregistered):
    e.g. a LoRA injected into the attention (``sparse_attn_lora_r``)."""
    found: dict[int, nn.Parameter] = {}
    for block in module.modules():
        if isinstance(block, _FrozenLayerBlock):
            for name in block.PARTS:
                for param in block.part(name).parameters():
                    if param.requires_grad:
                        found[id(param)] = param
    return list(found.values())


class _FrozenLayerBlock(Block):
    """A block using part of a frozen decoder layer (held unregistered)."""

    PARTS: tuple[str, ...] = ()  # the layer's parts it runs (Family roles)

    def __init__(self, layer: nn.Module, index: int, adapter: nn.Module | None,
                 family: Family) -> None:
        super().__init__()
        self._layer = (layer,)
        self.index = index
        self.adapter = adapter
        self.family = family

    @property
    def layer(self) -> nn.Module:
        return self._layer[0]

    def part(self, name: str) -> nn.Module:
        """The frozen layer's module in role ``name`` (see :class:`Family`)."""
        return self.family.part(self.layer, name)


class AttentionBlock(_FrozenLayerBlock):
    """``x + out(Attn(LN1(x)) [+ adapter(LN1(x))])`` (``out``: the family's post-attention
    norm or dropout, else identity)."""

    PARTS = ("attn_norm", "attention", "attn_out")

    def branch(self, x: torch.Tensor, ctx: LayerContext) -> torch.Tensor:
        """The attention branch (no residual) in the compute dtype."""
        with ctx.precision.compute():
            h = self.part("attn_norm")(x.to(ctx.precision.weights))
            out, _ = self.part("attention")(
                hidden_states=h, attention_mask=ctx.mask(self.index),
                position_embeddings=ctx.position_embeddings(self.index),
                past_key_values=ctx.cache,
            )
            if self.adapter is not None:
                out = out + self.adapter(h)
            out = self.part("attn_out")(out)
        return out

    def forward(self, x: torch.Tensor, ctx: LayerContext) -> torch.Tensor:
        return x + self.branch(x, ctx).to(x.dtype)


class FFNBlock(_FrozenLayerBlock):
    """``x + out(MLP(LN2(x)) [+ adapter(LN2(x))])`` (the adapter parallel to the FFN, as
    the hook-attached adapters of the other methods are)."""

    PARTS = ("ffn_norm", "ffn", "ffn_out")

    def branch(self, x: torch.Tensor, ctx: LayerContext) -> torch.Tensor:
        """The FFN branch (no residual) in the compute dtype."""
        with ctx.precision.compute():
            h = self.part("ffn_norm")(x.to(ctx.precision.weights))
            out = self.part("ffn")(h)
            if self.adapter is not None:
                out = out + self.adapter(h)
            out = self.part("ffn_out")(out)
        return out

    def forward(self, x: torch.Tensor, ctx: LayerContext) -> torch.Tensor:
        return x + self.branch(x, ctx).to(x.dtype)


class LayerBlock(Block):
    """The whole pre-trained layer with an FFN adapter: ``FFNBlock(AttentionBlock(x))``."""

    def __init__(self, layer: nn.Module, index: int, ffn_adapter: nn.Module | None,
                 family: Family) -> None:
        super().__init__()
        self.attn = AttentionBlock(layer, index, None, family)
        self.ffn = FFNBlock(layer, index, ffn_adapter, family)

    def forward(self, x: torch.Tensor, ctx: LayerContext) -> torch.Tensor:
        return self.ffn(self.attn(x, ctx), ctx)


class AdapterBlock(Block):
    """A stand-alone adapter on a stream: ``adapter(norm(x))`` (zero at initialisation)."""

    def __init__(self, adapter: nn.Module, dim: int, eps: float) -> None:
        super().__init__()
        self.norm = RMSNorm(dim, eps)
        self.adapter = adapter

    def forward(self, x: torch.Tensor, ctx: LayerContext) -> torch.Tensor:
        with ctx.precision.compute():
            h = self.norm(x.to(ctx.precision.weights))
            out = self.adapter(h)
        return out.to(x.dtype)
