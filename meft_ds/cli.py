"""Command line of ``launch/train.py``: flags, config files, and their precedence.

Precedence, lowest first: option defaults < the DeepSpeed JSON's ``"meft"`` section (with
its ``"when_no_cuda"`` overrides on machines without CUDA) < ``--config FILE`` < flags.
DeepSpeed keys come only from the DeepSpeed JSON (``--deepspeed PATH`` or
``--deepspeed_config PATH``); ``--micro_batch_size``, ``--grad_accum`` and ``--lr``
override the matching DeepSpeed values.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import sys
from pathlib import Path

from meft_ds import ds_config, methods, options
from meft_ds.config import TrainConfig
from meft_ds.errors import OneLineArgumentParser, UserError, cli_message

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DS_CONFIG = ROOT / "ds_configs" / "24gb.json"


def _method_fields() -> dict[str, list[str]]:
    """Flag name -> methods that define it."""
    owners: dict[str, list[str]] = {}
    for name in methods.available():
        for field in dataclasses.fields(methods.get(name).Options):
            owners.setdefault(field.name, []).append(name)
    return owners


def build_parser() -> argparse.ArgumentParser:
    """All flags: launcher, training, and every method's options."""
    parser = OneLineArgumentParser(
        prog="launch/train.py",
        description="Memory-efficient fine-tuning on DeepSpeed. Methods: "
        + ", ".join(f"{n} ({methods.get(n).help})" for n in methods.available()),
    )
    parser.add_argument("--deepspeed", metavar="PATH", default=None,
                        help=f"DeepSpeed JSON config (default: {DEFAULT_DS_CONFIG.name})")
    parser.add_argument("--deepspeed_config", metavar="PATH", default=None,
                        help="same as --deepspeed")
    parser.add_argument("--config", metavar="FILE", default=None,
                        help="JSON file of training/method options (flag names as keys)")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    options.add_dataclass_args(parser, TrainConfig, "training")
    seen = {f.name for f in dataclasses.fields(TrainConfig)}
    for name in methods.available():
        cls = methods.get(name).Options
        fresh = [f for f in dataclasses.fields(cls) if f.name not in seen]
        if not fresh:
            continue
        seen.update(f.name for f in fresh)
        sub = dataclasses.make_dataclass(
            cls.__name__, [(f.name, f.type, f) for f in fresh], namespace={}
        )
        sub.__module__ = cls.__module__
        options.add_dataclass_args(parser, sub, f"method {name}")
    _annotate_shared_and_choices(parser)
    return parser


def _annotate_shared_and_choices(parser: argparse.ArgumentParser) -> None:
    """List the methods in --method's help; mark options several methods share."""
    actions = parser._option_string_actions
    actions["--method"].help = "fine-tuning method: " + ", ".join(methods.available())
    for name, owners in _method_fields().items():
        action = actions.get(f"--{name}")
        if action is not None and len(owners) > 1:
            action.help = f"{action.help} [methods: {', '.join(owners)}]"


def _unknown_hint(name: str, known: set[str], source: str) -> str:
    """A close option name, or where a DeepSpeed key belongs."""
    close = difflib.get_close_matches(name, sorted(known), n=1)
    if close:
        return f" (did you mean {close[0]}?)"
    if source.startswith("config file") and name in DEEPSPEED_TOP_KEYS:
        return f" ({name} is a DeepSpeed key: put it in the --deepspeed file)"
    return ""


# Top-level keys of a DeepSpeed config that users may put in --config by mistake.
DEEPSPEED_TOP_KEYS = frozenset({
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
    "gradient_clipping", "zero_optimization", "optimizer", "scheduler", "bf16", "fp16",
    "steps_per_print", "wall_clock_breakdown", "activation_checkpointing",
})


def parse(argv: list[str] | None = None):
    """Resolve flags and config files into a :class:`meft_ds.runner.RunSpec`."""
    import torch

    from meft_ds.runner import RunSpec

    args = build_parser().parse_args(argv)
    if args.deepspeed and args.deepspeed_config and args.deepspeed != args.deepspeed_config:
        raise UserError("--deepspeed and --deepspeed_config name different files")
    ds_path = args.deepspeed or args.deepspeed_config or str(DEFAULT_DS_CONFIG)
    ds, meft = ds_config.split_config(
        ds_config.read_json(ds_path, "DeepSpeed config"), torch.cuda.is_available()
    )
    file_opts = ds_config.read_json(args.config, "config file") if args.config else {}
    flags = {k: v for k, v in vars(args).items() if v is not None}
    owners = _method_fields()
    known = {f.name for f in dataclasses.fields(TrainConfig)} | set(owners)
    for source, data in ((f"{ds_path}: 'meft' section", meft), (f"config file {args.config}",
                                                                 file_opts)):
        bad = sorted(k for k in data if k not in known)
        if bad:
            raise UserError(f"{source}: unknown option(s) {', '.join(bad)}"
                            f"{_unknown_hint(bad[0], known, source)}")
    train = options.build(TrainConfig, meft, file_opts, flags, context="options")
    method_cls = methods.get(train.method)
    own = {f.name for f in dataclasses.fields(method_cls.Options)}
    # Flags and --config are the user's own: an option of another method there is a
    # mistake. The DeepSpeed JSON's 'meft' defaults may name any method's options.
    for where, given in (("--{}", flags), (f"config file {args.config}: {{}}", file_opts)):
        foreign = sorted(k for k in given if k in owners and k not in own)
        if foreign:
            raise UserError(
                f"{where.format(foreign[0])} does not apply to method {train.method} "
                f"(it belongs to {', '.join(owners[foreign[0]])})"
            )
    method_options = options.build(method_cls.Options, meft, file_opts, flags,
                                   context=f"method {train.method}")
    return RunSpec(train=train, method_cls=method_cls, method_options=method_options, deepspeed=ds)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``launch/train.py``; user errors exit 2 with one line."""
    try:
        spec = parse(argv)
        from meft_ds.runner import run

        run(spec)
    except UserError as exc:
        print(f"error: {cli_message(exc)}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print("interrupted: the newest complete checkpoint is kept; continue with --resume",
              file=sys.stderr, flush=True)
        return 130
    return 0
