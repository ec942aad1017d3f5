"""Command line of ``launch/generate.py``: answers from an exported adapter, for prompts
given as arguments, in a file, or typed (or piped) one per line on standard input."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from meft_ds import export
from meft_ds.data import FORMATS, QAExample, check_format, prompt_text
from meft_ds.errors import OneLineArgumentParser, UserError, cli_message
from meft_ds.precision import DTYPES


def build_parser() -> argparse.ArgumentParser:
    """Flags of the generator."""
    p = OneLineArgumentParser(
        prog="launch/generate.py",
        description="Answer prompts with an exported adapter (any method): prompts as "
        "arguments, --prompts_file, or one per line on standard input.")
    p.add_argument("prompts", nargs="*", metavar="PROMPT",
                   help="questions to answer (none and no --prompts_file: read stdin)")
    p.add_argument("--adapter", required=True,
                   help="directory written by training (<output_dir>/adapter)")
    p.add_argument("--prompts_file", default=None,
                   help="a text file of prompts, one per line (blank lines skipped)")
    p.add_argument("--prompt_format", choices=FORMATS, default=None,
                   help="plain ('Question: ...\\nAnswer:') or chat (the tokenizer's template); "
                   "default: the format the adapter trained in")
    p.add_argument("--max_new_tokens", type=int, default=64,
                   help="longest answer in tokens (default: 64)")
    p.add_argument("--do_sample", action="store_true",
                   help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=None,
                   help="sampling temperature (with --do_sample; default 1.0)")
    p.add_argument("--top_p", type=float, default=None,
                   help="nucleus sampling: the smallest set of tokens with this probability "
                   "mass (with --do_sample; default 1.0, all tokens)")
    p.add_argument("--seed", type=int, default=0, help="seed for sampling (default: 0)")
    p.add_argument("--batch_size", type=int, default=8,
                   help="prompts generated together (default: 8)")
    p.add_argument("--dtype", choices=("auto", *DTYPES), default="auto",
                   help="compute dtype (auto: the one the adapter trained in)")
    p.add_argument("--jsonl", action="store_true",
                   help="print one JSON object {prompt, answer} per line")
    return p


def check_args(args: argparse.Namespace) -> None:
    """Refuse impossible option values, one line each, before anything loads."""
    for name in ("max_new_tokens", "batch_size"):
        if getattr(args, name) <= 0:
            raise UserError(f"--{name} must be > 0")
    for name in ("temperature", "top_p"):
        if getattr(args, name) is not None and not args.do_sample:
            raise UserError(f"--{name} applies to sampling: add --do_sample")
    if args.temperature is not None and args.temperature <= 0:
        raise UserError(f"--temperature must be > 0, got {args.temperature}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise UserError(f"--top_p must be in (0, 1], got {args.top_p}")
    if args.prompts and args.prompts_file:
        raise UserError("give prompts as arguments or --prompts_file, not both")


def read_prompts(path: str) -> list[str]:
    """The non-blank lines of a prompts file."""
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise UserError(f"--prompts_file {path}: cannot read it ({reason})") from None
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise UserError(f"--prompts_file {path} has no prompts")
    return prompts


def sample_token(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """One token per row of ``logits`` ``[batch, vocab]``, drawn at ``temperature`` from
    the smallest set of tokens whose probability reaches ``top_p``."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    keep = sorted_probs.cumsum(dim=-1) - sorted_probs < top_p  # the most likely always stays
    choice = torch.multinomial(sorted_probs * keep, 1)
    return order.gather(1, choice)[:, 0]


class _Sampling:
    """A transformers model whose ``generate`` samples (:func:`meft_ds.eval.generate`
    asks for greedy decoding)."""

    def __init__(self, model: Any, temperature: float, top_p: float) -> None:
        self.model = model
        self.generation_config = model.generation_config
        self.sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p,
                         "top_k": 0}

    def generate(self, **kwargs: Any) -> torch.Tensor:
        return self.model.generate(**{**kwargs, **self.sampling})


