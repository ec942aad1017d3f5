"""The functions the task YAMLs name (``!function meft_nq.NAME``): meft_ds's own data
loading, prompt and exact match, so the harness asks and scores as ``launch/evaluate.py``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from meft_ds.data.prompts import prompt_text
from meft_ds.data.records import QAExample, RecordReader, parse_column_map
from meft_ds.data.sources import open_splits
from meft_ds.eval import exact_match, first_answer_line

_READER = RecordReader("qa", parse_column_map(None), "lm-eval task meft_nq_open")


def load(data_dir: str | None = None, **_: Any) -> dict[str, Any]:
    """The shipped ``nq_open`` splits (``train``: NQ-open dev, what training reads;
    ``heldout``: EfficientQA dev), from ``data_dir`` (``--metadata '{"data_dir": ...}'``),
    else ``$MEFT_DS_DATA``, else the copy inside the package. No network."""
    return open_splits("nq_open", Path(data_dir) if data_dir else None)


def example(doc: dict[str, Any]) -> QAExample:
    """A row as meft_ds reads it (question and accepted answers, stripped)."""
    return _READER.example(doc, 0)


def doc_to_text(doc: dict[str, Any]) -> str:
    """The plain prompt training used: ``Question: ...?\\nAnswer:``."""
    return prompt_text(example(doc), "plain", None)


def doc_to_target(doc: dict[str, Any]) -> str:
    """The training target (the first accepted answer)."""
    return example(doc).answers[0]


def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """meft_ds's exact match: the generation's first line against every accepted answer."""
    return {"exact_match": float(exact_match(first_answer_line(results[0]),
                                             example(doc).answers))}
