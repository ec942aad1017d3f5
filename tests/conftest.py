"""Shared test set-up: offline hub, single-process DeepSpeed env, cached extension builds."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# before anything imports huggingface_hub, which reads these once
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
# One OpenMP thread in every test process, as in the launcher subprocesses: `make test` runs
# two pytest workers on two cores (a second busy process slows a 2-thread torch up to 20x),
# and a verdict must not depend on the host's core count.
os.environ["OMP_NUM_THREADS"] = "1"

import torch  # noqa: E402

from meft_ds.build_lock import prefer_interpreter_ninja  # noqa: E402
from meft_ds.runner import free_port  # noqa: E402

torch.set_num_threads(1)
# Tests build DeepSpeed's ops in process too (DeepSpeedCPUAdam, deepspeed.initialize): with
# the venv's ninja, as make setup and the launchers do, or each side rebuilds every op.
prefer_interpreter_ninja()

for key, value in {
    "RANK": "0",
    "LOCAL_RANK": "0",
    "WORLD_SIZE": "1",
    "LOCAL_WORLD_SIZE": "1",
    "MASTER_ADDR": "127.0.0.1",
}.items():
    os.environ.setdefault(key, value)
# each process its own port: pytest-xdist workers inherit the controller's environment
os.environ["MASTER_PORT"] = str(free_port())


DIST_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_PORT")


def subprocess_env() -> dict[str, str]:
    """Environment for a launcher subprocess: no inherited rank/port (the test process's
    own process group holds that port), one OpenMP thread per process."""
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    env["OMP_NUM_THREADS"] = "1"
    return env


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct (fp32), loaded once per test session.

    Tests that modify it must deep-copy it first.
    """
    from meft_ds.models.loader import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The shipped datasets' directory (``$MEFT_DS_DATA`` overrides it)."""
    from meft_ds.data import default_data_dir

    return default_data_dir()


def tiny_llama(layers: int = 3, vocab_size: int = 128):
    """A randomly initialised 64-wide LLaMA (seeded): for unit tests of adapter mechanics
    (``vocab_size=49152`` fits SmolLM2's tokenizer, for saved model directories)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=64,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def tiny_sparse_engine(values: dict, clip: float = 1.0):
    """A sparse adapter (128 rows of 8 experts, top-8, torch row Adam; ``values`` more
    options) on :func:`tiny_llama` under a DeepSpeed ZeRO-0 engine (AdamW lr 1e-2,
    micro-batch 2, two micro-batches a step, clipping ``clip``); values start non-zero so
    the first step has gradients everywhere. Returns ``(method, engine)``."""
    import deepspeed

    from meft_ds import methods
    from meft_ds import options as opt

    cls = methods.get("sparse")
    values = dict(sparse_rank=128, sparse_experts=8, sparse_top_k=8, sparse_optimizer="torch",
                  **values)
    method = cls(opt.build(cls.Options, values, context="sparse"), None)
    module = method.apply(tiny_llama())
    for rows in method.runtime.store.layers.values():
        rows.weight[:, 64:].normal_(0, 0.02, generator=torch.Generator().manual_seed(1))
    params = [p for p in module.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(
        model=module, model_parameters=params, optimizer=torch.optim.AdamW(params, lr=1e-2),
        config={"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2,
                "gradient_clipping": clip, "zero_optimization": {"stage": 0},
                "steps_per_print": 10**9},
    )
    method.attach_engine(engine)
    return method, engine


def tiny_backward(method, engine, ids: torch.Tensor, mask: torch.Tensor) -> None:
    """One micro-batch's forward and backward on :func:`tiny_sparse_engine`'s model
    (next-token loss over every position; the caller steps the engine)."""
    import torch.nn.functional as F

    logits = method.forward(engine, ids, mask)
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                           ids[:, 1:].reshape(-1))
    method.before_backward()
    engine.backward(loss)


def rank_errors(text: str, limit: int = 60) -> str:
    """The lines of a launcher's output that say why a rank failed (the ranks' own lines and
    tracebacks, not warnings): the tail alone is torchrun's summary, which names no cause."""
    keep = [x for x in text.splitlines() if "WARNING" not in x and (
        x.startswith(("[rank", "Traceback", "  File", "\t")) or "Error" in x)]
    return "\n".join(keep[-limit:])


def run_losses(out: Path) -> list[float]:
    """The per-step training losses a run logged in ``out/metrics.jsonl``, in order."""
    import json

    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def save_tiny_base(where: Path) -> Path:
    """:func:`tiny_llama` saved as a model directory with SmolLM2's tokenizer, its
    vocabulary exactly the tokenizer's."""
    from meft_ds.models import loader

    tokenizer = loader.load_tokenizer("smollm2-135m")
    tiny_llama(vocab_size=len(tokenizer)).save_pretrained(where)
    tokenizer.save_pretrained(where)
    return where


def lm_loss(logits, labels):
    """Next-token cross entropy (labels -100 ignored), in fp32."""
    import torch.nn.functional as F

    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1),
        ignore_index=-100,
    )


def ds_engine(module, lr: float):
    """A single-process DeepSpeed engine (ZeRO 0) with AdamW over ``module``'s trainable
    parameters, micro-batch 2."""
    import deepspeed
    import torch

    params = [p for p in module.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(
        model=module,
        model_parameters=params,
        optimizer=torch.optim.AdamW(params, lr=lr),
        config={
            "train_micro_batch_size_per_gpu": 2,
            "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": 0},
            "steps_per_print": 10**9,
        },
    )
    return engine


KINDS = ("unit", "integration", "multiprocess")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test says what it is (``pytest -m unit`` must stay fast): one of KINDS."""
    for item in items:
        marks = {m.name for m in item.iter_markers()} & set(KINDS)
        if len(marks) != 1:
            raise pytest.UsageError(f"{item.nodeid}: mark it with exactly one of "
                                    f"{', '.join(KINDS)} (has: {sorted(marks) or 'none'})")


def tiny_lambda_error(base, ids) -> float:
    """Relative logit error of MEFT1 at λ = 1/255 (uncentred, no mix) against ``base``: a
    reversible stack with a tiny λ is nearly the base model."""
    import copy

    import torch

    from meft_ds.reversible.model import ReversibleLM
    from meft_ds.reversible.options import ReversibleOptions

    model = ReversibleLM(copy.deepcopy(base), ReversibleOptions(
        rev_variant="meft1", rev_lambda=1 / 255, rev_center=False, rev_mix_init=0.0))
    with torch.no_grad():
        want, got = base(input_ids=ids).logits, model(ids)
    return float((got - want).norm() / want.norm())
