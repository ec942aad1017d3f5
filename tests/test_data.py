"""Data loading, prompt/label construction and the deterministic batch order."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from meft_ds.data import (
    IGNORE,
    BatchSchedule,
    Encoded,
    check_answers_kept,
    encode,
    load_split,
    read_jsonl,
)
from meft_ds.errors import UserError
from meft_ds.trainer import lm_loss


def test_nq_open_loads_with_all_answers(data_dir: Path) -> None:
    examples = load_split("nq_open", "train", data_dir, limit=5)
    assert len(examples) == 5
    assert all(e.answers and e.question for e in examples)
    heldout = load_split("nq_open", "heldout", data_dir, limit=3)
    assert heldout[0].question != examples[0].question


def test_gsm8k_answer_keeps_reasoning_and_number(data_dir: Path) -> None:
    ex = load_split("gsm8k", "train", data_dir, limit=1)[0]
    assert "####" in ex.answers[0]


def test_malformed_line_is_reported_with_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q1", "answer": ["a"]}\n{"question": "q2", "answer": \n')
    with pytest.raises(UserError, match=r"bad\.jsonl:2: malformed JSON"):
        read_jsonl(bad, "question", "answer")


def test_missing_field_and_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl"
    path.write_text(json.dumps({"q": "x", "answer": "y"}) + "\n")
    with pytest.raises(UserError, match=r"x\.jsonl:1: missing field 'question'"):
        read_jsonl(path, "question", "answer")
    with pytest.raises(UserError, match="does not exist"):
        read_jsonl(tmp_path / "nope.jsonl", "question", "answer")
    with pytest.raises(UserError, match="unknown dataset"):
        load_split("squad", "train")


def test_custom_fields(tmp_path: Path) -> None:
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"q": "who?", "a": "me"}) + "\n")
    ex = load_split("custom", "train", data_file=str(path), question_field="q", answer_field="a")
    assert ex[0].answers == ("me",)


def test_loss_only_on_answer_tokens(smollm2) -> None:
    tok = smollm2.tokenizer
    ex = load_split("nq_open", "train", limit=1)[0]
    enc = encode(ex, tok, 128, len(tok))
    answer_positions = [i for i, t in enumerate(enc.labels) if t != IGNORE]
    assert answer_positions == list(range(answer_positions[0], len(enc.labels)))
    decoded = tok.decode([enc.input_ids[i] for i in answer_positions], skip_special_tokens=True)
    assert decoded.strip() == ex.answers[0].strip()
    assert enc.labels[-1] == tok.eos_token_id
    assert len(encode(ex, tok, 5, len(tok)).input_ids) == 5


def test_truncated_answers_are_counted_and_all_truncated_is_refused(smollm2) -> None:
    tok = smollm2.tokenizer
    examples = load_split("nq_open", "train", limit=3)
    full = [encode(e, tok, 128, len(tok)) for e in examples]
    assert check_answers_kept(full, 128) == 0
    cut = [encode(e, tok, 4, len(tok)) for e in examples]  # inside every prompt
    with pytest.raises(UserError, match="--max_seq_len 4 truncates the answer of every"):
        check_answers_kept(cut, 4)
    assert check_answers_kept([full[0], cut[1], cut[2]], 4) == 2


def test_loss_of_a_batch_without_answer_tokens_is_zero_not_nan() -> None:
    logits = torch.randn(2, 5, 7, requires_grad=True)
    labels = torch.full((2, 5), IGNORE)
    loss = lm_loss(logits, labels)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(logits.grad, torch.zeros_like(logits))
    labels[0, 3] = 2
    labels[1, 4] = 5
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 7),
                                                 labels[:, 1:].reshape(-1), ignore_index=IGNORE)
    torch.testing.assert_close(lm_loss(logits, labels), expected)


def test_schedule_same_global_batch_for_accumulation_and_ranks() -> None:
    items = [Encoded([i, i + 1], [IGNORE, i + 1]) for i in range(40)]
    sched = BatchSchedule(items, micro_batch=2, seed=3, pad_id=0)

    def step_rows(step: int, accum: int, world: int) -> list[list[int]]:
        rows = []
        for a in range(accum):
            for r in range(world):
                idx = BatchSchedule.index(step, a, accum, r, world)
                rows += sched.batch(idx)["input_ids"].tolist()
        return sorted(rows)

    for step in range(12):  # crosses epoch boundaries (20 micro-batches per epoch)
        assert step_rows(step, 2, 1) == step_rows(step, 1, 2)
    first_epoch = [sched.batch(i)["input_ids"][:, 0].tolist() for i in range(20)]
    assert sorted(sum(first_epoch, [])) == list(range(40))
    with pytest.raises(UserError, match="fewer than one micro-batch"):
        BatchSchedule(items[:1], micro_batch=2, seed=0, pad_id=0)
