"""Exact match / GSM8K accuracy and batched greedy generation."""

from __future__ import annotations

import re
import string
from collections.abc import Callable, Sequence
from typing import Any

import torch
from tqdm import tqdm

from meft_ds.data import QAExample, prompt_text
from meft_ds.data.prompts import in_vocab

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)
_NUMBER = re.compile(r"-?[\d,]*\.?\d+")


def normalize_answer(text: str) -> str:
    """SQuAD/NQ normalisation: lower-case, drop punctuation and articles, fold spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, answers: Sequence[str]) -> bool:
    """Whether the normalised prediction equals any normalised accepted answer."""
    pred = normalize_answer(prediction)
    return any(pred == normalize_answer(a) for a in answers)


def _to_number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def gsm8k_number(text: str) -> float | None:
    """The final number of a GSM8K answer: after ``####`` if present, else the last one."""
    if "####" in text:
        text = text.split("####", 1)[1]
        found = _NUMBER.search(text)
        return _to_number(found.group()) if found else None
    found = _NUMBER.findall(text)
    return _to_number(found[-1]) if found else None


def gsm8k_correct(prediction: str, answers: Sequence[str]) -> bool:
    """Whether the prediction's final number equals the reference's ``#### number``."""
    pred = gsm8k_number(prediction)
    gold = gsm8k_number(answers[0])
    return pred is not None and gold is not None and abs(pred - gold) < 1e-6


METRICS: dict[str, Callable[[str, Sequence[str]], bool]] = {
    "exact_match": exact_match,
    "gsm8k_accuracy": gsm8k_correct,
}


# tokens that end an assistant turn in common chat templates (ChatML, Llama 3, Gemma, Phi-3)
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<end_of_turn>", "<|end|>",
               "<|endoftext|>")


def stop_ids(tokenizer: Any, prompt_format: str = "plain", generation_config: Any = None,
             vocab_size: int | None = None) -> list[int]:
    """The token ids that end an answer (the tokenizer's EOS first).

    ``plain`` answers end with EOS, as trained. A ``chat`` answer ends where the template
    ends the assistant turn, which is not always EOS (Llama 3 ``<|eot_id|>``, Qwen
    ``<|im_end|>``, Gemma ``<end_of_turn>``): the model's ``generation_config`` EOS id(s) and
    the known end-of-turn tokens the vocabulary has stop it too (those inside the model's
    ``vocab_size``: a token it cannot emit stops nothing).
    """
    ids = [tokenizer.eos_token_id]
    if prompt_format == "chat":
        configured = getattr(generation_config, "eos_token_id", None)
        ids += configured if isinstance(configured, list) else [configured]
        vocab = tokenizer.get_vocab()
        ids += [vocab[token] for token in END_OF_TURN if token in vocab]
    ids = [i for i in ids if i is not None and (vocab_size is None or i < vocab_size)]
    return list(dict.fromkeys(ids))


def first_answer_line(text: str) -> str:
    """The model's answer: generation up to the first newline (NQ answers are short)."""
    return text.strip().split("\n", 1)[0].strip()


@torch.no_grad()
def generate(
    logits_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    tokenizer: Any,
    prompts: Sequence[str],
    max_new_tokens: int,
    batch_size: int,
    device: torch.device | str = "cpu",
    vocab_size: int | None = None,
    progress: bool = True,
    hf_model: Any = None,
    stop: Sequence[int] | None = None,
) -> list[str]:
    """Batched greedy decoding with left padding; a row ends at the first of ``stop``
    (default: the tokenizer's EOS; see :func:`stop_ids`), which the text leaves out.

    With ``hf_model`` (a transformers model whose forward is the method's forward) this
    uses its ``generate`` with a KV cache; otherwise any ``logits_fn(ids, mask)`` works
    (custom forwards): each step then recomputes the prefix, fine for short answers.
    """
    eos = tokenizer.eos_token_id
    stops = list(stop) if stop else [eos]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    outputs: list[str] = []
    batches = range(0, len(prompts), batch_size)
    for start in tqdm(batches, desc="generate", disable=not progress, leave=False):
        chunk = prompts[start : start + batch_size]
        encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in chunk]
        encoded = [in_vocab(ids, vocab_size) for ids in encoded]
        width = max(len(e) for e in encoded)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, e in enumerate(encoded):
            ids[row, width - len(e) :] = torch.tensor(e)
            mask[row, width - len(e) :] = 1
        ids, mask = ids.to(device), mask.to(device)
        if hf_model is not None:
            out = hf_model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                do_sample=False, pad_token_id=pad,
                eos_token_id=stops[0] if len(stops) == 1 else stops, use_cache=True,
            )
            _decode_rows(out[:, width:].tolist(), stops, tokenizer, outputs)
            continue
        stop_t = torch.tensor(stops, device=device)
        done = torch.zeros(len(chunk), dtype=torch.bool, device=device)
        new_tokens: list[torch.Tensor] = []
        for _ in range(max_new_tokens):
            logits = logits_fn(ids, mask)[:, -1, :]
            nxt = logits.argmax(dim=-1)
            nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
            new_tokens.append(nxt)
            ended = torch.isin(nxt, stop_t)
            done |= ended
            ids = torch.cat([ids, nxt[:, None]], dim=1)
            mask = torch.cat([mask, (~done | ended).long()[:, None]], dim=1)
            if bool(done.all()):
                break
        _decode_rows(torch.stack(new_tokens, dim=1).tolist(), stops, tokenizer, outputs)
    return outputs


def _decode_rows(rows: list[list[int]], stops: Sequence[int], tokenizer: Any,
                 outputs: list[str]) -> None:
    """Each row's text up to its first stop token (left out, as are special tokens)."""
    for row in rows:
        end = next((i for i, t in enumerate(row) if t in stops), len(row))
        outputs.append(tokenizer.decode(row[:end], skip_special_tokens=True))


def evaluate_qa(
    logits_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    tokenizer: Any,
    examples: Sequence[QAExample],
    metric: str = "exact_match",
    max_new_tokens: int = 24,
    batch_size: int = 16,
    device: torch.device | str = "cpu",
    vocab_size: int | None = None,
    progress: bool = True,
    hf_model: Any = None,
    prompt_format: str = "plain",
    generation_config: Any = None,
) -> dict[str, Any]:
    """Score ``examples`` prompted in ``prompt_format`` (as in training), answers ending
    where that format ends them (:func:`stop_ids`; ``generation_config``: the model's,
    default ``hf_model``'s): ``{"score", "n", "predictions": [{question, prediction, ok}]}``."""
    scorer = METRICS[metric]
    prompts = [prompt_text(e, prompt_format, tokenizer) for e in examples]
    if generation_config is None:
        generation_config = getattr(hf_model, "generation_config", None)
    stop = stop_ids(tokenizer, prompt_format, generation_config, vocab_size)
    raw = generate(
        logits_fn, tokenizer, prompts, max_new_tokens, batch_size, device, vocab_size, progress,
        hf_model, stop,
    )
    rows = []
    for example, text in zip(examples, raw):
        pred = first_answer_line(text) if metric == "exact_match" else text
        rows.append(
            {"question": example.question, "prediction": pred, "answers": list(example.answers),
             "ok": bool(scorer(pred, example.answers))}
        )
    score = sum(r["ok"] for r in rows) / max(len(rows), 1)
    return {"metric": metric, "score": score, "n": len(rows), "predictions": rows}
