"""Training options (method-independent) and their validation."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from meft_ds.data.load import DataSpec
from meft_ds.data.prompts import FORMATS
from meft_ds.data.records import SHAPES
from meft_ds.errors import UserError
from meft_ds.models.loader import ATTENTION, check_attention
from meft_ds.options import opt
from meft_ds.precision import CHOICES as PRECISIONS
from meft_ds.reporting import CHOICES as REPORT_TO
from meft_ds.reporting import check_available


@dataclass
class TrainConfig:
    """What to train, on what, for how long, and where to write it."""

    method: str = opt("parallel_adapter", "fine-tuning method (see --help for the list)")
    model: str = opt("smollm2-135m", "smollm2-135m, a *-shape, a local dir or a Hub id org/name")
    dataset: str = opt(
        "nq_open", "nq_open or gsm8k (shipped), a data file (jsonl/json/csv/parquet/arrow), a "
        "save_to_disk directory, or a Hub dataset id")
    data_dir: str | None = opt(None, "directory with the shipped datasets' files (default: "
                               "$MEFT_DS_DATA, else the copy in the package)")
    data_file: str | None = opt(None, "training data file (same as --dataset FILE)")
    heldout_file: str | None = opt(None, "held-out data file for evaluation")
    split: str = opt("train", "training split of the dataset")
    heldout_split: str | None = opt(
        None, "held-out split (default: the dataset's heldout/validation/test split)")
    heldout_fraction: float = opt(
        0.0, "carve this fraction of the training split off as the held-out set (seeded)")
    record_format: str = opt("auto", "record shape: question/answer (qa), instruction/input/"
                             "output (alpaca), chat messages (chat), or auto-detect",
                             choices=SHAPES)
    column_map: str | None = opt(None, "dataset columns for the record fields, e.g. "
                                 "question=query,answer=target or messages=conversation")
    question_field: str | None = opt(None, "question column (shorthand for --column_map "
                                     "question=...)")
    answer_field: str | None = opt(None, "answer column: a string, a list of accepted "
                                   "strings or SQuAD's {'text': [...]} (shorthand for "
                                   "--column_map answer=...)")
    prompt_format: str = opt(
        "plain", "plain: 'Question: ...\\nAnswer:' prompts; chat: the tokenizer's chat "
        "template, loss on the assistant turn only", choices=FORMATS)
    precision: str = opt(
        "auto", "auto: the DeepSpeed config's bf16, except without CUDA on a CPU without "
        "native bf16 (AVX512-BF16/AMX), where fp32 is used; bf16 or fp32 to choose",
        choices=PRECISIONS)
    attn_implementation: str = opt(
        "auto", "attention kernel: auto (what transformers picks: sdpa where the model "
        "supports it, else eager), sdpa, eager, or flash_attention_2 (CUDA and the package "
        "flash_attn); recorded in the run and its export", choices=ATTENTION)
    train_examples: int = opt(256, "training questions (the first N of the training split)")
    eval_trained: int = opt(128, "trained questions scored before/after (0 = none)")
    eval_heldout: int = opt(128, "held-out questions scored before/after (0 = none)")
    max_seq_len: int = opt(128, "truncate prompt+answer to this many tokens")
    max_steps: int = opt(200, "optimizer steps")
    lr: float | None = opt(None, "learning rate (overrides the DeepSpeed config's)")
    warmup_ratio: float = opt(0.05, "warmup steps as a fraction of max_steps (for 'auto'; at "
                              "least 2, DeepSpeed's WarmupLR minimum)")
    micro_batch_size: int | None = opt(None, "override train_micro_batch_size_per_gpu")
    grad_accum: int | None = opt(None, "override gradient_accumulation_steps")
    seed: int = opt(42, "seed for weights, data order and dropout")
    gradient_checkpointing: bool = opt(False, "recompute activations in backward")
    deterministic: bool = opt(
        False, "deterministic kernels only (torch.use_deterministic_algorithms; on CUDA also "
        "cuBLAS's fixed workspace): a resumed run repeats an uninterrupted one bit for bit "
        "on a GPU too, at some speed (CPU kernels are deterministic already)"
    )
    output_dir: str = opt("runs/latest", "metrics, checkpoints and the exported adapter")
    save_steps: int = opt(0, "checkpoint every N steps (0 = only at the end)")
    keep_checkpoints: int = opt(2, "checkpoints kept on disk")
    save_final: bool = opt(
        True, "checkpoint at the end of training (false: skip it, e.g. for benchmark runs; "
        "the adapter is exported either way)"
    )
    resume: bool = opt(False, "resume from the latest checkpoint in output_dir")
    overwrite_output_dir: bool = opt(
        False, "start over in an output_dir that holds an earlier run (its metrics, "
        "checkpoints, adapter and results are removed first)"
    )
    stop_after: int | None = opt(None, "testing aid: exit abruptly right after step N")
    stop_rank: int | None = opt(
        None, "testing aid: with stop_after, only this global rank exits (status 1)"
    )
    dist_timeout: int = opt(
        1800, "seconds a collective may wait for other ranks before the run fails"
    )
    eval_steps: int = opt(0, "score eval_periodic trained questions every N steps (0 = off)")
    eval_periodic: int = opt(32, "questions scored by the periodic evaluation")
    eval_before: bool = opt(True, "score before training")
    max_new_tokens: int = opt(24, "generation length for evaluation")
    eval_batch_size: int = opt(32, "generation batch size")
    progress: bool = opt(True, "show progress bars")
    log_steps: int = opt(1, "write metrics every N steps")
    report_to: str = opt("none", "also log the metrics to TensorBoard (<output_dir>/"
                         "tensorboard) or Weights & Biases (WANDB_MODE=offline is "
                         "honoured)", choices=REPORT_TO)
    gpu_memory_gib: float | None = opt(
        None, "cap this process's GPU memory at N GiB (check that a run fits a smaller card)"
    )

    def validate(self) -> None:
        """Reject values that cannot work, with one line each."""
        positive = {
            "train_examples": self.train_examples, "max_seq_len": self.max_seq_len,
            "max_steps": self.max_steps, "keep_checkpoints": self.keep_checkpoints,
            "max_new_tokens": self.max_new_tokens, "eval_batch_size": self.eval_batch_size,
            "log_steps": self.log_steps, "eval_periodic": self.eval_periodic,
            "dist_timeout": self.dist_timeout,
        }
        for name, value in positive.items():
            if value <= 0:
                raise UserError(f"{name} must be > 0, got {value}")
        non_negative = {
            "eval_trained": self.eval_trained, "eval_heldout": self.eval_heldout,
            "save_steps": self.save_steps, "eval_steps": self.eval_steps,
        }
        for name, value in non_negative.items():
            if value < 0:
                raise UserError(f"{name} must be >= 0, got {value}")
        for name in ("micro_batch_size", "grad_accum", "stop_after"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise UserError(f"{name} must be > 0, got {value}")
        if self.lr is not None and self.lr <= 0:
            raise UserError(f"lr must be > 0, got {self.lr}")
        if self.gpu_memory_gib is not None and self.gpu_memory_gib <= 0:
            raise UserError(f"gpu_memory_gib must be > 0, got {self.gpu_memory_gib}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise UserError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        DataSpec.of(self).validate()  # the data options, checked as the evaluator checks them
        check_available(self.report_to)
        check_attention(self.attn_implementation)  # FlashAttention-2 here: before any loading
        if self.resume and self.overwrite_output_dir:
            raise UserError("`resume` and `overwrite_output_dir` exclude each other")
        if Path(self.output_dir).exists() and not Path(self.output_dir).is_dir():
            raise UserError(f"`output_dir` {self.output_dir} is a file, not a directory")
