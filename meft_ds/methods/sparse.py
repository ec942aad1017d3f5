"""``--method sparse``: MEFT's sparse adapter with its rows and Adam states in CPU RAM.

Beside every adapted layer's FFN runs ``FFN(h) + act(h K^T) V`` with thousands of
key/value rows per layer (see :mod:`meft_ds.sparse`). The engine trains only the small
routers and a small LoRA on the same layers' attention and FFN projections
(``sparse_attn_lora_r``, ``sparse_lora_targets``); the rows
live in a CPU store with its own row-sparse AdamW, stepped in
:meth:`SparseMethod.after_engine_step` at a multiple of the engine's learning rate.

The adapter is attached with a forward hook on each layer's FFN block (``mlp``; found
through the family table :data:`meft_ds.models.arch.FAMILIES`, so any code that
calls the FFN block, e.g. a reversible layer, gets it) and registered as
``layer.sparse_adapter`` (so its router is an engine parameter). A forward pre-hook on
the model starts a new micro-batch at every call of the whole model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from meft_ds import dist as mdist
from meft_ds.errors import UserError
from meft_ds.methods import register
from meft_ds.methods.base import Method
from meft_ds.models import arch
from meft_ds.models.sizes import count_params
from meft_ds.reversible import sparse as reversible_sparse
from meft_ds.reversible.model import ReversibleLM
from meft_ds.reversible.options import RESUME_FREE as REVERSIBLE_RESUME_FREE
from meft_ds.reversible.options import check_deepspeed as check_reversible_deepspeed
from meft_ds.sparse.adapter import SparseAdapter
from meft_ds.sparse.context import data_parallel_mean
from meft_ds.sparse.diagnostics import Usage, summarise
from meft_ds.sparse.options import SparseOptions, SparseSizes, resolve_sizes
from meft_ds.sparse.runtime import SparseRuntime

EXPORT_PREFIX = "sparse_store.layer"
CACHE_FILE = "sparse_cache.pt"
CONTEXT_PREFIX = "sparse_context.layer"  # + "<L>.centre": --sparse_route context's centres
# per layer: the rows (``sparse_store.layer<L>.weight``), then their Adam state
STORE_TENSORS = ("weight", "exp_avg", "exp_avg_sq", "steps")
# --sparse_lora_targets -> the family parts whose linear projections get the LoRA
LORA_PARTS = {"attention": ("attention",), "all": ("attention", "ffn")}


class _AddAdapter:
    """Forward hook of ``layer.mlp``: add the adapter's output to the FFN's.

    A callable object rather than a closure, so ``copy.deepcopy(model)`` hooks the copied
    FFN to the copied adapter.
    """

    def __init__(self, adapter: SparseAdapter) -> None:
        self.adapter = adapter

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return output + self.adapter(args[0])


class _Prefetch:
    """Forward pre-hook of a layer's input norm (``--sparse_prefetch``): start the
    adapter's row selection and fetch from the layer's attention input."""

    def __init__(self, adapter: SparseAdapter) -> None:
        self.adapter = adapter

    def __call__(self, module: nn.Module, args: tuple) -> None:
        self.adapter.prefetch(args[0])


class _BeginMicroBatch:
    """Forward pre-hook of the whole model: new selections, padding tokens masked out;
    under context routing, a KV cache's reordering (beam search) also reorders the
    adapters' running sums."""

    def __init__(self, runtime: SparseRuntime, adapters: dict[int, SparseAdapter]) -> None:
        self.runtime = runtime
        self.adapters = adapters  # the method's (filled in after this hook is made)

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        mask = kwargs.get("attention_mask")
        if mask is None and len(args) > 1 and isinstance(args[1], torch.Tensor):
            mask = args[1]
        self.runtime.begin_micro_batch(mask if isinstance(mask, torch.Tensor) else None,
                                       continuing=_cached_length(kwargs) > 0)
        cache = kwargs.get("past_key_values")
        if (not module.training and hasattr(cache, "reorder_cache")
                and self.runtime.options.sparse_route == "context"):  # one option, all layers
            _carries_follow(cache, list(self.adapters.values()))


def _carries_follow(cache: Any, adapters: list[SparseAdapter]) -> None:
    """Make ``cache.reorder_cache(beam_idx)`` (how transformers' beam search keeps the
    cache with its beams) reorder the adapters' context-routing sums the same way; the
    wrapper lives on this cache object only, so it ends with the generation."""
    if getattr(cache, "_meft_carries_follow", False):
        return
    reorder = cache.reorder_cache

    def reorder_both(beam_idx: torch.Tensor) -> None:
        reorder(beam_idx)
        for adapter in adapters:
            adapter.reorder_carry(beam_idx)

    cache.reorder_cache = reorder_both
    cache._meft_carries_follow = True


