"""Where a dataset comes from: shipped names, local files and directories, the HF Hub.

Everything is opened with HF ``datasets`` (so its Arrow cache and formats come for free):

- ``nq_open`` / ``gsm8k``: JSONL files shipped in ``meft_ds/data/shipped`` (or under
  ``--data_dir`` / ``$MEFT_DS_DATA`` with the same layout); splits ``train``, ``heldout``;
- a local file: ``.jsonl``/``.json``, ``.csv``, ``.parquet``, ``.arrow`` (one split,
  ``train``);
- a directory written by ``save_to_disk`` (its splits), or a folder of data files;
- anything else is a Hub dataset id, resolved through the HF cache (downloaded when
  online). Offline, ``datasets`` reads the prepared copy an earlier online load left in
  ``HF_DATASETS_CACHE`` (``org___name/<config>/<version>/<commit>/``; the Hub snapshot in
  ``HF_HUB_CACHE`` is not consulted); offline and not cached it is refused in one line.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meft_ds.errors import UserError

SHIPPED_DIR = Path(__file__).resolve().parent / "shipped"
BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet",
            ".arrow": "arrow"}
HELDOUT_NAMES = ("heldout", "validation", "test")


@dataclass(frozen=True)
class Shipped:
    """A dataset that ships with the package: a file per split, and how it is scored."""

    files: dict[str, str]
    metric: str = "exact_match"


SHIPPED: dict[str, Shipped] = {
    "nq_open": Shipped({"train": "nq_open/NQ-open.dev.jsonl",
                        "heldout": "nq_open/NQ-open.efficientqa.dev.1.1.jsonl"}),
    "gsm8k": Shipped({"train": "gsm8k/train.jsonl", "heldout": "gsm8k/test.jsonl"},
                     metric="gsm8k_accuracy"),
}


def default_data_dir() -> Path:
    """``$MEFT_DS_DATA`` if set, else the data shipped with the package."""
    env = os.environ.get("MEFT_DS_DATA")
    return Path(env) if env else SHIPPED_DIR


def metric_for(source: str) -> str:
    """The score of a dataset: GSM8K's final-number accuracy, exact match otherwise."""
    return SHIPPED[source].metric if source in SHIPPED else "exact_match"


def open_splits(source: str, data_dir: Path | None = None) -> dict[str, Any]:
    """Split name -> ``datasets.Dataset`` of ``source`` (see the module docstring)."""
    if source in SHIPPED:
        root = data_dir or default_data_dir()
        files = {split: root / name for split, name in SHIPPED[source].files.items()}
        for path in files.values():
            if not path.is_file():
                raise UserError(f"data file {path} of dataset {source} does not exist (the "
                                f"shipped copy is in {SHIPPED_DIR}; `data_dir` overrides it)")
        return _load(source, "json", data_files={k: str(v) for k, v in files.items()})
    path = Path(source).expanduser()
    if path.is_file():
        builder = BUILDERS.get("".join(path.suffixes[-1:]).lower())
        if builder is None:
            raise UserError(f"{source}: unknown data file type; use one of "
                            f"{', '.join(BUILDERS)} or a save_to_disk directory")
        return _load(source, builder, data_files={"train": str(path)})
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            return _from_disk(path)
        return _load(source, str(path))
    if source.startswith((".", "/", "~")) or source.endswith(tuple(BUILDERS)):
        raise UserError(f"dataset {source!r} does not exist (not a shipped name: "
                        f"{', '.join(SHIPPED)}; not a local file or directory)")
    return _load(source, source)


def _load(source: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """``datasets.load_dataset`` with its failures as one line."""
    import datasets

    try:
        loaded = datasets.load_dataset(*args, **kwargs)
    except Exception as exc:  # datasets raises many types; the user needs one line
        raise UserError(f"dataset {source!r} could not be loaded: {_first_line(exc)}"
                        + _offline_hint(source)) from None
    return dict(loaded)


def _from_disk(path: Path) -> dict[str, Any]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as exc:
        raise UserError(f"{path}: not a readable save_to_disk directory: "
                        f"{_first_line(exc)}") from None
    return dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}


def _first_line(exc: BaseException) -> str:
    """The most specific message of an exception chain, on one line."""
    while exc.__cause__ is not None and str(exc.__cause__):
        exc = exc.__cause__
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".strip()


def _offline_hint(source: str) -> str:
    from huggingface_hub import constants

    if source in SHIPPED or Path(source).exists() or not constants.HF_HUB_OFFLINE:
        return ""
    return (f" (HF_HUB_OFFLINE is set and {source!r} is neither shipped "
            f"({', '.join(SHIPPED)}), a local path, nor in the HF cache)")


def choose_split(splits: dict[str, Any], name: str, source: str) -> Any:
    """Split ``name`` of an opened dataset, or one line listing the splits it has."""
    if name not in splits:
        raise UserError(f"dataset {source!r} has no split {name!r} (splits: "
                        f"{', '.join(splits) or 'none'})")
    return splits[name]


def default_heldout(splits: dict[str, Any], train_split: str) -> str | None:
    """The split used for held-out evaluation when none is named."""
    return next((s for s in HELDOUT_NAMES if s in splits and s != train_split), None)
