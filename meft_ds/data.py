"""Datasets -> prompts -> token batches with loss on answer tokens only.

Question/answer JSONL files (NQ-open, GSM8K, or any file with ``--question_field`` /
``--answer_field``) are validated line by line (a malformed line is reported with file
and line number) and turned into micro-batches in a
deterministic order that depends only on (seed, global micro-batch index): a resumed or
data-parallel run sees exactly the batches of an uninterrupted single-process run.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from meft_ds.errors import UserError

IGNORE = -100


def default_data_dir() -> Path:
    """``$MEFT_DS_DATA`` or ``../shared/data`` next to the project root."""
    env = os.environ.get("MEFT_DS_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "shared" / "data"


@dataclass(frozen=True)
class DatasetSpec:
    """Where a named dataset lives and how its prompts look."""

    train_file: str
    heldout_file: str
    question_field: str = "question"
    answer_field: str = "answer"
    metric: str = "exact_match"


DATASETS: dict[str, DatasetSpec] = {
    "nq_open": DatasetSpec(
        "nq_open/NQ-open.dev.jsonl", "nq_open/NQ-open.efficientqa.dev.1.1.jsonl"
    ),
    "gsm8k": DatasetSpec("gsm8k/train.jsonl", "gsm8k/test.jsonl", metric="gsm8k_accuracy"),
}


@dataclass(frozen=True)
class QAExample:
    """One question with its accepted answers (the first one is the training target)."""

    question: str
    answers: tuple[str, ...]


def format_prompt(question: str) -> str:
    """The prompt template shared by all datasets (the answer follows after a space)."""
    question = question.strip()
    if question and question[-1] not in "?.!:":
        question += "?"
    return f"Question: {question}\nAnswer:"


def read_jsonl(path: Path, question_field: str, answer_field: str) -> list[QAExample]:
    """Parse and validate a QA JSONL file; errors name the file and line."""
    if not path.is_file():
        raise UserError(f"data file {path} does not exist")
    examples: list[QAExample] = []
    with path.open(encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}:{lineno}: malformed JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise UserError(f"{path}:{lineno}: expected a JSON object")
            for field in (question_field, answer_field):
                if field not in row:
                    raise UserError(f"{path}:{lineno}: missing field {field!r}")
            answer = row[answer_field]
            answers = tuple(str(a) for a in answer) if isinstance(answer, list) else (str(answer),)
            if not str(row[question_field]).strip() or not answers or not answers[0].strip():
                raise UserError(f"{path}:{lineno}: empty question or answer")
            examples.append(QAExample(str(row[question_field]), answers))
    if not examples:
        raise UserError(f"data file {path} has no examples")
    return examples


def load_split(
    dataset: str,
    split: str,
    data_dir: Path | None = None,
    data_file: str | None = None,
    question_field: str | None = None,
    answer_field: str | None = None,
    limit: int | None = None,
) -> list[QAExample]:
    """Examples of ``split`` ("train" or "heldout") of a named dataset or a custom file."""
    if data_file is not None:
        path = Path(data_file)
        qf, af = question_field or "question", answer_field or "answer"
    else:
        if dataset not in DATASETS:
            raise UserError(
                f"unknown dataset {dataset!r}; choose {', '.join(DATASETS)} or give --data_file"
            )
        spec = DATASETS[dataset]
        name = spec.train_file if split == "train" else spec.heldout_file
        path = (data_dir or default_data_dir()) / name
        qf, af = question_field or spec.question_field, answer_field or spec.answer_field
    examples = read_jsonl(path, qf, af)
    return examples if limit is None else examples[:limit]


@dataclass
class Encoded:
    """Token ids of one training example and its loss mask."""

    input_ids: list[int]
    labels: list[int]


def encode(example: QAExample, tokenizer: Any, max_len: int, vocab_size: int) -> Encoded:
    """Prompt + " answer" + EOS; labels are -100 on the prompt. Truncated to ``max_len``."""
    prompt = tokenizer(format_prompt(example.question), add_special_tokens=False)["input_ids"]
    answer = tokenizer(" " + example.answers[0].strip(), add_special_tokens=False)["input_ids"]
    answer = answer + [tokenizer.eos_token_id]
    ids = (prompt + answer)[:max_len]
    labels = ([IGNORE] * len(prompt) + answer)[:max_len]
    ids = [i % vocab_size for i in ids]
    labels = [t if t == IGNORE else t % vocab_size for t in labels]
    return Encoded(ids, labels)


def check_answers_kept(encoded: list[Encoded], max_len: int) -> int:
    """How many examples lose their whole answer to truncation at ``max_len`` (they add
    no loss); refused when that is all of them (every step's loss would be undefined)."""
    lost = sum(1 for e in encoded if all(t == IGNORE for t in e.labels))
    if encoded and lost == len(encoded):
        raise UserError(
            f"--max_seq_len {max_len} truncates the answer of every training example "
            "(prompt + answer must fit); raise it"
        )
    return lost


def collate(items: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a micro-batch."""
    width = max(len(x.input_ids) for x in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, item in enumerate(items):
        n = len(item.input_ids)
        ids[row, :n] = torch.tensor(item.input_ids)
        labels[row, :n] = torch.tensor(item.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


class BatchSchedule:
    """Deterministic micro-batches addressed by a global micro-batch index.

    Epoch ``e`` uses the permutation drawn from ``seed + e``; micro-batch ``g`` is slice
    ``g mod per_epoch`` of epoch ``g // per_epoch``. For optimizer step ``s``,
    accumulation index ``a`` and rank ``r`` of ``W`` the index is ``(s*A + a)*W + r``,
    so the same examples form step ``s`` for any (A, W) with the same A*W.
    """

    def __init__(self, encoded: list[Encoded], micro_batch: int, seed: int, pad_id: int) -> None:
        if len(encoded) < micro_batch:
            raise UserError(
                f"{len(encoded)} training examples are fewer than one micro-batch ({micro_batch})"
            )
        self.encoded = encoded
        self.micro_batch = micro_batch
        self.seed = seed
        self.pad_id = pad_id
        self.per_epoch = len(encoded) // micro_batch
        self._perm_epoch = -1
        self._perm: list[int] = []

    def _permutation(self, epoch: int) -> list[int]:
        if epoch != self._perm_epoch:
            gen = torch.Generator().manual_seed(self.seed + epoch)
            self._perm = torch.randperm(len(self.encoded), generator=gen).tolist()
            self._perm_epoch = epoch
        return self._perm

    def batch(self, index: int) -> dict[str, torch.Tensor]:
        """Micro-batch number ``index`` (global over epochs and ranks)."""
        epoch, slot = divmod(index, self.per_epoch)
        perm = self._permutation(epoch)
        chosen = perm[slot * self.micro_batch : (slot + 1) * self.micro_batch]
        return collate([self.encoded[i] for i in chosen], self.pad_id)

    @staticmethod
    def index(step: int, accum: int, accum_steps: int, rank: int, world: int) -> int:
        """Global micro-batch index of (optimizer step, accumulation slot, rank)."""
        return (step * accum_steps + accum) * world + rank