def _sampled(logits_fn: Callable, temperature: float, top_p: float) -> Callable:
    """``logits_fn`` whose last position puts all weight on a sampled token, so that
    greedy decoding (for methods with their own forward) takes it."""
    def fn(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        last = logits_fn(ids, mask)[:, -1]
        out = torch.full_like(last, float("-inf"), dtype=torch.float32)
        out.scatter_(1, sample_token(last, temperature, top_p)[:, None], 0.0)
        return out[:, None, :]
    return fn


class Generator:
    """An adapted model that answers prompts in a format, greedily or by sampling."""

    def __init__(self, args: argparse.Namespace) -> None:
        from meft_ds.eval import stop_ids
        from meft_ds.inference import load_adapted

        device = "cuda" if torch.cuda.is_available() else "cpu"
        adapted = load_adapted(args.adapter, device=device,
                               dtype=None if args.dtype == "auto" else args.dtype)
        self.fmt = args.prompt_format or adapted.config.get("prompt_format") or "plain"
        check_format(self.fmt, adapted.tokenizer)
        module = adapted.module
        self.vocab = int(module.config.vocab_size) if hasattr(module, "config") else None
        self.hf_model = adapted.method.generation_model(module)
        self.logits_fn = adapted.logits
        if args.do_sample:
            temperature = 1.0 if args.temperature is None else args.temperature
            top_p = 1.0 if args.top_p is None else args.top_p
            if self.hf_model is not None:
                self.hf_model = _Sampling(self.hf_model, temperature, top_p)
            else:
                self.logits_fn = _sampled(self.logits_fn, temperature, top_p)
        self.tokenizer, self.device, self.args = adapted.tokenizer, device, args
        self.stop = stop_ids(self.tokenizer, self.fmt, getattr(module, "generation_config", None),
                             self.vocab)
        torch.manual_seed(args.seed)

    def answer(self, prompts: list[str]) -> list[str]:
        """The model's answers to ``prompts``, prompted as the adapter trained."""
        from meft_ds.eval import generate

        texts = [prompt_text(QAExample(p, ("",)), self.fmt, self.tokenizer) for p in prompts]
        raw = generate(self.logits_fn, self.tokenizer, texts, self.args.max_new_tokens,
                       self.args.batch_size, self.device, self.vocab, progress=False,
                       hf_model=self.hf_model, stop=self.stop)
        return [text.strip() for text in raw]


def _show(prompts: list[str], answers: list[str], jsonl: bool, echo: bool) -> None:
    for prompt, answer in zip(prompts, answers):
        if jsonl:
            print(json.dumps({"prompt": prompt, "answer": answer}), flush=True)
        else:
            print(f"> {prompt}\n{answer}\n" if echo else answer, flush=True)


def run(args: argparse.Namespace) -> None:
    """Answer the prompts of the command line or file, else each line of stdin."""
    check_args(args)
    prompts = read_prompts(args.prompts_file) if args.prompts_file else args.prompts
    export.read_meta(Path(args.adapter))  # a bad path fails before the model loads
    from transformers.utils import logging as hf_logging

    warnings.filterwarnings("ignore", category=FutureWarning)  # libraries' deprecation notes
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    generator = Generator(args)
    if prompts:
        _show(prompts, generator.answer(prompts), args.jsonl, echo=len(prompts) > 1)
        return
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"prompts in the {generator.fmt} format; an empty line is skipped, Ctrl-D ends",
              file=sys.stderr)
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            return
        if line.strip():
            _show([line.strip()], generator.answer([line.strip()]), args.jsonl, echo=False)


def main(argv: list[str] | None = None) -> int:
    """Entry point; user errors exit 2 with one line."""
    try:
        run(build_parser().parse_args(argv))
    except UserError as exc:
        print(f"error: {cli_message(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        return 130
    return 0
