"""Evaluation metrics on hand-checked examples, and greedy generation on SmolLM2."""

from __future__ import annotations

import pytest
import torch

from meft_ds.data import QAExample, format_prompt, prompt_text
from meft_ds.eval import (
    evaluate_qa,
    exact_match,
    first_answer_line,
    generate,
    gsm8k_correct,
    gsm8k_number,
    normalize_answer,
    stop_ids,
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


@pytest.fixture(scope="module")
def shipped_tokenizer():
    """The shipped SmolLM2 tokenizer alone (no weights)."""
    from meft_ds.models.loader import load_tokenizer

    return load_tokenizer("smollm2-135m")


@pytest.mark.unit
def test_chat_answers_stop_at_the_end_of_turn_token(shipped_tokenizer) -> None:
    """--prompt_format chat stops where the template ends the assistant turn, also when
    that is not the tokenizer's EOS, and the token is not in the answer."""
    import copy
    from types import SimpleNamespace

    tok = shipped_tokenizer
    vocab = tok.get_vocab()
    im_end, text_end = vocab["<|im_end|>"], vocab["<|endoftext|>"]
    assert "<|im_end|>" in tok.chat_template  # SmolLM2's ChatML ends each turn with it
    assert im_end in stop_ids(tok, "chat")
    assert stop_ids(tok, "plain") == [tok.eos_token_id]
    # the model's generation_config EOS ids (one or a list) stop a chat answer too
    assert 7 in stop_ids(tok, "chat", SimpleNamespace(eos_token_id=[tok.eos_token_id, 7]))
    assert 9 in stop_ids(tok, "chat", SimpleNamespace(eos_token_id=9))
    assert all(i < 100 for i in stop_ids(tok, "chat", vocab_size=100))  # others: never wrapped

    # a tokenizer whose EOS is not the end-of-turn token (as Llama 3's <|end_of_text|> is
    # not <|eot_id|>): the answer, then <|im_end|>, then text the model runs on with
    other = copy.deepcopy(tok)
    other.eos_token = "<|endoftext|>"
    assert other.eos_token_id == text_end != im_end
    answer = other("Leonardo da Vinci", add_special_tokens=False)["input_ids"]
    script = [*answer, im_end, *other(" and more", add_special_tokens=False)["input_ids"]]

    def logits_fn(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(ids.shape[0], ids.shape[1], len(other))
        step = ids.shape[1] - width
        out[:, -1, script[min(step, len(script) - 1)]] = 1.0
        return out

    example = QAExample("who painted the mona lisa", ("Leonardo da Vinci",))
    width = len(other(prompt_text(example, "chat", other), add_special_tokens=False)["input_ids"])
    report = evaluate_qa(logits_fn, other, [example], max_new_tokens=len(script),
                         progress=False, prompt_format="chat")
    assert report["predictions"][0]["prediction"] == "Leonardo da Vinci" and report["score"] == 1
    ran_on = generate(logits_fn, other, [prompt_text(example, "chat", other)],
                      max_new_tokens=len(script), batch_size=1, progress=False)
    assert ran_on[0].endswith("and more")  # stopping at EOS alone runs past the turn
