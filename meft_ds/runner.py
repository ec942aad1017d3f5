"""One training run: model + method + data + DeepSpeed engine, evaluations, export."""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from meft_ds import build_lock, checkpoint, ds_config, export, memory, precision, run_dir
from meft_ds import dist as mdist
from meft_ds.config import TrainConfig
from meft_ds.data import (
    BatchSchedule,
    DataSpec,
    check_answers_kept,
    check_format,
    open_split,
    prompt_text,
)
from meft_ds.data import tokenize as tokenize_split
from meft_ds.errors import UserError, cli_message
from meft_ds.eval import evaluate_qa
from meft_ds.methods.base import Method
from meft_ds.models import loader
from meft_ds.models.sizes import estimate_host_bytes
from meft_ds.trainer import Trainer, world


@dataclass
class RunSpec:
    """Everything a run needs, resolved from flags and config files."""

    train: TrainConfig
    method_cls: type[Method]
    method_options: Any
    deepspeed: dict[str, Any]


def seed_everything(seed: int) -> None:
    """Seed every RNG the run uses."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_process(timeout_s: int = 1800) -> torch.device:
    """Bind this rank to its device, then join the process group (gloo on CPU, NCCL on
    CUDA); returns the device. A collective that waits longer than ``timeout_s`` for
    another rank fails instead of hanging.

    The order matters: NCCL binds the group to the device current at its first
    collective, and every collective builds its tensors on ``cuda:current_device()``
    (:func:`meft_ds.dist.comm_device`); before ``set_device`` that is ``cuda:0`` on every
    rank of a node, which DeepSpeed's group (bound to ``cuda:LOCAL_RANK``) refuses.
    """
    from datetime import timedelta

    import deepspeed

    mdist.check_master_address()
    defaults = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(free_port())
    dev = device()
    backend = "nccl" if dev.type == "cuda" else "gloo"
    build_lock.prefer_interpreter_ninja()  # DeepSpeed's CPU accelerator builds ops here
    deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(seconds=timeout_s))
    return dev


def use_deterministic_kernels() -> None:
    """Deterministic kernels from here on (an op without one raises instead of running).
    Before any CUDA work: cuBLAS reads its workspace setting when it starts."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)


def device() -> torch.device:
    """This rank's device (on CUDA: made current, ``cuda:LOCAL_RANK``)."""
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def _say(text: str) -> None:
    if world()[0] == 0:
        print(text, flush=True)