def _cached_length(kwargs: dict) -> int:
    """Tokens already in the call's KV cache (0: a new sequence)."""
    cache = kwargs.get("past_key_values")
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    return int(cache[0][0].shape[-2]) if len(cache) else 0  # legacy tuple of (k, v)


def _add_lora(model: nn.Module, rank: int, parts: tuple[str, ...], layers: tuple[int, ...],
              seed: int) -> list[nn.Parameter]:
    """PEFT LoRA modules (alpha ``2 * rank``, no dropout: reversible recomputation stays
    exact) on the linear projections of the family's ``parts`` (``"attention"``, ``"ffn"``)
    of ``layers``, in place; their parameters (returned)
    are the only trainable ones so far (the routers come next). Initialised from ``seed``
    on a forked RNG: the same on every rank, and the run's own random stream (data order,
    dropout) is the one it would be without the LoRA."""
    from peft import LoraConfig, inject_adapter_in_model

    family = arch.family_of(model, "sparse")
    first = arch.layers(model)[layers[0]]
    targets = sorted({name.rsplit(".", 1)[-1] for part in parts
                      for name, module in family.part(first, part).named_modules()
                      if isinstance(module, nn.Linear)})
    if not targets:
        raise UserError(f"sparse_attn_lora_r: this model's {' and '.join(parts)} has no "
                        "linear projections")
    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=targets,
                        layers_to_transform=list(layers))
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        inject_adapter_in_model(config, model)
    return [p for p in model.parameters() if p.requires_grad]


