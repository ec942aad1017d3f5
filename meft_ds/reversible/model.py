"""A frozen causal LM with a stack of reversible adapter couplings (MEFT1/2/3).

``embedding -> [plain layers without a graph] -> reversible stack -> main + γ·other ->
[plain layers with autograd] -> final norm -> lm_head``: with ``position="top"`` the k
reversible layers are the top ones and the layers below run under ``no_grad``; with
``position="bottom"`` they are the bottom ones and the frozen layers above keep their
activations for ordinary autograd.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from meft_ds.baselines.adapters import BottleneckAdapter
from meft_ds.errors import UserError
from meft_ds.models import arch
from meft_ds.reversible.blocks import (
    AdapterBlock,
    AttentionBlock,
    Block,
    FFNBlock,
    LayerBlock,
    LayerContext,
)
from meft_ds.reversible.coupling import RevLayer, StackRun, run_stack
from meft_ds.reversible.options import ReversibleOptions
from meft_ds.reversible.precision import DTYPES, resolve
from meft_ds.reversible.streams import streams_for
from meft_ds.reversible.variants import VARIANTS

AdapterFactory = Callable[[int, str], nn.Module | None]
"""``factory(layer_index, place) -> adapter``; place is "ffn", "attention" or "stream";
``None``: the default dense bottleneck adapter there."""

# Bits kept between amplified stream rounding and the compute dtype's resolution.
_MARGIN_BITS = 12.0


def _mantissa(dtype: torch.dtype) -> float:
    return -math.log2(torch.finfo(dtype).eps)


def auto_restart_every(lam: float, beta: float, stream: str, compute: torch.dtype) -> int:
    """Layers between restart points of float streams, so amplified stream rounding stays
    ``_MARGIN_BITS`` below the compute dtype's resolution (errors grow ~1/(λβ) a layer,
    λ and β capped at 1; measured ×10 for MEFT1, ×100 for MEFT3 at 0.1)."""
    growth = 1.0 / (min(lam, 1.0) * min(beta, 1.0))
    if growth <= 1.0:
        return 0
    spare = _mantissa(DTYPES[stream]) - _mantissa(compute) - _MARGIN_BITS
    per_layer = math.log2(growth)
    return max(1, int(spare / per_layer))


class ReversibleLM(nn.Module):
    """The module handed to the engine; ``forward(input_ids, attention_mask) -> logits``."""

    def __init__(
        self, model: nn.Module, options: ReversibleOptions,
        adapters: AdapterFactory | None = None,
    ) -> None:
        super().__init__()
        self.lm = arch.causal_lm(model)
        family = arch.family_of(model, "reversible")
        blocks = arch.layers(model)
        for param in self.lm.parameters():
            param.requires_grad_(False)
        n = len(blocks)
        k = n if options.rev_layers is None else options.rev_layers
        if not 1 <= k <= n:
            raise UserError(f"reversible: rev_layers={k} is outside the model's 1..{n} layers")
        if options.rev_keep_top >= k:
            raise UserError(
                f"reversible: rev_keep_top={options.rev_keep_top} must be below the {k} "
                "reversible layers (to store every layer's activations: `rev_backward` autograd)"
            )
        self.options = options
        self.variant = VARIANTS[options.rev_variant]
        self.span = range(n - k, n) if options.rev_position == "top" else range(k)
        dim = arch.hidden_size(model)
        eps = float(getattr(self.lm.config, "rms_norm_eps", 1e-6))
        make = self._dense_factory(dim, adapters)
        self.rev_layers = nn.ModuleList(
            RevLayer(
                self._block(self.variant.f_kind, blocks[i], i, make, dim, eps, family),
                self._block(self.variant.g_kind, blocks[i], i, make, dim, eps, family),
                options.lam, options.beta, self.variant.swap,
                self.variant.center if options.rev_center else (False, False),
            )
            for i in self.span
        )
        init = options.rev_mix_init
        if init is None:
            init = 0.0 if options.rev_center else self.variant.mix_init(options.lam, options.beta)
        self.mix = nn.Parameter(torch.full((1,), float(init)))  # 1-d: DeepSpeed broadcasts bytes
        self.last_run: StackRun | None = None
        self.record_errors = False
        self.stats: dict[str, int] = {}  # see StackRun.stats
        self.reversible = options.rev_backward == "reversible"

    def step_metrics(self) -> dict[str, float]:
        """Backwards so far whose exact-stream reconstruction was not exact (expected 0)."""
        return {"rev_inexact_backwards": self.stats.get("inexact_backwards", 0)}

    def _dense_factory(
        self, dim: int, custom: AdapterFactory | None
    ) -> Callable[[int, str], nn.Module]:
        opts = self.options

        def make(index: int, place: str) -> nn.Module:
            adapter = custom(index, place) if custom is not None else None
            if adapter is not None:
                return adapter
            return BottleneckAdapter(
                dim, opts.rev_adapter_size, opts.rev_adapter_activation, opts.rev_adapter_dropout
            )

        return make

    @staticmethod
    def _block(
        kind: str, layer: nn.Module, index: int, make: AdapterFactory, dim: int, eps: float,
        family: arch.Family,
    ) -> Block:
        if kind == "layer":
            return LayerBlock(layer, index, make(index, "ffn"), family)
        if kind == "attention":
            return AttentionBlock(layer, index, make(index, "attention"), family)
        if kind == "ffn":
            return FFNBlock(layer, index, make(index, "ffn"), family)
        return AdapterBlock(make(index, "stream"), dim, eps)

    # --- forward -------------------------------------------------------------------
    def restart_every(self, compute: torch.dtype, exact: bool) -> int:
        """Restart interval in effect (the option, or the automatic choice)."""
        if self.options.rev_restart_every is not None:
            return self.options.rev_restart_every
        if exact:
            return 0
        return auto_restart_every(
            self.options.lam, self.options.beta, self.options.rev_stream_dtype, compute
        )

    def layer_context(
        self, hidden: torch.Tensor, attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor, cache: Any = None,
    ) -> LayerContext:
        from transformers.masking_utils import (
            create_causal_mask,
            create_sliding_window_causal_mask,
        )

        config = self.lm.config
        kwargs = {
            "config": config, "inputs_embeds": hidden, "attention_mask": attention_mask,
            "past_key_values": cache, "position_ids": position_ids,
        }
        layer_types = getattr(config, "layer_types", None) or []
        masks: dict[str, torch.Tensor | None] = {}
        kinds: dict[int, str] = {}
        if "sliding_attention" in layer_types:
            masks["sliding_attention"] = create_sliding_window_causal_mask(**kwargs)
            kinds = dict(enumerate(layer_types))
        if config.model_type == "mistral" and getattr(config, "sliding_window", None):
            masks["full_attention"] = create_sliding_window_causal_mask(**kwargs)
        else:
            masks["full_attention"] = create_causal_mask(**kwargs)
        rotary = arch.decoder(self.lm).rotary_emb
        if "layer_type" in inspect.signature(rotary.forward).parameters:  # Gemma 3
            rope = {kind: rotary(hidden, position_ids, layer_type=kind)
                    for kind in set(layer_types) | {"full_attention"}}
        else:
            rope = {"full_attention": rotary(hidden, position_ids=position_ids)}
        precision = resolve(
            self.options.rev_stream_dtype, self.options.rev_compute_dtype, hidden.dtype,
            hidden.device,
        )
        return LayerContext(precision, rope, masks, kinds, cache)

    def _plain(
        self, layer_ids: range, hidden: torch.Tensor, ctx: LayerContext,
        position_ids: torch.Tensor,
    ) -> torch.Tensor:
        blocks = arch.layers(self.lm)
        for i in layer_ids:
            hidden = blocks[i](
                hidden, attention_mask=ctx.mask(i),
                position_embeddings=ctx.position_embeddings(i), position_ids=position_ids,
                past_key_values=ctx.cache, use_cache=ctx.cache is not None,
            )
        return hidden

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
        past_key_values: Any = None, **_: object,
    ) -> torch.Tensor:
        """Logits ``[batch, seq, vocab]`` of ``input_ids`` ``[batch, seq]``.

        ``past_key_values``: a transformers KV cache holding the keys and values of the
        sequences' earlier tokens (``attention_mask`` ``[batch, cached + seq]`` then covers
        them too); it is updated in place. Decoding only: without grad every block runs
        once per call, so the cache sees each layer once (a reversible backward would
        recompute the blocks and update it twice).
        """
        n = len(arch.layers(self.lm))
        if past_key_values is not None and torch.is_grad_enabled():
            raise UserError("reversible: a KV cache (past_key_values) is for decoding under "
                            "torch.no_grad(), not for training")
        past = 0 if past_key_values is None else past_key_values.get_seq_length()
        hidden = self.lm.get_input_embeddings()(input_ids)  # Gemma's scaled embedding too
        # positions count every column, padding included, as without a cache: a cached
        # step gives the logits of recomputing the whole prefix
        position_ids = (torch.arange(input_ids.shape[1], device=input_ids.device)
                        + past).unsqueeze(0)
        ctx = self.layer_context(hidden, attention_mask, position_ids, past_key_values)
        if self.span.start > 0:
            with torch.no_grad():
                hidden = self._plain(range(self.span.start), hidden, ctx, position_ids)
        fused = self.options.rev_fused
        streams = streams_for(
            ctx.precision.stream, self.options.rev_exact,
            hidden.device.type == "cuda" if fused is None else fused,
        )
        reversible = self.reversible and torch.is_grad_enabled()
        layers = list(self.rev_layers)
        split = len(layers) - (self.options.rev_keep_top if reversible else 0)
        run = StackRun(
            layers[:split], ctx, streams,
            self.restart_every(ctx.precision.compute_dtype, streams.exact), self.record_errors,
            stats=self.stats,
        )
        self.last_run = run
        pair = run_stack(run, hidden, hidden, reversible=reversible)
        if split < len(layers):  # rev_keep_top: the top layers store their activations
            pair = run_stack(StackRun(layers[split:], ctx, streams), *pair, reversible=False)
        main = pair[self.variant.main_index()]
        other = pair[1 - self.variant.main_index()]
        hidden = (main + self.mix.to(main.dtype) * other).to(hidden.dtype)
        if self.span.stop < n:
            hidden = self._plain(range(self.span.stop, n), hidden, ctx, position_ids)
        logits = self.lm.get_output_embeddings()(arch.final_norm(self.lm)(hidden))
        cap = getattr(self.lm.config, "final_logit_softcapping", None)  # Gemma 2
        return logits if cap is None else torch.tanh(logits / cap) * cap

    @torch.no_grad()
    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """transformers' ``generate`` (any decoding options) with this model's logits: the
        base model's generation loop runs with its forward routed here, with its KV cache
        (``use_cache``, on by default; off: each new token recomputes the whole prefix)."""
        lm = self.lm
        before = lm.__dict__.get("forward")  # a wrapper someone set (accelerate's autocast)
        lm.forward = self._hf_forward  # an instance attribute: shadows the class's forward
        try:
            return lm.generate(*args, **kwargs)
        finally:
            if before is None:
                del lm.forward
            else:
                lm.forward = before

    def _hf_forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    past_key_values: Any = None, use_cache: bool | None = None,
                    **_: Any) -> Any:
        from transformers.modeling_outputs import CausalLMOutputWithPast

        cache = past_key_values if use_cache is not False else None
        # position_ids from generate are ignored: positions follow the columns (forward)
        logits = self(input_ids, attention_mask, past_key_values=cache)
        return CausalLMOutputWithPast(logits=logits, past_key_values=cache)
