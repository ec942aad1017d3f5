"""A run's output directory: refusing to mix runs, starting over, resuming consistently.

A run writes ``metrics.jsonl``, ``checkpoints/``, ``adapter/``, ``results.json``,
``predictions.json`` and ``before.json`` (the scores before training, kept so that a
resumed run still reports them). Each checkpoint also carries ``run.json``: the model,
method, method options, prompt format, precision and attention kernel that shaped it,
compared before a resume loads anything.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from meft_ds.errors import UserError

RUN_FILES = ("metrics.jsonl", "results.json", "predictions.json", "before.json")
RUN_DIRS = ("checkpoints", "adapter")
IDENTITY_FILE = "run.json"
BEFORE_FILE = "before.json"
# identity keys recorded since a later version: a run.json without them is not checked on them
LATER_KEYS = ("prompt_format", "precision", "attn_implementation")


def earlier_run(out: Path) -> list[str]:
    """Names of the run files already in ``out`` (empty: nothing to mix with)."""
    names = [n for n in RUN_FILES if (out / n).is_file()]
    return names + [n for n in RUN_DIRS if (out / n).is_dir() and any((out / n).iterdir())]


def check_fresh(out: Path, resume: bool, overwrite: bool) -> str | None:
    """Why this process cannot start in ``out`` (None: it can). (An ``out`` that is a file
    is refused when the options are parsed.)"""
    if resume or overwrite:
        return None
    found = earlier_run(out)
    if found:
        return (f"--output_dir {out} already holds a run ({', '.join(found)}); continue it "
                "with --resume, or pass --overwrite_output_dir true, or another --output_dir")
    return None


def clear(out: Path) -> None:
    """Remove an earlier run's files from ``out`` (other files stay)."""
    for name in RUN_FILES:
        (out / name).unlink(missing_ok=True)
    for name in RUN_DIRS:
        shutil.rmtree(out / name, ignore_errors=True)


def snapshot(value: Any) -> Any:
    """A JSON copy of ``value`` (later changes to it do not show)."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def write_identity(checkpoint_dir: Path, identity: dict[str, Any]) -> None:
    """Record what shaped a checkpoint (next to DeepSpeed's files)."""
    (checkpoint_dir / IDENTITY_FILE).write_text(json.dumps(snapshot(identity), indent=2))


def check_identity(checkpoint_dir: Path, identity: dict[str, Any]) -> None:
    """Refuse to resume a checkpoint written with another model, method, method options,
    prompt format, precision or attention kernel.

    Checkpoints without ``run.json`` (older ones) are not checked, nor on the
    ``LATER_KEYS`` their ``run.json`` lacks.
    """
    path = checkpoint_dir / IDENTITY_FILE
    if not path.is_file():
        return
    saved, now = _flatten(json.loads(path.read_text())), _flatten(snapshot(identity))
    now = {k: v for k, v in now.items() if k in saved or k not in LATER_KEYS}
    differ = sorted(k for k in saved.keys() | now.keys() if saved.get(k) != now.get(k))
    if differ:
        shown = ", ".join(f"{k} {saved.get(k)!r} -> {now.get(k)!r}" for k in differ[:4])
        more = f" and {len(differ) - 4} more" if len(differ) > 4 else ""
        raise UserError(f"`resume`: {checkpoint_dir} was written by another configuration "
                        f"({shown}{more}); resume with its options or use another `output_dir`")


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def _record(line: str) -> dict[str, Any] | None:
    """One metrics line, or None for a blank or torn one (a crash mid-write)."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) else None


def logged_steps(path: Path, upto: int) -> list[dict[str, Any]]:
    """The training-step records (with a loss) of steps ``<= upto`` in ``metrics.jsonl``."""
    if not path.is_file():
        return []
    records = (_record(line) for line in path.read_text().splitlines())
    return [r for r in records if r and "loss" in r and r.get("step", 0) <= upto]


def truncate_metrics(path: Path, step: int) -> int:
    """Drop metric records after ``step`` (logged after the checkpoint a run resumes from,
    they would otherwise appear twice) and torn lines; returns how many were dropped."""
    if not path.is_file():
        return 0
    lines = path.read_text().splitlines()
    kept = [line for line in lines if (r := _record(line)) and r.get("step", 0) <= step]
    if len(kept) != len(lines):
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(path)
    return len(lines) - len(kept)


def save_before(out: Path, scores: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / BEFORE_FILE).write_text(json.dumps(scores, indent=2))


def load_before(out: Path) -> dict[str, Any] | None:
    """The scores an earlier start of this run measured before training, if any."""
    path = out / BEFORE_FILE
    return json.loads(path.read_text()) if path.is_file() else None
