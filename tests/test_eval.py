"""Evaluation metrics on hand-checked examples, and greedy generation on SmolLM2."""

from __future__ import annotations

import pytest
import torch

from meft_ds.data import QAExample, format_prompt
from meft_ds.eval import (
    evaluate_qa,
    exact_match,
    first_answer_line,
    generate,
    gsm8k_correct,
    gsm8k_number,
    normalize_answer,
)


@pytest.mark.unit
def test_normalisation_follows_squad() -> None:
    assert normalize_answer("The  Eiffel Tower!") == "eiffel tower"
    assert normalize_answer("an Apple, a day") == "apple day"
    assert normalize_answer("U.S.A.") == "usa"


@pytest.mark.unit
def test_exact_match_any_accepted_answer() -> None:
    assert exact_match("the Beatles", ["Beatles", "The Fab Four"])
    assert exact_match("fab four.", ["Beatles", "The Fab Four"])
    assert not exact_match("Beatles band", ["Beatles"])
    assert not exact_match("", ["Beatles"])


@pytest.mark.unit
def test_gsm8k_numbers() -> None:
    ref = "Natalia sold 48/2 = 24 clips in May.\n#### 72"
    assert gsm8k_number(ref) == 72
    assert gsm8k_correct("so she sold 72 clips", [ref])
    assert gsm8k_correct("#### 72.0", [ref])
    assert not gsm8k_correct("she sold 71", [ref])
    assert gsm8k_number("total is 1,234 dollars") == 1234
    assert not gsm8k_correct("no number here", [ref])


@pytest.mark.integration
def test_greedy_generation_matches_transformers(smollm2) -> None:
    model, tok = smollm2.model, smollm2.tokenizer
    prompts = ["The capital of France is", "Question: What is 2+2?\nAnswer:"]

    def logits_fn(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return model(input_ids=ids, attention_mask=mask, use_cache=False).logits

    ours = generate(logits_fn, tok, prompts, max_new_tokens=6, batch_size=2, progress=False)
    for prompt, text in zip(prompts, ours):
        ids = tok(prompt, return_tensors="pt", add_special_tokens=False)
        ref = model.generate(**ids, max_new_tokens=6, do_sample=False)
        expected = tok.decode(ref[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
        assert text == expected.split(tok.eos_token)[0]
    assert "Paris" in ours[0]


@pytest.mark.integration
def test_evaluate_qa_scores_the_real_model(smollm2) -> None:
    model, tok = smollm2.model, smollm2.tokenizer

    def logits_fn(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return model(input_ids=ids, attention_mask=mask, use_cache=False).logits

    question = "who wrote the book the origin of species"
    raw = generate(logits_fn, tok, [format_prompt(question)], 12, 1, progress=False)[0]
    said = first_answer_line(raw)
    assert said  # the base model answers this prompt with a sentence
    examples = [QAExample(question, ("Charles Darwin", f"the {said}!")),
                QAExample(question, ("Charles Darwin",))]
    report = evaluate_qa(logits_fn, tok, examples, max_new_tokens=12, batch_size=2,
                         progress=False, hf_model=model)
    assert [r["prediction"] for r in report["predictions"]] == [said, said]
    assert [r["ok"] for r in report["predictions"]] == [True, False]
    assert report["score"] == 0.5
