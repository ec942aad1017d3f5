"""Examples -> prompt text and token ids, with the loss on the answer tokens only.

Two formats (``--prompt_format``):

- ``plain``: ``Question: ...\\nAnswer:`` then `` answer`` + EOS, the same for every model;
- ``chat``: the tokenizer's own chat template (``apply_chat_template``); the loss covers
  exactly the text the template adds for each assistant turn (for ChatML: the answer and
  its ``<|im_end|>``).

Training and evaluation use the same function for the prompt, so a model is scored in the
format it was trained in.
"""

from __future__ import annotations

from typing import Any

from meft_ds.data.records import QAExample
from meft_ds.errors import UserError

FORMATS = ("plain", "chat")
IGNORE = -100


def format_prompt(question: str) -> str:
    """The plain prompt of one question (the answer follows after a space)."""
    question = question.strip()
    if question and question[-1] not in "?.!:":
        question += "?"
    return f"Question: {question}\nAnswer:"


def check_format(fmt: str, tokenizer: Any) -> None:
    """Refuse a format the tokenizer cannot render, in one line."""
    if fmt not in FORMATS:
        raise UserError(f"prompt format {fmt!r}: choose {' or '.join(FORMATS)}")
    if fmt == "chat" and not getattr(tokenizer, "chat_template", None):
        raise UserError("`prompt_format` chat: this tokenizer has no chat template; use "
                        "`prompt_format` plain")


def _messages(example: QAExample, with_answer: bool) -> list[dict[str, str]]:
    turns = [*example.context, ("user", example.question)]
    if with_answer:
        turns.append(("assistant", example.answers[0].strip()))
    return [{"role": role, "content": text} for role, text in turns]


def _template(tokenizer: Any, messages: list[dict[str, str]], generation: bool) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=generation)
    except Exception as exc:  # jinja raises its own errors (e.g. roles must alternate)
        raise UserError(f"the tokenizer's chat template cannot render this conversation: "
                        f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                        ) from None


def prompt_text(example: QAExample, fmt: str, tokenizer: Any) -> str:
    """The text a model is asked to continue with the answer (training and evaluation)."""
    if fmt == "chat":
        return _template(tokenizer, _messages(example, False), generation=True)
    lead = "".join(_plain_turn(role, text) for role, text in example.context)
    return lead + format_prompt(example.question)


def _plain_turn(role: str, text: str) -> str:
    """An earlier turn in the plain format (context only: not trained on)."""
    if role == "user":
        return format_prompt(text)
    return f" {text.strip()}\n" if role == "assistant" else f"{text.strip()}\n\n"


def pieces(example: QAExample, fmt: str, tokenizer: Any) -> list[tuple[list[int], bool]]:
    """Token ids of the example in order, each piece marked trained (True) or not.

    Pieces are tokenized separately, so an answer's ids never merge with its prompt's.
    """
    ids = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    if fmt == "plain":
        answer = ids(" " + example.answers[0].strip()) + [tokenizer.eos_token_id]
        return [(ids(prompt_text(example, fmt, tokenizer)), False), (answer, True)]
    prompt = prompt_text(example, fmt, tokenizer)
    full = _template(tokenizer, _messages(example, True), generation=False)
    if not full.startswith(prompt):
        raise UserError("the tokenizer's chat template does not render the answer after "
                        "the generation prompt; use `prompt_format` plain")
    return [(ids(prompt), False), (ids(full[len(prompt):]), True)]


def encode_ids(example: QAExample, fmt: str, tokenizer: Any, max_len: int,
               vocab_size: int) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)``: labels are ``IGNORE`` outside the answer. Truncated to
    ``max_len`` tokens."""
    ids: list[int] = []
    labels: list[int] = []
    for piece, trained in pieces(example, fmt, tokenizer):
        ids += piece
        labels += piece if trained else [IGNORE] * len(piece)
    return in_vocab(ids[:max_len], vocab_size), labels[:max_len]


def in_vocab(ids: list[int], vocab_size: int | None) -> list[int]:
    """``ids``, checked to lie in the model's vocabulary (never wrapped modulo its size:
    the loader refuses a tokenizer larger than the model's vocabulary up front)."""
    if vocab_size is not None and ids and max(ids) >= vocab_size:
        raise UserError(f"token id {max(ids)} is outside the model's vocabulary of "
                        f"{vocab_size}: the tokenizer is not the model's")
    return ids