def _evaluate(method: Method, engine: Any, tokenizer: Any, examples, metric: str,
              cfg: TrainConfig, dev: torch.device, vocab: int) -> dict[str, Any]:
    """Score ``examples`` with the engine's model, prompted as in training."""
    def logits_fn(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return method.forward(engine, ids, mask)

    engine.eval()
    try:
        return evaluate_qa(
            logits_fn, tokenizer, examples, metric, cfg.max_new_tokens, cfg.eval_batch_size,
            dev, vocab, progress=cfg.progress and world()[0] == 0,
            hf_model=method.generation_model(engine.module), prompt_format=cfg.prompt_format,
            generation_config=getattr(engine.module, "generation_config", None),
        )
    finally:
        engine.train()


def format_table(before: dict[str, Any] | None, after: dict[str, Any]) -> str:
    """The before/after score table printed at the end of a run."""
    lines = [f"{'evaluation':<28}{'before':>10}{'after':>10}"]
    for name, res in after.items():
        b = f"{100 * before[name]['score']:.1f}%" if before and name in before else "-"
        label = f"{name} {res['metric']} (n={res['n']})"
        lines.append(f"{label:<28}{b:>10}{100 * res['score']:>9.1f}%")
    return "\n".join(lines)


def run(spec: RunSpec) -> dict[str, Any]:
    """Train and evaluate; returns the results written to ``results.json``.

    The phases, in order (each a method of :class:`_Recipe`): check that the model and
    method fit this machine, start the process group and check the output directory, open
    and tokenize the data, load and adapt the model, build the engine, train, then export
    and evaluate.
    """
    recipe = _Recipe(spec)
    recipe.check_machine()
    recipe.setup_process()
    recipe.setup_data()
    try:
        recipe.setup_model()
        recipe.setup_engine()
        history = recipe.train()
        return recipe.export_and_evaluate(history)
    finally:
        # a ZeRO-3 load made transformers partition every model this process builds
        # while its config lives (a weak reference a cycle can keep alive): not after the run
        loader.release_zero3()


class _Recipe:
    """One run's state, filled phase by phase (see :func:`run`); every phase reads what
    the earlier ones set."""

    # check_machine
    spec: RunSpec
    cfg: TrainConfig
    cuda: bool
    bf16: bool
    precision_note: str | None
    hf_config: Any
    dtype: torch.dtype
    attention: str
    # setup_process
    dev: torch.device
    rank: int
    world_size: int
    out: Path
    identity: dict[str, Any]
    # setup_data
    data: DataSpec
    train_examples: list
    heldout: list
    tokenizer: Any
    encoded: Any
    lost: int
    # setup_model
    ds: dict[str, Any]
    loaded: Any
    method: Method
    module: torch.nn.Module
    vocab: int
    # setup_engine
    engine: Any
    schedule: BatchSchedule
    evals: dict[str, list]
    trainer: Trainer
    before: dict[str, Any] | None

    def __init__(self, spec: RunSpec) -> None:
        self.spec = spec
        self.cfg = spec.train

    def check_machine(self) -> None:
        """Resolve the precision; check the model and method against each other, the
        DeepSpeed config and this node's RAM (before any process group starts)."""
        cfg, spec = self.cfg, self.spec
        self.cuda = torch.cuda.is_available()
        deepspeed_cfg, self.precision_note = precision.resolve(spec.deepspeed, cfg.precision,
                                                               self.cuda)
        spec = self.spec = RunSpec(spec.train, spec.method_cls, spec.method_options,
                                   deepspeed_cfg)
        self.bf16 = ds_config.bf16_enabled(spec.deepspeed)
        if not cfg.progress:
            loader.hide_loading_bars()
        hf_config = self.hf_config = loader.model_config(cfg.model)
        self.attention = loader.attention_for(hf_config, cfg.attn_implementation)
        probe = spec.method_cls(spec.method_options, hf_config)
        probe.check_config(hf_config)
        probe.check_deepspeed(spec.deepspeed)
        # Every rank of this node loads the weights at once; the row store is one per node.
        local = mdist.local_world_size()
        # the weights load in the dtype they train in; under ZeRO-3, partitioned
        dtype = self.dtype = ds_config.model_dtype(spec.deepspeed)
        ranks = (int(os.environ.get("WORLD_SIZE", "1"))
                 if ds_config.zero_stage(spec.deepspeed) == 3 else 1)
        memory.require_ram(
            local * estimate_host_bytes(hf_config, cfg.method, dtype, self.cuda, ranks)
            + probe.host_bytes(hf_config),
            f"model {cfg.model} with method {cfg.method}"
            + (f" on {local} ranks of this node" if local > 1 else ""),
        )

    def setup_process(self) -> None:
        """Join the process group; every rank checks the same config and that it can
        start in the output directory (or resume from it)."""
        cfg, spec = self.cfg, self.spec
        if cfg.deterministic:
            use_deterministic_kernels()
        self.dev = start_process(cfg.dist_timeout)  # before any collective: see its docstring
        mdist.check_same_config(_config_identity(spec))
        self.rank, self.world_size = world()
        self.out = Path(cfg.output_dir)
        self.identity = _run_identity(spec, self.bf16, self.attention)
        mdist.refuse_if_any(_start_problem(self.out, cfg, self.identity))
        if self.precision_note:
            _say(self.precision_note)
        build_lock.clear_stale_locks()  # a killed op build would make the engine wait forever

    def setup_data(self) -> None:
        """Open the splits, render every prompt and tokenize the training examples; then
        clear the output directory if asked."""
        cfg = self.cfg
        # the data and the prompt format first: a bad dataset, column, record or template
        # fails before the model loads (and before --overwrite_output_dir removes anything)
        data = self.data = DataSpec.of(cfg)
        train_split = open_split(data, "train", cfg.train_examples)
        self.train_examples = train_split.examples
        self.heldout = (open_split(data, "heldout", cfg.eval_heldout).examples
                        if cfg.eval_heldout else [])
        tokenizer = self.tokenizer = loader.load_tokenizer(cfg.model)
        check_format(cfg.prompt_format, tokenizer)
        # every prompt rendered and every training example tokenized now, so that a record
        # the template cannot render fails here too (the config's vocabulary is the model's)
        self.encoded = tokenize_split(
            train_split, cfg.prompt_format, tokenizer, cfg.max_seq_len,
            int(self.hf_config.vocab_size), progress=cfg.progress and self.rank == 0)
        self.lost = check_answers_kept(self.encoded, cfg.max_seq_len)
        for example in (self.train_examples[: max(cfg.eval_trained, cfg.eval_periodic)]
                        + self.heldout):
            prompt_text(example, cfg.prompt_format, tokenizer)
        if cfg.overwrite_output_dir and self.rank == 0:
            run_dir.clear(self.out)
        mdist.barrier()

    def setup_model(self) -> None:
        """Resolve the DeepSpeed config, load the model (seeded; partitioned over the ranks
        under ZeRO-3) and apply the method to it."""
        cfg, spec = self.cfg, self.spec
        memory.cap_device_memory(cfg.gpu_memory_gib, self.dev)
        ds = self.ds = ds_config.finalize(
            spec.deepspeed, world_size=self.world_size, max_steps=cfg.max_steps,
            warmup_ratio=cfg.warmup_ratio, lr=cfg.lr, micro_batch=cfg.micro_batch_size,
            grad_accum=cfg.grad_accum, cuda=self.cuda,
        )
        if cfg.model in loader.SHAPES and self.cuda:
            # a shape's random checkpoint, the first time, drawn on the GPU: seconds, where
            # the host's serial init of a 7B model takes about a minute
            loader.shape_dir(cfg.model, self.dev)
        seed_everything(cfg.seed)
        self.loaded = loader.load_model(
            cfg.model, dtype=self.dtype, tokenizer=self.tokenizer, attention=self.attention,
            zero3=ds if ds_config.zero_stage(ds) == 3 else None)
        model = self.loaded.model
        self.vocab = int(model.config.vocab_size)
        if self.lost:
            _say(f"warning: {self.lost} of {len(self.encoded)} training examples lose their "
                 f"whole answer at --max_seq_len {cfg.max_seq_len} and add no loss")
        method = self.method = spec.method_cls(spec.method_options, model.config)
        method.check_model(model)
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False})
        self.module = method.apply(model)

    def setup_engine(self) -> None:
        """The DeepSpeed engine over the method's module, the batch schedule, and the
        trainer (resumed, or with the scores before training)."""
        cfg, spec, method, ds = self.cfg, self.spec, self.method, self.ds
        self.schedule = BatchSchedule(self.encoded, ds["train_micro_batch_size_per_gpu"],
                                      cfg.seed, self.tokenizer.pad_token_id)
        _say("resolved configuration:\n" + json.dumps(
            {"train": cfg.__dict__, "method": spec.method_options.__dict__, "deepspeed": ds,
             "model_source": self.loaded.source, "world_size": self.world_size,
             "device": str(self.dev)},
            indent=2, default=str,
        ))
        trainable = [p for p in self.module.parameters() if p.requires_grad]
        engine, *_ = ds_config.initialize(model=self.module,
                                          model_parameters=method.parameter_groups(trainable),
                                          config=ds)
        self.engine = engine
        ds_config.start_schedule(engine)
        method.attach_engine(engine)
        inner = getattr(engine, "basic_optimizer", None) or engine.optimizer
        external = method.external_parameters()
        _say(f"engine: ZeRO stage {engine.zero_optimization_stage()}, "
             f"bf16={engine.bfloat16_enabled()}, gradient clipping "
             f"{engine.gradient_clipping() or 'off'}, optimizer {type(inner).__name__} "
             f"(wrapped by {type(engine.optimizer).__name__}), {len(trainable)} trainable "
             f"tensors, {sum(getattr(p, 'ds_numel', p.numel()) for p in trainable):,} "
             "trainable parameters"  # ds_numel: a ZeRO-3 partitioned parameter's full size
             + (f" (+ {external:,} in the CPU row store)" if external else ""))

        evals = {"trained": self.train_examples[: cfg.eval_trained],
                 "heldout": self.heldout[: cfg.eval_heldout]}
        self.evals = {k: v for k, v in evals.items() if v}
        self.trainer = Trainer(cfg, engine, method, self.schedule, self.dev, self._periodic,
                               self.identity)

    def train(self) -> list[dict[str, Any]]:
        """Score before training (or resume), fit, save; returns every step's figures,
        those logged before a resume included."""
        cfg, trainer, out = self.cfg, self.trainer, self.out
        self.before = None
        if cfg.resume:
            trainer.resume()
            self.before = run_dir.load_before(out)
            _say(f"resumed from step {trainer.step}")
        elif cfg.eval_before and self.evals:
            self.before = self._score_all()
            if self.rank == 0:
                run_dir.save_before(out, self.before)
        history = run_dir.logged_steps(out / "metrics.jsonl", trainer.step) + trainer.fit()
        if cfg.save_final and (not cfg.save_steps or trainer.step % cfg.save_steps):
            trainer.save()
        return history

    def export_and_evaluate(self, history: list[dict[str, Any]]) -> dict[str, Any]:
        """Export the adapter, score after training, write ``results.json`` and
        ``predictions.json`` and print the table."""
        cfg, out, before = self.cfg, self.out, self.before
        export_dir = Path(cfg.output_dir) / "adapter"
        export.save_adapter(self.method, self.engine, export_dir, cfg,
                            self.spec.method_options, self.tokenizer, self.attention)
        after = self._score_all() if self.evals else {}
        results = {
            "method": cfg.method, "model": cfg.model, "steps": self.trainer.step,
            "precision": "bf16" if self.bf16 else "fp32", "prompt_format": cfg.prompt_format,
            "final_loss": history[-1]["loss"] if history else None,
            "before": _strip(before), "after": _strip(after),
            "peak_rss_gib": max((h["rss_gib"] for h in history), default=None),
            "mean_tokens_per_s": (sum(h["tokens_per_s"] for h in history) / len(history))
            if history else None,
        }
        if self.rank == 0:
            (out / "results.json").write_text(json.dumps(results, indent=2))
            (out / "predictions.json").write_text(json.dumps(after, indent=2))
            if after:
                print("\n" + format_table(before, after), flush=True)
            print(f"adapter exported to {export_dir}", flush=True)
        return results

    def _score(self, examples: list) -> dict[str, Any]:
        return _evaluate(self.method, self.engine, self.tokenizer, examples, self.data.metric,
                         self.cfg, self.dev, self.vocab)

    def _score_all(self) -> dict[str, Any]:
        return {k: self._score(v) for k, v in self.evals.items()}

    def _periodic(self) -> float:
        """The score on the first ``eval_periodic`` training examples (during fit)."""
        return self._score(self.train_examples[: self.cfg.eval_periodic])["score"]


