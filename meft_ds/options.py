"""Dataclass options <-> argparse flags <-> config-file keys, with one mechanism.

Every option group (training options, each method's options) is a dataclass. Its fields
become ``--name`` flags, can be set from the ``"meft"`` section of a DeepSpeed JSON or a
method config file, and are validated in the dataclass's ``validate()``.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Sequence
from typing import Any, TypeVar

from meft_ds.errors import UserError

T = TypeVar("T")


def opt(default: Any, help_text: str, **meta: Any) -> Any:
    """A dataclass field with its ``--help`` text; ``meta`` goes to the flag (``choices``,
    ``cli=False``, ...)."""
    return dataclasses.field(default=default, metadata={"help": help_text, **meta})


def _base_type(tp: Any) -> Any:
    """The scalar type of a field annotation (``int | None`` -> ``int``)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else str
    return tp


def _parse_bool(text: str) -> bool:
    low = text.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type, title: str,
                       only: Sequence[str] | None = None,
                       show_defaults: bool = True) -> argparse._ArgumentGroup:
    """Add one ``--field`` flag per dataclass field; defaults are ``None`` (= not given).

    ``only``: these fields (another command line sharing some of the options, e.g. the
    evaluator's data flags); ``show_defaults=False`` leaves the field defaults out of the
    help, for a command line whose unset flags mean something else. Returns the group.
    """
    group = parser.add_argument_group(title)
    hints = typing.get_type_hints(cls)
    fields = dataclasses.fields(cls)
    if only is not None:
        unknown = set(only) - {f.name for f in fields}
        if unknown:
            raise ValueError(f"{cls.__name__} has no fields {sorted(unknown)}")
        fields = tuple(f for f in fields if f.name in only)
    for field in fields:
        if not field.init or field.metadata.get("cli") is False:
            continue
        tp = _base_type(hints[field.name])
        # argparse %-formats help ("%(default)s"): a literal percent sign must be doubled
        help_text = field.metadata.get("help", "").replace("%", "%%")
        default = field.default if field.default is not dataclasses.MISSING else None
        if default is not None and show_defaults:
            help_text = f"{help_text} (default: {default})"
        kwargs: dict[str, Any] = {"default": None, "help": help_text, "dest": field.name}
        if tp is bool:
            kwargs.update(nargs="?", const=True, type=_parse_bool, metavar="BOOL")
        elif tp in (int, float, str):
            kwargs["type"] = tp
        if "choices" in field.metadata:
            kwargs["choices"] = field.metadata["choices"]
        group.add_argument(f"--{field.name}", **kwargs)
    return group


def build(cls: type[T], *sources: dict[str, Any], context: str = "config") -> T:
    """Instantiate ``cls`` from dicts of values, later sources overriding earlier ones.

    ``None`` values are ignored (an unset flag). Types are coerced and checked; the
    dataclass's ``validate()`` (if any) runs last. Bad values raise :class:`UserError`.
    """
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    values: dict[str, Any] = {}
    for source in sources:
        for key, value in source.items():
            if key in fields and value is not None:
                values[key] = _coerce(hints[key], value, key, context)
    obj = cls(**values)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate()
    for key, value in values.items():  # choices from config files, not only flags
        choices = fields[key].metadata.get("choices")
        if choices and value not in choices:
            raise UserError(f"{context}: {key}={value!r} is not one of "
                            f"{', '.join(map(str, choices))}")
    return obj


def _coerce(tp: Any, value: Any, key: str, context: str) -> Any:
    base = _base_type(tp)
    try:
        if base is bool:
            return value if isinstance(value, bool) else _parse_bool(str(value))
        if base in (int, float) and isinstance(value, bool):
            raise ValueError  # JSON true/false is not a number
        if base is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if base is float:
            return float(value)
        if base is str:
            return str(value)
    except (ValueError, TypeError, argparse.ArgumentTypeError):
        raise UserError(f"{context}: {key}={value!r} is not a valid {base.__name__}") from None
    return value


def as_dict(obj: Any) -> dict[str, Any]:
    """Plain dict of a dataclass instance (for logging and export)."""
    return dataclasses.asdict(obj)
