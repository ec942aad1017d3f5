"""The data of a run: training and held-out examples from any source, tokenized with
``datasets.map`` (and its cache)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meft_ds.data import sources
from meft_ds.data.batches import Encoded
from meft_ds.data.prompts import encode_ids
from meft_ds.data.records import QAExample, RecordReader, detect_shape, parse_column_map
from meft_ds.errors import UserError


@dataclass(frozen=True)
class DataSpec:
    """Which data to read: the launcher's and the evaluator's data options.

    ``heldout_*``: a file, else a named split of the same dataset, else a seeded fraction
    carved off the training split, else the dataset's own held-out split.
    """

    dataset: str = "nq_open"
    data_dir: str | None = None
    data_file: str | None = None
    heldout_file: str | None = None
    split: str = "train"
    heldout_split: str | None = None
    heldout_fraction: float = 0.0
    record_format: str = "auto"
    column_map: str | None = None
    question_field: str | None = None
    answer_field: str | None = None
    seed: int = 42

    @classmethod
    def of(cls, options: Any) -> DataSpec:
        """The data options of any object that has (some of) these attributes."""
        names = cls.__dataclass_fields__
        given = {k: getattr(options, k) for k in names if getattr(options, k, None) is not None}
        return cls(**given)

    def validate(self) -> None:
        """Refuse data options that contradict each other, one line each (training and
        the evaluator both call this)."""
        if not 0.0 <= self.heldout_fraction < 1.0:
            raise UserError(f"heldout_fraction must be in [0, 1), got {self.heldout_fraction}")
        if self.data_file is not None and self.dataset not in ("nq_open", self.data_file):
            raise UserError("`data_file` and `dataset` name two training sources; give one")
        if self.heldout_split is not None and self.heldout_split == self.split:
            raise UserError(f"`heldout_split` {self.heldout_split} is the training split "
                            f"(`split` {self.split}): the held-out set would be training data; "
                            "name another split, or give `heldout_fraction` or `heldout_file`")

    @property
    def source(self) -> str:
        """What the training examples come from (a file overrides the dataset)."""
        return self.data_file or self.dataset

    @property
    def metric(self) -> str:
        return sources.metric_for(self.source)


@dataclass
class Split:
    """The first rows of one split: the ``datasets.Dataset`` and its examples."""

    rows: Any
    reader: RecordReader
    examples: list[QAExample] = field(default_factory=list)


def open_split(spec: DataSpec, which: str, limit: int | None) -> Split:
    """``which`` = ``"train"`` or ``"heldout"``: its first ``limit`` rows, validated."""
    data_dir = Path(spec.data_dir) if spec.data_dir else None
    if which == "heldout" and spec.heldout_file:
        source, splits, name = spec.heldout_file, sources.open_splits(spec.heldout_file), "train"
    else:
        source = spec.source
        splits = sources.open_splits(source, data_dir)
        name = spec.split
        if which == "heldout":
            name = spec.heldout_split or sources.default_heldout(splits, spec.split)
    fraction = spec.heldout_fraction if not spec.heldout_file and not spec.heldout_split else 0
    if fraction > 0:
        # carved from the training split with the run's seed: the two never share a row
        try:
            parts = sources.choose_split(splits, spec.split, source).train_test_split(
                test_size=fraction, seed=spec.seed, shuffle=True)
        except ValueError as exc:  # too few rows for the fraction
            raise UserError(f"`heldout_fraction` {fraction}: {exc}") from None
        rows = parts["test" if which == "heldout" else "train"]
    elif name is None:
        raise UserError(f"dataset {source!r} has no held-out split (splits: "
                        f"{', '.join(splits)}); give `heldout_split`, `heldout_fraction` or "
                        "`heldout_file`")
    else:
        rows = sources.choose_split(splits, name, source)
    where = f"dataset {source!r} ({which})"
    if limit is not None:
        rows = rows.select(range(min(limit, len(rows))))
    if len(rows) == 0:
        raise UserError(f"{where} is empty")
    mapping = parse_column_map(spec.column_map, spec.question_field, spec.answer_field)
    reader = RecordReader(detect_shape(rows.column_names, mapping, spec.record_format, where),
                          mapping, where)
    return Split(rows, reader, [reader.example(row, i) for i, row in enumerate(rows)])


def _code_digest() -> str:
    """Digest of the code that turns rows into token ids."""
    import hashlib

    from meft_ds.data import prompts, records

    text = "".join(Path(m.__file__).read_text() for m in (prompts, records))
    return hashlib.sha256(text.encode()).hexdigest()


def tokenize(split: Split, fmt: str, tokenizer: Any, max_len: int, vocab_size: int,
             progress: bool = True) -> list[Encoded]:
    """Each example's ids and labels, through ``datasets.map`` (cached for file-backed
    datasets: a rerun with the same data, tokenizer and options reads the cache)."""
    reader = split.reader

    def encode_row(row: dict[str, Any], index: int) -> dict[str, list[int]]:
        ids, labels = encode_ids(reader.example(row, index), fmt, tokenizer, max_len,
                                 vocab_size)
        return {"input_ids": ids, "labels": labels}

    if not progress:
        import datasets

        datasets.disable_progress_bars()
    from datasets.fingerprint import Hasher

    # datasets hashes encode_row's closure but the module functions it calls only by name:
    # their source goes into the fingerprint, so changed encoding code never reads an old cache
    fingerprint = Hasher.hash((split.rows._fingerprint, fmt, max_len, vocab_size, reader.shape,
                               reader.mapping, tokenizer, _code_digest()))
    mapped = split.rows.map(encode_row, with_indices=True, remove_columns=split.rows.column_names,
                            desc="tokenize", new_fingerprint=fingerprint)
    return [Encoded(ids, labels) for ids, labels in zip(mapped["input_ids"], mapped["labels"])]