def _run_identity(spec: RunSpec, bf16: bool, attention: str) -> dict[str, Any]:
    """What shapes a checkpoint: a resume must use the same (see :mod:`run_dir`). A
    snapshot of the options as given: methods fill some of theirs in later. The precision
    and the attention kernel are the resolved ones (``--precision auto`` resuming a bf16
    run on the same machine is the same run; so is ``auto`` resuming an ``sdpa`` one)."""
    options = {k: v for k, v in spec.method_options.__dict__.items()
               if k not in spec.method_cls.resume_free}
    return run_dir.snapshot({"model": spec.train.model, "method": spec.train.method,
                             "options": options, "prompt_format": spec.train.prompt_format,
                             "precision": "bf16" if bf16 else "fp32",
                             "attn_implementation": attention})


def _start_problem(out: Path, cfg: TrainConfig, identity: dict[str, Any]) -> str | None:
    """Why this rank cannot start in ``out`` (None: it can)."""
    problem = run_dir.check_fresh(out, cfg.resume, cfg.overwrite_output_dir)
    tag = checkpoint.latest_tag(out / "checkpoints") if cfg.resume else None
    if problem is None and tag is not None:
        try:
            run_dir.check_identity(out / "checkpoints" / tag, identity)
        except UserError as exc:
            problem = cli_message(exc)  # the launcher's wording: options as flags
    if problem is None and cfg.resume and tag is None:
        problem = f"--resume: no checkpoint found in {out / 'checkpoints'}"
    step = checkpoint.tag_step(tag) if tag is not None else None
    if problem is None and step is not None and cfg.max_steps < step:
        problem = (f"--resume: the checkpoint is at step {step}, past --max_steps "
                   f"{cfg.max_steps}; give --max_steps >= {step}")
    return problem


def _config_identity(spec: RunSpec) -> dict[str, Any]:
    """What every rank must agree on: the resolved options and DeepSpeed config, less
    per-node paths and display settings."""
    local = {"data_dir", "output_dir", "progress"}
    train = {k: v for k, v in spec.train.__dict__.items() if k not in local}
    return {"train": train, "method": spec.method_options.__dict__, "deepspeed": spec.deepspeed}


def _strip(scores: dict[str, Any] | None) -> dict[str, Any] | None:
    if scores is None:
        return None
    return {k: {"score": v["score"], "n": v["n"], "metric": v["metric"]} for k, v in scores.items()}
