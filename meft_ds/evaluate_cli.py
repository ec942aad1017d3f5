"""Command line of ``launch/evaluate.py``: score a base model or an exported adapter."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from meft_ds import export, options
from meft_ds.config import TrainConfig
from meft_ds.data import DataSpec, check_format, open_split
from meft_ds.errors import OneLineArgumentParser, UserError, cli_message
from meft_ds.eval import evaluate_qa
from meft_ds.precision import DTYPES, cast_parameters


def build_parser() -> argparse.ArgumentParser:
    """Flags of the evaluator."""
    p = OneLineArgumentParser(
        prog="launch/evaluate.py",
        description="Score a base model or an exported adapter on question answering.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--adapter", help="directory written by training (<output_dir>/adapter)")
    src.add_argument("--model", help="evaluate a base model (smollm2-135m or a HF dir)")
    data = options.add_dataclass_args(
        p, TrainConfig, "data (as in training; unset: what the adapter trained on, else "
        "training's defaults)", only=DATA_FLAGS + ("prompt_format",), show_defaults=False)
    data.add_argument("--split", default="heldout", metavar="heldout|train|SPLIT",
                      help="what to score: heldout (default), the held-out set as training "
                      "chose it; train, the training split the adapter trained on (the part "
                      "--heldout_fraction leaves); or another split of the dataset, scored "
                      "as training's --split SPLIT would have read it")
    p.add_argument("--limit", type=int, default=128, help="first N examples (default: 128)")
    p.add_argument("--batch_size", type=int, default=32,
                   help="generation batch size (default: 32)")
    p.add_argument("--max_new_tokens", type=int, default=24,
                   help="generation length (default: 24)")
    p.add_argument("--output", default=None,
                   help="write the JSON report (with predictions) here; parent dirs are created")
    p.add_argument("--dtype", choices=("auto", *DTYPES), default="auto",
                   help="compute dtype of the adapted model (auto: the one it trained in, as "
                   "recorded with the export, so scores reproduce training's own; fp32 "
                   "for a base model)")
    p.add_argument("--no_progress", action="store_true", help="no progress bars")
    return p


def run(args: argparse.Namespace) -> dict:
    """Evaluate and return the report."""
    for name in ("limit", "batch_size", "max_new_tokens"):
        if getattr(args, name) <= 0:
            raise UserError(f"--{name} must be > 0")
    if args.output:  # before the generation, not after it
        _prepare_output(Path(args.output))
    meta = _adapter_meta(args.adapter)
    spec = _data_spec(args, meta)
    fmt = args.prompt_format or meta.get("prompt_format") or "plain"
    if args.no_progress:
        import datasets

        from meft_ds.models.loader import hide_loading_bars

        hide_loading_bars()
        datasets.disable_progress_bars()
    which = "heldout" if args.split == "heldout" else "train"
    examples = open_split(spec, which, args.limit).examples
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.adapter:
        from meft_ds.inference import load_adapted

        adapted = load_adapted(args.adapter, device=device,
                               dtype=None if args.dtype == "auto" else args.dtype)
        logits_fn, tokenizer = adapted.logits, adapted.tokenizer
        dtype = adapted.config["dtype"]
        hf_model = adapted.method.generation_model(adapted.module)  # as training scores
        generation_source = adapted.module
        vocab = int(adapted.module.config.vocab_size) if hasattr(adapted.module, "config") else None
    else:
        from meft_ds.models.loader import load_model

        loaded = load_model(args.model)
        dtype = "fp32" if args.dtype == "auto" else args.dtype
        model = cast_parameters(loaded.model, DTYPES[dtype], device).eval()
        tokenizer, vocab = loaded.tokenizer, int(model.config.vocab_size)
        hf_model = generation_source = model

        def logits_fn(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            return model(input_ids=ids, attention_mask=mask, use_cache=False).logits

    check_format(fmt, tokenizer)
    report = evaluate_qa(logits_fn, tokenizer, examples, spec.metric, args.max_new_tokens,
                         args.batch_size, device, vocab, progress=not args.no_progress,
                         hf_model=hf_model, prompt_format=fmt,
                         generation_config=getattr(generation_source, "generation_config", None))
    report["source"] = args.adapter or args.model
    report["split"] = args.split
    report["dtype"] = dtype
    report["data"] = spec.source
    report["prompt_format"] = fmt
    return report


DATA_FLAGS = ("dataset", "data_file", "data_dir", "heldout_file", "heldout_split",
              "heldout_fraction", "record_format", "column_map", "question_field",
              "answer_field")


def _adapter_meta(adapter: str | None) -> dict:
    """The export's recorded config (any layout), or {} (loading the adapter reports a
    missing or damaged one)."""
    if not adapter:
        return {}
    try:
        return export.read_meta(Path(adapter))
    except UserError:
        return {}


def _data_spec(args: argparse.Namespace, meta: dict) -> DataSpec:
    """The data flags given; without --dataset/--data_file, what the adapter trained on
    (recorded by export), else training's defaults. ``--split NAME`` (not ``train`` or
    ``heldout``) is training's ``--split``. Checked as training checks them."""
    given = {k: getattr(args, k) for k in DATA_FLAGS if getattr(args, k, None) is not None}
    which = getattr(args, "split", None)
    if which not in (None, "train", "heldout"):
        given["split"] = which
    recorded = meta.get("data") if isinstance(meta.get("data"), dict) else {
        # adapters exported before the "data" record kept these keys at the top level
        k: meta[k] for k in DATA_FLAGS if meta.get(k) is not None}
    base = {} if "dataset" in given or "data_file" in given else recorded
    try:
        spec = DataSpec(**{**base, **given})
    except TypeError:
        raise UserError("the adapter's recorded data options are not meft_ds's") from None
    spec.validate()
    return spec


def _prepare_output(path: Path) -> None:
    """Create the report's directory; refuse a path that cannot be written."""
    if path.is_dir():
        raise UserError(f"--output {path} is a directory; give a file name")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"--output {path}: cannot create {path.parent} ({exc.strerror})") from None


def main(argv: list[str] | None = None) -> int:
    """Entry point; user errors exit 2 with one line."""
    try:
        args = build_parser().parse_args(argv)
        report = run(args)
    except UserError as exc:
        print(f"error: {cli_message(exc)}", file=sys.stderr)
        return 2
    text = json.dumps(report, indent=2)
    if args.output:
        Path(args.output).write_text(text)
    score = 100 * report["score"]
    print(f"{report['metric']} on {report['n']} {args.split} examples: {score:.1f}%")
    return 0