@register
class SparseMethod(Method):
    """MEFT sparse adapter with real CPU offload of its rows and optimizer states."""

    name = "sparse"
    help = "MEFT sparse adapter: wide FFN-parallel adapter, rows + Adam states in CPU RAM"
    Options = reversible_sparse.SparseMethodOptions  # SparseOptions + ``--reversible``
    resume_free = frozenset({
        "sparse_lr_ratio", "sparse_key_lr_ratio", "sparse_weight_decay", "sparse_eps",
        "sparse_optimizer",
        "sparse_working_dtype", "sparse_store", "sparse_check_every", "sparse_cache_rows",
        "sparse_eager_update", "sparse_prefetch", "sparse_huge_pages", "sparse_diagnostics",
    }) | REVERSIBLE_RESUME_FREE  # --reversible's options
    # exported before these options: the router multiplier, the attention LoRA
    legacy_options = {"sparse_router_lr_ratio": 1.0, "sparse_attn_lora_r": 0,
                      "sparse_lora_targets": "attention", "sparse_read_r": 0,
                      "sparse_route": "token"}

    def __init__(self, options: SparseOptions, model_config: Any) -> None:
        super().__init__(options, model_config)
        self.runtime: SparseRuntime | None = None
        self.rev_model: ReversibleLM | None = None  # --reversible
        self.adapters: dict[int, SparseAdapter] = {}
        self._eager_on = False  # set by attach_engine
        self.engine = None
        self._steps = 0  # optimizer steps of this process (for the replica checks)
        self.lora: list[nn.Parameter] = []  # the LoRA of sparse_attn_lora_r (set by apply)

    @property
    def reversible(self) -> bool:
        """``--reversible``: a reversible stack with the sparse adapter beside each FFN."""
        return bool(getattr(self.options, "reversible", False))  # plain SparseOptions: no

    # --- model construction ---------------------------------------------------------
    def sizes(self, model: nn.Module) -> SparseSizes:
        """The resolved adapter sizes for ``model`` (``UserError`` if they do not fit)."""
        layer_range = arch.check_layer_range(
            model, self.options.layer_start, self.options.layer_end, "sparse"
        )
        model_params = sum(  # ds_numel: a ZeRO-3 partitioned weight's whole size
            getattr(p, "ds_numel", p.numel()) for name, p in model.named_parameters()
            if "sparse_adapter." not in name
        )
        return resolve_sizes(self.options, arch.hidden_size(model), layer_range, model_params)

    def host_bytes(self, config: Any) -> int:
        """The row store: fp32 keys and values with two Adam moments each, a step count
        per row (one copy per node: sharded ranks split it, replicated ones share it)."""
        layers = arch.layer_range(config.num_hidden_layers, self.options.layer_start,
                                  self.options.layer_end, "sparse")
        sizes = resolve_sizes(self.options, config.hidden_size, layers, count_params(config))
        return len(layers) * sizes.rank * (3 * 4 * 2 * sizes.hidden + 8)

    def check_config(self, config: Any) -> None:
        arch.family(config, self.name)

    def check_deepspeed(self, ds: dict[str, Any]) -> None:
        if self.reversible:
            check_reversible_deepspeed(self.options, ds)

    def check_model(self, model: nn.Module) -> None:
        sizes = self.sizes(model)
        if self.reversible:
            span = range(sizes.layers[0], sizes.layers[-1] + 1)
            reversible_sparse.reversible_options(self.options, span, len(arch.layers(model)))

    def apply(self, model: nn.Module) -> nn.Module:
        if self.runtime is not None:
            raise RuntimeError("SparseMethod.apply called twice")
        sizes = self.sizes(model)
        # Record the resolved sizes, so exported options rebuild exactly this store.
        self.options.sparse_rank = sizes.rank
        self.options.sparse_experts = sizes.num_experts
        self.options.sparse_experts_per_token = sizes.experts_per_token
        for param in model.parameters():
            param.requires_grad_(False)
        parts = LORA_PARTS[self.options.sparse_lora_targets]
        self.lora = (_add_lora(model, self.options.sparse_attn_lora_r, parts, sizes.layers,
                               self.options.sparse_init_seed)
                     if self.options.sparse_attn_lora_r else [])
        self.runtime = SparseRuntime(self.options, sizes)
        if self.options.sparse_diagnostics:
            self.runtime.usage = Usage(sizes)
        layers = arch.layers(model)
        family = arch.family_of(model, self.name)
        if self.reversible:
            module = reversible_sparse.wrap(model, self.options, self.runtime, self.adapters)
            self.rev_model = module
            for param in self.lora:  # ReversibleLM froze the whole LM, the LoRA too
                param.requires_grad_(True)
        else:
            module = model
            reference = next(model.parameters())
            for index in sizes.layers:
                adapter = SparseAdapter(self.runtime, index)
                adapter.to(device=reference.device, dtype=reference.dtype)
                layer = layers[index]
                layer.sparse_adapter = adapter
                family.part(layer, "ffn").register_forward_hook(_AddAdapter(adapter))
                self.adapters[index] = adapter
        if self.options.sparse_prefetch:
            for index, adapter in self.adapters.items():
                adapter.route_from(family.part(layers[index], "ffn_norm"))
                family.part(layers[index], "attn_norm").register_forward_pre_hook(
                    _Prefetch(adapter))
        module.register_forward_pre_hook(_BeginMicroBatch(self.runtime, self.adapters),
                                        with_kwargs=True)
        return module

    def forward(
        self, module: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        if self.reversible:  # a ReversibleLM returns the logits
            return module(input_ids=input_ids, attention_mask=attention_mask)
        return super().forward(module, input_ids, attention_mask)

    def generation_model(self, module: nn.Module) -> nn.Module | None:
        # (a ReversibleLM's generate decodes with a KV cache, as transformers models do)
        return module if hasattr(module, "generate") else None

    def _runtime(self) -> SparseRuntime:
        if self.runtime is None:
            raise RuntimeError("SparseMethod.apply has not been called")
        return self.runtime

    # --- state outside the engine ---------------------------------------------------
    def parameter_groups(self, trainable: list[nn.Parameter]) -> list[Any]:
        """With ``sparse_lora_weight_decay`` set: the LoRA in a group of that decay, the
        rest (routers, ``sparse_read_r``'s map) in one with the config's."""
        decay = self.options.sparse_lora_weight_decay
        if decay is None or not self.lora:
            return trainable
        lora = {id(p) for p in self.lora}
        return [{"params": [p for p in trainable if id(p) in lora], "weight_decay": decay},
                {"params": [p for p in trainable if id(p) not in lora]}]

    def attach_engine(self, engine: Any) -> None:
        runtime = self._runtime()
        self.engine = engine
        runtime.engine = engine
        runtime.group = getattr(engine, "data_parallel_group", None)
        runtime.row_optimizer()  # built now, so a failure is reported before training
        self._eager_on = self._eager_update_on(engine)

    def before_forward(self, host_batch: dict[str, torch.Tensor]) -> None:
        """The host's attention mask: padding found without a copy back from the device."""
        self._runtime().note_host_mask(host_batch.get("attention_mask"))

    def _uncentred(self) -> list[SparseAdapter]:
        """Context-routed adapters whose centre is not set yet (fresh, not loaded)."""
        return [a for a in self.adapters.values() if a.context and not a.centred]

    def needs_calibration(self) -> bool:
        return bool(self._uncentred())

    def calibrate(self, module: Any, batches: list[dict[str, torch.Tensor]]) -> None:
        """Context routing's centres (``--sparse_route context``) from the first step's
        micro-batches on every rank: each adapter's mean input mean over all of that step's
        tokens, with no rows selected (a fresh adapter adds 0). Adapters whose centre is
        set (loaded) keep it."""
        runtime = self._runtime()
        waiting = self._uncentred()
        if not waiting:
            return
        device = next(p for p in module.parameters()).device
        runtime.calibration = {}
        try:
            with torch.no_grad():
                for host in batches:
                    self.before_forward(host)
                    self.forward(module, host["input_ids"].to(device),
                                 host["attention_mask"].to(device))
            sums = runtime.calibration
        finally:
            runtime.calibration = None
        for adapter in waiting:
            adapter.set_context_centre(data_parallel_mean(sums[adapter.layer], runtime.group))

    def before_backward(self) -> None:
        """Arm the eager row update for the last micro-batch of a step, where it is exact
        (speculative with clipping; see :mod:`meft_ds.sparse.eager`)."""
        if not self._eager_on:
            return
        runtime, engine = self._runtime(), self.engine
        runtime.eager.arm(None)
        if engine.is_gradient_accumulation_boundary():
            runtime.eager.arm(float(engine.get_lr()[0]),
                              float(engine.gradient_clipping() or 0.0))

    def _eager_update_on(self, engine: Any) -> bool:
        """Whether this run updates rows eagerly: asked for (unset: on CUDA only; on CPU
        the thread would take cores from backward) and exact (one rank, no fp16). Asked
        for where it is not exact, it is off with a note."""
        wanted = self.options.sparse_eager_update
        if wanted is False:
            return False
        ranks = mdist.world_size(self._runtime().group)
        why = [w for w, bad in (("fp16 loss scaling", engine.fp16_enabled()),
                                (f"{ranks} data-parallel ranks", ranks > 1)) if bad]
        if why:
            if wanted and mdist.rank() == 0:
                print(f"note: sparse_eager_update is off in this run ({', '.join(why)}): "
                      "rows are updated after backward, where that is exact", flush=True)
            return False
        return wanted or getattr(engine, "device", torch.device("cpu")).type == "cuda"

    def external_grad_sq_norm(self) -> float:
        return self._runtime().grad_sq_norm()

    def after_engine_step(self, lr: float, clip_coef: float) -> None:
        applied = getattr(self.engine, "was_step_applied", None)
        self.step_rows(lr, clip_coef, skip=callable(applied) and not applied())

    def step_rows(self, lr: float, clip_coef: float = 1.0, skip: bool = False,
                  loss_scale: float = 1.0) -> None:
        """Step the row store at the engine's ``lr`` (see :meth:`SparseRuntime.step`)."""
        runtime = self._runtime()
        runtime.step(lr, clip_coef, skip=skip, loss_scale=loss_scale)
        for adapter in self.adapters.values():
            adapter.clear_cache()
        self._steps += 1
        every = self.options.sparse_check_every
        if every and self._steps % every == 0:
            runtime.store.check_replicas(runtime.group)

    def external_parameters(self) -> int:
        sizes = self._runtime().store.sizes
        return len(sizes.layers) * sizes.rank * 2 * sizes.hidden

    def step_metrics(self) -> dict[str, float]:
        store = self._runtime().store
        sent, store.comm_bytes = store.comm_bytes, 0
        rev = self.rev_model.step_metrics() if self.rev_model is not None else {}
        return {**self._runtime().metrics(), "sparse_comm_bytes": sent,
                "sparse_store_bytes": store.nbytes(), **rev, **self._usage_metrics()}

    def _usage_metrics(self) -> dict:
        """Every ``sparse_diagnostics`` steps: the row-usage figures since the last report
        (``sparse_usage_<figure>``: mean over layers; ``sparse_usage_layers``: figure ->
        per-layer list), then the counts start again."""
        usage, every = self._runtime().usage, self.options.sparse_diagnostics
        if usage is None or not every or self._steps % every:
            return {}
        figures = summarise(usage, self._runtime().store)
        usage.reset()
        layers = list(figures["layers"].values())
        out = {f"sparse_usage_{k}": v for k, v in figures["mean"].items()}
        out["sparse_usage_layers"] = {k: [f[k] for f in layers] for k in figures["mean"]}
        return out

    def save_state(self, directory: Path) -> None:
        runtime = self._runtime()
        runtime.flush()
        runtime.store.save(Path(directory))
        if runtime.caches:
            dist = torch.distributed
            if not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0:
                tmp = Path(directory) / (CACHE_FILE + ".tmp")
                torch.save(runtime.cache_state(), tmp)
                tmp.replace(Path(directory) / CACHE_FILE)

    def load_state(self, directory: Path) -> None:
        runtime = self._runtime()
        runtime.store.load(Path(directory))
        path = Path(directory) / CACHE_FILE
        state = torch.load(path, map_location="cpu", weights_only=True) if path.is_file() else None
        runtime.load_cache_state(state)
        for adapter in self.adapters.values():
            adapter.clear_cache()

    def external_state(self, optimizer: bool = False) -> dict[str, torch.Tensor]:
        """The store's rows ``sparse_store.layer<L>.weight`` ``[r, 2d]`` (all rows: on rank
        0 when the store is sharded); ``optimizer``: also their Adam moments (``.exp_avg``,
        ``.exp_avg_sq``) and update counts (``.steps``)."""
        runtime = self._runtime()
        runtime.flush()
        store = runtime.store
        state = {}
        for layer, rows in store.layers.items():
            state[f"{EXPORT_PREFIX}{layer}.weight"] = store.full_weight(layer)
            for name in STORE_TENSORS[1:] if optimizer else ():
                state[f"{EXPORT_PREFIX}{layer}.{name}"] = getattr(rows, name)
        return state

    def load_external_state(self, state: dict[str, torch.Tensor]) -> None:
        """Rows (and Adam state) named as by :meth:`external_state`; each kind of tensor
        given must be given for every layer."""
        runtime = self._runtime()
        store = runtime.store
        runtime.flush()  # cached rows into the store, where ``state`` overwrites them
        rows_shape = (store.sizes.rank, 2 * store.sizes.hidden)
        seen: dict[str, set[int]] = {}
        for key, value in state.items():
            layer, _, name = key[len(EXPORT_PREFIX) :].partition(".")
            shape = rows_shape[:1] if name == "steps" else rows_shape
            if (not key.startswith(EXPORT_PREFIX) or not layer.isdigit() or name not in
                    STORE_TENSORS or int(layer) not in store.layers or
                    tuple(value.shape) != shape):
                raise UserError(
                    f"adapter file: {key} {tuple(value.shape)} does not fit this run's sparse "
                    f"store (layers {sorted(store.layers)}, rows {rows_shape})"
                )
            if name == "weight":
                store.set_full_weight(int(layer), value)
            else:
                getattr(store.layers[int(layer)], name).copy_(value)
            seen.setdefault(name, set()).add(int(layer))
        for name, layers in seen.items():
            lacking = sorted(set(store.layers) - layers)
            if lacking:
                what = "rows" if name == "weight" else name
                raise UserError(f"adapter file lacks the sparse store {what} of layers {lacking}")
        runtime.load_cache_state(None)
        for adapter in self.adapters.values():
            adapter.clear_cache()

    # --- trained weights for inference ----------------------------------------------
    def trainable_state(self, module: nn.Module) -> dict[str, torch.Tensor]:
        state = super().trainable_state(module)
        state.update({k: v.clone() for k, v in self.external_state().items()})
        state.update({f"{CONTEXT_PREFIX}{layer}.centre": adapter.context_centre.detach().cpu()
                      for layer, adapter in self.adapters.items() if adapter.context})
        return state

    def load_trainable_state(self, module: nn.Module, state: dict[str, torch.Tensor]) -> None:
        centres = {k: v for k, v in state.items() if k.startswith(CONTEXT_PREFIX)}
        routed = {layer for layer, adapter in self.adapters.items() if adapter.context}
        given = {int(k[len(CONTEXT_PREFIX):].partition(".")[0]) for k in centres}
        if given != routed:
            raise UserError(f"adapter file: context-routing centres for layers {sorted(given)}"
                            f", this run routes layers {sorted(routed)} by context")
        for layer in routed:
            self.adapters[layer].set_context_centre(centres[f"{CONTEXT_PREFIX}{layer}.centre"])
        state = {k: v for k, v in state.items() if k not in centres}
        rows = {k: v for k, v in state.items() if k.startswith(EXPORT_PREFIX)}
        if not any(k.endswith(".weight") for k in rows):
            raise UserError(f"adapter file lacks the sparse store rows of layers "
                            f"{sorted(self._runtime().store.layers)}")
        self.load_external_state(rows)
        super().load_trainable_state(module, {k: v for k, v in state.items() if k not in rows})
