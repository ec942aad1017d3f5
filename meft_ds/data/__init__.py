"""Data: sources (shipped, local, Hub) -> records -> prompts -> token batches."""

from pathlib import Path

from meft_ds.data.batches import BatchSchedule, Encoded, check_answers_kept, collate, encode
from meft_ds.data.load import DataSpec, Split, open_split, tokenize
from meft_ds.data.prompts import FORMATS, IGNORE, check_format, format_prompt, prompt_text
from meft_ds.data.records import QAExample
from meft_ds.data.sources import SHIPPED, default_data_dir

__all__ = [
    "FORMATS", "IGNORE", "SHIPPED", "BatchSchedule", "DataSpec", "Encoded", "QAExample",
    "Split", "check_answers_kept", "check_format", "collate", "default_data_dir", "encode",
    "format_prompt", "load_split", "open_split", "prompt_text", "tokenize",
]


def load_split(dataset: str, split: str, data_dir: str | Path | None = None,
               data_file: str | None = None,
               question_field: str | None = None, answer_field: str | None = None,
               limit: int | None = None) -> list[QAExample]:
    """Examples of ``split`` ("train" or "heldout") of a dataset or file (benchmarks' and
    tests' short form of :func:`open_split`)."""
    spec = DataSpec(dataset=dataset, data_dir=None if data_dir is None else str(data_dir),
                    data_file=data_file, heldout_file=data_file if split == "heldout" else None,
                    question_field=question_field, answer_field=answer_field)
    return open_split(spec, split, limit).examples
