"""Atomic checkpoints of the DeepSpeed engine + state outside it, RNG, data position.

Layout under ``<output_dir>/checkpoints``: ``step_0000020/`` (the engine's files, with
frozen parameters excluded, plus the method's external state) and ``latest`` (the tag
of the newest complete checkpoint). A checkpoint is written as ``<tag>.partial`` and
renamed when every rank has finished, so a crash never leaves a half-written checkpoint
behind ``latest``.
"""

from __future__ import annotations

import os
import pickle
import random
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from meft_ds import cpu_adam_state, run_dir
from meft_ds import dist as mdist
from meft_ds.errors import UserError

LATEST = "latest"


def rng_state() -> dict[str, Any]:
    """All random number generator states that influence training."""
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _rng_file(directory: Path, rank: int) -> Path:
    return directory / f"rng_rank{rank:05d}.pt"


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore :func:`rng_state`."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextmanager
def _without_frozen_aliases(module: torch.nn.Module) -> Iterator[None]:
    """Drop every state-dict entry that shares storage with a frozen parameter.

    ``exclude_frozen_parameters`` drops frozen parameters by name, but a tied weight
    (``lm_head.weight`` = ``embed_tokens.weight``) has a second name that
    ``named_parameters()`` never lists, so the whole embedding would be saved again.
    """
    frozen = {p.data_ptr() for p in module.parameters() if not p.requires_grad and p.numel()}

    def hook(_module, state, _prefix, _metadata):
        for key in [k for k, v in state.items()
                    if isinstance(v, torch.Tensor) and v.numel() and v.data_ptr() in frozen]:
            del state[key]

    handle = module._register_state_dict_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def tag_for(step: int) -> str:
    """Directory name of the checkpoint after ``step`` optimizer steps."""
    return f"step_{step:07d}"


def save(engine: Any, method: Any, root: Path, step: int, client_state: dict, keep: int,
         identity: dict | None = None) -> Path:
    """Write a checkpoint atomically and prune old ones; returns its directory.

    ``identity``: what shaped the run, stored as ``run.json`` for resume checks."""
    root.mkdir(parents=True, exist_ok=True)
    tag = tag_for(step)
    partial = tag + ".partial"
    with _without_frozen_aliases(engine.module):
        engine.save_checkpoint(
            str(root), tag=partial, client_state=client_state, save_latest=False,
            exclude_frozen_parameters=True,
        )
    method.save_state(root / partial)
    # Each rank's own RNG (the engine's client state is rank 0's): dropout masks differ
    # per rank, so a resume on the same ranks must restore each one's.
    (root / partial).mkdir(parents=True, exist_ok=True)
    torch.save(rng_state(), _rng_file(root / partial, mdist.rank()))
    mdist.barrier()
    if mdist.rank() == 0:
        if identity is not None:
            run_dir.write_identity(root / partial, identity)
        final = root / tag
        if final.exists():
            shutil.rmtree(final)
        os.replace(root / partial, final)
        tmp = root / (LATEST + ".tmp")
        tmp.write_text(tag)
        os.replace(tmp, root / LATEST)
        _prune(root, keep)
    mdist.barrier()
    return root / tag


def _prune(root: Path, keep: int) -> None:
    tags = sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".partial"))
    for old in tags[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def latest_tag(root: Path) -> str | None:
    """Tag of the newest complete checkpoint, or None."""
    marker = root / LATEST
    if not marker.is_file():
        return None
    tag = marker.read_text().strip()
    return tag if (root / tag).is_dir() else None


def tag_step(tag: str) -> int | None:
    """The step of a checkpoint tag (``None`` for a tag not written by :func:`tag_for`)."""
    head, _, digits = tag.partition("_")
    return int(digits) if head == "step" and digits.isdigit() else None


def load(engine: Any, method: Any, root: Path) -> dict[str, Any]:
    """Restore the newest checkpoint into ``engine`` and ``method``; returns client state."""
    tag = latest_tag(root)
    if tag is None:
        raise UserError(f"`resume`: no checkpoint found in {root}")
    try:
        path, client_state = engine.load_checkpoint(
            str(root), tag=tag, load_module_strict=False, load_optimizer_states=True,
            load_lr_scheduler_states=True,
        )
        if path is not None:
            method.load_state(root / tag)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"`resume`: checkpoint {root / tag} cannot be read ({first}); if it is damaged, "
            f"write an older step_* name into {root / LATEST} or start over"
        ) from None
    if path is None:
        raise UserError(f"`resume`: DeepSpeed could not load checkpoint {root / tag}")
    cpu_adam_state.replay_steps(engine.optimizer)
    client_state = dict(client_state or {})
    own = _rng_file(root / tag, mdist.rank())
    if own.is_file() and client_state.get("world_size") == mdist.world_size():
        client_state["rng"] = torch.load(own, weights_only=False)
    return client_state
