"""Options of the sparse adapter (``--method sparse``) and the sizes derived from them."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from meft_ds.errors import UserError
from meft_ds.options import opt

ACTIVATIONS = ("relu", "gelu", "silu")
OPTIMIZERS = ("cpu_adam", "torch")
WORKING_DTYPES = ("auto", "fp32", "bf16", "fp16")
STORE_MODES = ("replicated", "sharded")
ROUTES = ("token", "context")
BIAS_CORRECTIONS = ("row", "step")
LORA_TARGETS = ("attention", "all")


@dataclass
class SparseOptions:
    """Sparse adapter beside every FFN; its rows and their Adam states live in CPU RAM."""

    sparse_rank: int | None = opt(
        None, "adapter width r (key/value rows per layer); unset = param_fraction of the model"
    )
    sparse_param_fraction: float = opt(
        0.1, "with sparse_rank unset: adapter parameters as a fraction of the model's parameters"
    )
    sparse_experts: int | None = opt(
        None, "Key-Experts blocks per layer (must divide sparse_rank); unset = about sqrt(rank)"
    )
    sparse_experts_per_token: int | None = opt(
        None, "experts the router picks per token; unset = enough for 2*top_k candidate keys"
    )
    sparse_top_k: int = opt(
        4, "keys (rows) each token activates per layer; fewer rows per token mean fewer "
        "facts sharing a row (bench/knowledge.py: more facts learned at 4 than at 64, the "
        "paper's)"
    )
    sparse_activation: str = opt("relu", "adapter activation", choices=ACTIVATIONS)
    layer_start: int = opt(0, "first adapted layer")
    layer_end: int | None = opt(None, "adapted layers end before this one (unset = last layer)")
    sparse_lr_ratio: float = opt(
        3.0, "CPU row store learning rate = engine lr * this (the paper's setting: 1)"
    )
    sparse_router_lr_ratio: float = opt(
        10.0, "routers' learning rate as a multiple of the engine's (a fixed multiplier on "
        "the router logits, so it holds under any optimizer and ZeRO stage; the paper's: 1)"
    )
    sparse_key_lr_ratio: float = opt(
        0.0, "keys' learning rate as a fraction of the row store's (values keep the full "
        "rate): 0 (default) freezes the random keys, so a token's rows stay the same while "
        "the values learn (trained keys win every token's top-K; the paper's setting: 1)"
    )
    sparse_attn_lora_r: int = opt(
        8, "rank of a LoRA (alpha 2r, no dropout) on the attention (and, by "
        "sparse_lora_targets, FFN) projections of the adapted layers, trained by the engine "
        "beside the routers (0 = none, the paper's). "
        "The position that predicts an answer's first token looks alike across facts, so "
        "there they share rows (bench/sparse_overlap.py); attention that reads the "
        "question tells them apart"
    )
    sparse_read_r: int = opt(
        0, "rank of a learned map added to the adapter's input where the selected keys are "
        "activated (x + B A x, B zero at start, alpha 2r); the rows are still selected by "
        "the raw input, so the frozen keys stay fixed addresses while what each row reads "
        "learns (0 = none)"
    )
    sparse_lora_targets: str = opt(
        "all", "what the LoRA of sparse_attn_lora_r adapts in the adapted layers: "
        "'all' (attention and FFN projections: the rows add to a LoRA placed as PEFT's "
        "default targets would place it; learned the most facts at N=2048: docs/methods.md) "
        "or 'attention' (q/k/v/o, the default before)", choices=LORA_TARGETS,
    )
    sparse_route: str = opt(
        "context", "what the router picks a token's experts from: 'token' = its own FFN input "
        "(the paper's); 'context' = the mean of its sequence's FFN inputs up to it, centred "
        "(meft_ds.sparse.context): facts then use different rows where their inputs look "
        "alike, at the position that predicts the answer (learned more facts at N=1024: "
        "docs/methods.md)", choices=ROUTES,
    )
    sparse_weight_decay: float = opt(
        3.0, "decoupled weight decay of the CPU row store (AdamW; lazy: a row's values shrink "
        "by lr * decay in the steps that update it, frozen keys stay). 3 (default) learned "
        "about as many facts as 0 (the paper's and the default before) with 40% less "
        "damage to what the model knew at N=1024 (docs/methods.md)"
    )
    sparse_lora_weight_decay: float | None = opt(
        None, "decoupled weight decay of the LoRA of sparse_attn_lora_r (the engine's AdamW "
        "applies it every step; unset = the DeepSpeed config's weight_decay). With the rows "
        "decayed, that LoRA does most of the damage to what the model knew: decay 1 damaged "
        "less than LoRA r16 at N=256 but learned fewer facts at N=1024 (docs/methods.md)"
    )
    sparse_bias_correction: str = opt(
        "row", "Adam bias correction of a store row: 'row' = by the row's own update count "
        "(a row first used late starts as a fresh AdamW: lazy Adam, the paper's); 'step' = by "
        "the store's step count, as torch.optim.SparseAdam (a row used in few steps then takes "
        "larger steps; its `steps` entry holds the step of its last update)",
        choices=BIAS_CORRECTIONS,
    )
    sparse_beta1: float = opt(0.9, "Adam beta1 of the CPU row store")
    sparse_beta2: float = opt(0.999, "Adam beta2 of the CPU row store")
    sparse_eps: float = opt(1e-8, "Adam epsilon of the CPU row store")
    sparse_optimizer: str = opt(
        "cpu_adam", "row-sparse Adam backend (DeepSpeedCPUAdam kernel or torch)", choices=OPTIMIZERS
    )
    sparse_working_dtype: str = opt(
        "auto", "dtype of the rows sent to the device (auto = the hidden states' dtype)",
        choices=WORKING_DTYPES,
    )
    sparse_init_seed: int = opt(0, "seed of the adapter's initial keys (same on every rank)")
    sparse_store: str = opt(
        "replicated", "data-parallel store: a full copy per rank, or rows + Adam state "
        "sharded across ranks by expert (the world size must divide sparse_experts)",
        choices=STORE_MODES,
    )
    sparse_huge_pages: bool = opt(
        True, "keep the row store on transparent huge pages (Linux madvise): scattered rows "
        "cost fewer TLB misses (bench/sparse_adam.py); no effect where the OS gives none"
    )
    sparse_check_every: int = opt(
        100, "replicated store: compare the replicas' checksums every N steps (0 = never)"
    )
    sparse_cache_rows: float = opt(
        0.0, "device-resident hot rows per layer, updated on the device: >= 1 a row count, "
        "in (0, 1) a fraction of sparse_rank, 0 = no cache"
    )
    sparse_eager_update: bool | None = opt(
        None, "update a layer's rows on a CPU thread as soon as its last micro-batch's "
        "gradient is complete (one rank, no fp16; with clipping speculatively, rolled back "
        "when the step clips); unset: on when the model runs on CUDA, off on CPU, where the "
        "thread takes cores from backward itself (make train: 1.54x the step time)"
    )
    sparse_prefetch: bool = opt(
        False, "route each layer from its attention input and select + fetch its rows on a "
        "CPU thread while attention runs (approximate routing; off = from the FFN input)"
    )
    sparse_diagnostics: int = opt(
        0, "every N steps, log how the rows are used (meft_ds.sparse.diagnostics: distinct "
        "rows, usage entropy, expert load, gates, row norms) to the metrics (0 = off)"
    )

    def validate(self) -> None:
        """Check values that need no model; sizes are checked in :func:`resolve_sizes`."""
        for name in ("sparse_rank", "sparse_experts", "sparse_experts_per_token", "sparse_top_k"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UserError(f"sparse: {name} must be >= 1, got {value}")
        if not 0.0 < self.sparse_param_fraction <= 10.0:
            raise UserError(
                f"sparse: sparse_param_fraction must be in (0, 10], got "
                f"{self.sparse_param_fraction}"
            )
        if self.layer_start < 0:
            raise UserError(f"sparse: layer_start must be >= 0, got {self.layer_start}")
        if self.layer_end is not None and self.layer_end <= self.layer_start:
            raise UserError(
                f"sparse: layer_end ({self.layer_end}) must be > layer_start ({self.layer_start})"
            )
        if self.sparse_lr_ratio <= 0 or not math.isfinite(self.sparse_lr_ratio):
            raise UserError(f"sparse: sparse_lr_ratio must be > 0, got {self.sparse_lr_ratio}")
        if not 0.0 < self.sparse_router_lr_ratio <= 1000.0:
            raise UserError(
                f"sparse: sparse_router_lr_ratio must be in (0, 1000], got "
                f"{self.sparse_router_lr_ratio}"
            )
        if not 0.0 <= self.sparse_key_lr_ratio <= 1.0:
            raise UserError(
                f"sparse: sparse_key_lr_ratio must be in [0, 1], got {self.sparse_key_lr_ratio}"
            )
        if self.sparse_attn_lora_r < 0:
            raise UserError(
                f"sparse: sparse_attn_lora_r must be >= 0, got {self.sparse_attn_lora_r}"
            )
        if self.sparse_read_r < 0:
            raise UserError(f"sparse: sparse_read_r must be >= 0, got {self.sparse_read_r}")
        if self.sparse_weight_decay < 0:
            raise UserError(
                f"sparse: sparse_weight_decay must be >= 0, got {self.sparse_weight_decay}"
            )
        decay = self.sparse_lora_weight_decay
        if decay is not None and not (decay >= 0 and math.isfinite(decay)):
            raise UserError(f"sparse: sparse_lora_weight_decay must be >= 0, got {decay}")
        if decay is not None and self.sparse_attn_lora_r == 0:
            raise UserError("sparse: sparse_lora_weight_decay needs the LoRA of "
                            "sparse_attn_lora_r (> 0), got sparse_attn_lora_r 0")
        for name in ("sparse_beta1", "sparse_beta2"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise UserError(f"sparse: {name} must be in [0, 1), got {value}")
        if self.sparse_diagnostics < 0:
            raise UserError(
                f"sparse: sparse_diagnostics must be >= 0, got {self.sparse_diagnostics}"
            )
        if self.sparse_check_every < 0:
            raise UserError(
                f"sparse: sparse_check_every must be >= 0, got {self.sparse_check_every}"
            )
        cache = self.sparse_cache_rows
        if cache < 0 or not math.isfinite(cache) or (cache >= 1 and cache != int(cache)):
            raise UserError(
                f"sparse: sparse_cache_rows must be a whole number of rows >= 1, a fraction "
                f"of sparse_rank in (0, 1), or 0, got {cache:g}"
            )
        if self.sparse_prefetch and self.sparse_store == "sharded":
            raise UserError(
                "sparse: sparse_prefetch needs sparse_store replicated (the sharded store "
                "selects rows with collectives, which cannot run on a prefetch thread)"
            )
        if self.sparse_eps <= 0:
            raise UserError(f"sparse: sparse_eps must be > 0, got {self.sparse_eps}")
        for name, choices in (
            ("sparse_activation", ACTIVATIONS), ("sparse_optimizer", OPTIMIZERS),
            ("sparse_working_dtype", WORKING_DTYPES),
            ("sparse_store", STORE_MODES), ("sparse_lora_targets", LORA_TARGETS),
        ):
            if getattr(self, name) not in choices:
                raise UserError(
                    f"sparse: {name}={getattr(self, name)!r}; choose one of {', '.join(choices)}"
                )


@dataclass(frozen=True)
class SparseSizes:
    """Resolved sizes: r rows per layer in ``num_experts`` blocks of ``rows_per_expert``."""

    hidden: int
    rank: int
    num_experts: int
    experts_per_token: int
    top_k: int
    layers: tuple[int, ...]

    @property
    def rows_per_expert(self) -> int:
        return self.rank // self.num_experts

    @property
    def candidates(self) -> int:
        """Keys scored per token (the keys of its chosen experts)."""
        return self.experts_per_token * self.rows_per_expert

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def resolve_sizes(
    options: SparseOptions, hidden: int, layers: range, model_params: int
) -> SparseSizes:
    """Fill the unset sizes and check that they fit together (``UserError`` otherwise)."""
    n_layers = len(layers)
    rank = options.sparse_rank
    num_experts = options.sparse_experts
    top_k = options.sparse_top_k
    if rank is None:
        # Each row holds a key and a value of width ``hidden``.
        rank = max(
            1, round(options.sparse_param_fraction * model_params / (2 * hidden * n_layers))
        )
        if num_experts is None:
            num_experts = max(1, round(math.sqrt(rank)))
        rank = math.ceil(rank / num_experts) * num_experts
    elif num_experts is None:
        # The divisor of rank closest to sqrt(rank).
        num_experts = min(
            (n for n in range(1, rank + 1) if rank % n == 0),
            key=lambda n: (abs(math.log(n) - 0.5 * math.log(rank)), n),
        )
    if num_experts > rank or rank % num_experts:
        raise UserError(
            f"sparse: sparse_experts ({num_experts}) must divide sparse_rank ({rank})"
        )
    rows_per_expert = rank // num_experts
    per_token = options.sparse_experts_per_token
    if per_token is None:
        per_token = min(num_experts, max(1, math.ceil(2 * top_k / rows_per_expert)))
    if per_token > num_experts:
        raise UserError(
            f"sparse: sparse_experts_per_token ({per_token}) exceeds sparse_experts "
            f"({num_experts})"
        )
    if top_k > per_token * rows_per_expert:
        raise UserError(
            f"sparse: sparse_top_k ({top_k}) exceeds the {per_token * rows_per_expert} keys "
            f"of the {per_token} chosen experts of {rows_per_expert} rows; lower sparse_top_k "
            "or raise sparse_experts_per_token / sparse_rank"
        )
    if options.sparse_cache_rows > rank:
        raise UserError(
            f"sparse: sparse_cache_rows ({options.sparse_cache_rows:g}) exceeds the "
            f"{rank} rows per layer (sparse_rank); give at most {rank}"
        )
    return SparseSizes(
        hidden=hidden, rank=rank, num_experts=num_experts, experts_per_token=per_token,
        top_k=top_k, layers=tuple(layers),
    )
