"""Clear build locks left behind by killed JIT builds of the C++ ops.

torch.utils.cpp_extension builds each op in ``<extensions root>/<op>/`` under a
``FileBaton``: ``<op>/lock`` is created with O_EXCL, held open by the building process and
removed when the build ends. A build killed mid-way leaves ``lock`` behind, and every later
load of that op waits on it forever, silently. ``clear_stale_locks`` removes such locks.

A lock is live while a process this user can see holds it open (the builder, through the
baton's file descriptor) or works inside its build dir (ninja and the compilers run there),
and while it is younger than a short grace. Linux only (``/proc``); elsewhere nothing is
removed. Builds in another PID namespace (another container sharing the cache) or of another
user are not visible, so do not share one extensions root between those.

:func:`prefer_interpreter_ninja` picks the ``ninja`` the builds run with; the places that
build or load ops (the row op, ``deepspeed.initialize``) call it first.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

GRACE_S = 30.0
PROC = Path("/proc")


def extensions_root() -> Path:
    """The folder torch builds the JIT ops under, as ``_get_build_directory`` picks it."""
    configured = os.environ.get("TORCH_EXTENSIONS_DIR")
    if configured is not None:
        return Path(configured)
    import torch
    from torch.utils.cpp_extension import get_default_build_root

    if torch.version.hip is not None:
        accelerator = f"rocm{torch.version.hip.replace('.', '')}"
    elif torch.version.cuda is not None:
        accelerator = f"cu{torch.version.cuda.replace('.', '')}"
    else:
        accelerator = "cpu"
    python = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
    return Path(get_default_build_root()) / f"{python}_{accelerator}"


def prefer_interpreter_ninja() -> None:
    """Put this interpreter's own ``bin`` directory first on ``PATH`` when it holds a
    ``ninja`` (once; later calls change nothing).

    DeepSpeed's ops and meft_ds's row op are JIT-built with the ``ninja`` found on ``PATH``,
    and two ninja versions (the one pip installs with DeepSpeed into the virtual
    environment, and a system one) hash build commands differently, so each rebuilds what
    the other built (~2 minutes of compiling on two cores, at any run that follows a run
    started the other way, e.g. ``deepspeed`` from the venv after ``.venv/bin/python``).
    """
    bin_dir = os.path.dirname(sys.executable)
    path = os.environ.get("PATH", "")
    if os.path.isfile(os.path.join(bin_dir, "ninja")) and not path.startswith(
            bin_dir + os.pathsep):
        os.environ["PATH"] = bin_dir + os.pathsep + path


def _process_paths() -> tuple[set[str], set[str]]:
    """(working directories, open files) of the processes this user may inspect."""
    cwds: set[str] = set()
    files: set[str] = set()
    for proc in PROC.iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cwds.add(os.readlink(proc / "cwd"))
            with os.scandir(proc / "fd") as fds:
                for fd in fds:
                    try:
                        files.add(os.readlink(fd.path))
                    except OSError:
                        pass
        except OSError:  # exited, or another user's process
            continue
    return cwds, files


def clear_stale_locks(root: Path | None = None, *, grace_s: float = GRACE_S,
                      say: Callable[[str], object] = print) -> list[Path]:
    """Remove the build locks under ``root`` (default: ``extensions_root()``) whose builder
    is gone, saying one line for each; return the removed paths.

    A lock is kept while a process holds it open or runs inside its build dir (however old:
    a long build), or while it is younger than ``grace_s`` seconds. Never raises on a lock
    that vanishes or changes meanwhile.
    """
    root = extensions_root() if root is None else root
    if not (PROC / "self" / "cwd").exists():
        return []
    now = time.time()
    old: list[tuple[Path, os.stat_result]] = []
    for lock in sorted(root.glob("*/lock")):
        try:
            stat = lock.stat()
        except OSError:
            continue
        if now - stat.st_mtime >= grace_s:
            old.append((lock, stat))
    if not old:
        return []
    cwds, files = _process_paths()
    removed: list[Path] = []
    for lock, stat in old:
        build_dir = os.path.realpath(lock.parent)
        if os.path.realpath(lock) in files or any(
                cwd == build_dir or cwd.startswith(build_dir + os.sep) for cwd in cwds):
            continue
        try:
            now_stat = lock.stat()
            if (now_stat.st_ino, now_stat.st_mtime_ns) != (stat.st_ino, stat.st_mtime_ns):
                continue  # released and taken again by a new build meanwhile
            lock.unlink()
        except OSError:
            continue
        removed.append(lock)
        say(f"removed a stale build lock {lock} "
            f"(no build process, {time.time() - stat.st_mtime:.0f} s old)")
    return removed
