"""Dataset rows -> :class:`QAExample`, for three record shapes and a column mapping.

Shapes (``--record_format``, detected from the columns by default):

- ``qa``: ``question`` + ``answer`` (a string, or a list of accepted strings; the first
  one is the training target), as in NQ-open and GSM8K;
- ``alpaca``: ``instruction`` + optional ``input`` + ``output``;
- ``chat``: ``messages``, a list of ``{"role", "content"}`` turns (system / user /
  assistant); the last assistant turn is the target, the user turn before it the question.

``--column_map question=q,answer=a`` (or the ``--question_field`` / ``--answer_field``
shorthands) names the dataset's own columns for these canonical names.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from meft_ds.errors import UserError

SHAPES = ("auto", "qa", "alpaca", "chat")
# the canonical column names; REQUIRED: the columns each shape needs, FIELDS: all it reads
COLUMNS = ("question", "answer", "instruction", "input", "output", "messages")
REQUIRED = {"qa": ("question", "answer"), "alpaca": ("instruction", "output"),
            "chat": ("messages",)}
FIELDS = {**REQUIRED, "alpaca": ("instruction", "input", "output")}
DETECT_ORDER = ("chat", "alpaca", "qa")  # auto-detection tries them in this order
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class QAExample:
    """One question with its accepted answers (the first one is the training target).

    ``context`` holds the turns before the question, ``(role, text)`` pairs (a system
    prompt, earlier user/assistant turns of a chat); plain QA records have none.
    """

    question: str
    answers: tuple[str, ...]
    context: tuple[tuple[str, str], ...] = ()


def parse_column_map(text: str | None, question_field: str | None = None,
                     answer_field: str | None = None) -> dict[str, str]:
    """``"question=q,answer=a"`` -> ``{"question": "q", "answer": "a"}`` (identity for the
    rest); ``question_field`` / ``answer_field`` are shorthands for those two entries."""
    mapping = {name: name for name in COLUMNS}
    for item in filter(None, (part.strip() for part in (text or "").split(","))):
        canonical, sep, column = (s.strip() for s in item.partition("="))
        if not sep or not column:
            raise UserError(f"`column_map`: {item!r} is not NAME=COLUMN")
        if canonical not in COLUMNS:
            raise UserError(f"`column_map`: unknown name {canonical!r}; "
                            f"choose from {', '.join(COLUMNS)}")
        mapping[canonical] = column
    for canonical, column in (("question", question_field), ("answer", answer_field)):
        if column:
            mapping[canonical] = column
    return mapping


def detect_shape(columns: Sequence[str], mapping: Mapping[str, str], wanted: str,
                 where: str) -> str:
    """The record shape of a dataset with ``columns`` (``wanted``: a shape or ``auto``).

    Detection reads the mapped column names. When the column map names a shape's fields
    (``question=prompt,answer=response``), only the shapes it names are candidates: a
    dataset with other columns that fit another shape is not read as that shape, and a
    mapped column that is missing is refused.
    """
    have = set(columns)
    if wanted != "auto":
        candidates = [wanted]
    else:
        mapped = {name for name, column in mapping.items() if column != name}
        candidates = [s for s in DETECT_ORDER if mapped & set(FIELDS[s])]
    for shape in candidates or DETECT_ORDER:
        if all(mapping[c] in have for c in REQUIRED[shape]):
            return shape
    if candidates:
        shape = candidates[0]
        missing = next(mapping[c] for c in REQUIRED[shape] if mapping[c] not in have)
        raise UserError(f"{where}: missing column {missing!r} for {shape} records "
                        f"(columns: {', '.join(columns)}); map it with `column_map`")
    raise UserError(
        f"{where}: no known record shape in columns {', '.join(columns)}: need question/answer, "
        "instruction/output or messages; map yours with `column_map` NAME=COLUMN"
    )


def _text(value: Any) -> str | None:
    return value.strip() if isinstance(value, str) and value.strip() else None


class RecordReader:
    """Turns rows of one dataset (one shape, one column mapping) into examples."""

    def __init__(self, shape: str, mapping: Mapping[str, str], where: str) -> None:
        self.shape, self.mapping, self.where = shape, dict(mapping), where

    def example(self, row: Mapping[str, Any], index: int) -> QAExample:
        """Row ``index`` as an example; a bad row is one line naming the dataset and row."""
        get = lambda name: row.get(self.mapping[name])  # noqa: E731
        if self.shape == "qa":
            question, answers = _text(get("question")), self._answers(get("answer"), index)
            if question is None or not answers:
                raise self._bad(index, "empty question or answer")
            return QAExample(question, answers)
        if self.shape == "alpaca":
            instruction, output = _text(get("instruction")), _text(get("output"))
            if instruction is None or output is None:
                raise self._bad(index, "empty instruction or output")
            extra = _text(get("input"))
            return QAExample(f"{instruction}\n\n{extra}" if extra else instruction, (output,))
        return self._chat(get("messages"), index)

    def _chat(self, messages: Any, index: int) -> QAExample:
        if not isinstance(messages, list) or not messages:
            raise self._bad(index, "messages is not a non-empty list of turns")
        turns: list[tuple[str, str]] = []
        for turn in messages:
            role = turn.get("role") if isinstance(turn, Mapping) else None
            content = turn.get("content") if isinstance(turn, Mapping) else None
            if role not in ROLES or not isinstance(content, str):
                raise self._bad(index, "each turn needs a role (system, user or assistant) "
                                "and a string content")
            turns.append((role, content))
        last = max((i for i, (role, _) in enumerate(turns) if role == "assistant"), default=None)
        if last is None:
            raise self._bad(index, "a chat record without an assistant turn")
        if last == 0 or turns[last - 1][0] != "user" or not turns[last][1].strip():
            raise self._bad(index, "the last assistant turn must be non-empty and follow a "
                            "user turn")
        return QAExample(turns[last - 1][1], (turns[last][1].strip(),), tuple(turns[: last - 1]))

    def _answers(self, value: Any, index: int) -> tuple[str, ...]:
        """Accepted answers: a string, a list of strings (numbers count as their text) or
        SQuAD's ``{"text": [...], "answer_start": [...]}``; the first must be non-empty.
        Any other dict or nested value is refused in one line."""
        if isinstance(value, Mapping) and isinstance(value.get("text"), (list, str)):
            value = value["text"]  # SQuAD: the accepted texts (answer_start is not used)
        items = value if isinstance(value, list) else [value]
        for item in items:
            if item is not None and not isinstance(item, (str, int, float)):
                kind = f"a {type(item).__name__}"
                if isinstance(item, Mapping):  # (Arrow gives a struct's rows all its keys)
                    keys = ", ".join(str(k) for k, v in item.items() if v is not None)
                    kind = f"a dict (keys: {keys})"
                raise self._bad(index, f"answer column {self.mapping['answer']!r} holds {kind}; "
                                "give a string, a list of strings or SQuAD's {\"text\": [...]}")
        answers = tuple(str(a) for a in items if a is not None)
        return answers if answers and answers[0].strip() else ()

    def _bad(self, index: int, why: str) -> UserError:
        return UserError(f"{self.where} row {index}: {why}")


