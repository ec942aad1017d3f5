"""Stale JIT build locks: removed when their builder is gone, kept while it lives."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest
from torch.utils import cpp_extension
from torch.utils.file_baton import FileBaton

from meft_ds import build_lock
from meft_ds.build_lock import clear_stale_locks, extensions_root

pytestmark = pytest.mark.unit


def make_lock(root: Path, op: str = "some_op", age_s: float = 0.0) -> Path:
    """``<root>/<op>/lock`` as FileBaton leaves it, ``age_s`` seconds old."""
    build_dir = root / op
    build_dir.mkdir(parents=True, exist_ok=True)
    lock = build_dir / "lock"
    os.close(os.open(lock, os.O_CREAT | os.O_EXCL))
    then = time.time() - age_s
    os.utime(lock, (then, then))
    return lock


def test_stale_lock_is_removed_and_reported(tmp_path: Path) -> None:
    lock = make_lock(tmp_path, age_s=3600)
    said: list[str] = []
    assert clear_stale_locks(tmp_path, say=said.append) == [lock]
    assert not lock.exists()
    assert len(said) == 1 and str(lock) in said[0] and "stale build lock" in said[0]
    assert "3600 s old" in said[0]


def test_fresh_lock_within_the_grace_is_kept(tmp_path: Path) -> None:
    lock = make_lock(tmp_path, age_s=1)
    said: list[str] = []
    assert clear_stale_locks(tmp_path, say=said.append) == []
    assert lock.exists() and said == []


def test_lock_of_a_live_build_process_is_kept_then_removed_once_it_dies(tmp_path: Path) -> None:
    lock = make_lock(tmp_path, age_s=3600)
    builder = subprocess.Popen(["sleep", "30"], cwd=lock.parent)  # like ninja in the build dir
    try:
        assert clear_stale_locks(tmp_path, say=lambda _: None) == []
        assert lock.exists()
    finally:
        builder.kill()
        builder.wait()
    said: list[str] = []
    assert clear_stale_locks(tmp_path, say=said.append) == [lock]
    assert not lock.exists() and len(said) == 1


def test_lock_held_open_by_its_baton_is_kept(tmp_path: Path) -> None:
    """The builder's Python phase (no process in the build dir yet): the baton's open fd."""
    (tmp_path / "some_op").mkdir()
    lock = tmp_path / "some_op" / "lock"
    baton = FileBaton(str(lock))
    assert baton.try_acquire()
    try:
        os.utime(lock, (time.time() - 3600,) * 2)
        assert clear_stale_locks(tmp_path, say=lambda _: None) == []
        assert lock.exists()
    finally:
        baton.release()


def test_a_lock_vanishing_meanwhile_is_no_error(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    lock = make_lock(tmp_path, age_s=3600)

    def released_meanwhile() -> tuple[set[str], set[str]]:
        lock.unlink()
        return set(), set()

    monkeypatch.setattr(build_lock, "_process_paths", released_meanwhile)
    assert clear_stale_locks(tmp_path, say=lambda _: None) == []
    assert clear_stale_locks(tmp_path / "missing", say=lambda _: None) == []


def test_torch_can_take_the_lock_after_clearing(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """End to end with torch's own build dir and baton (nothing is compiled)."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert extensions_root() == tmp_path
    build_dir = Path(cpp_extension._get_build_directory("tiny_op", verbose=False))
    (build_dir / "tiny_op.cpp").write_text("int tiny() { return 1; }\n")
    lock = make_lock(build_dir.parent, build_dir.name, age_s=3600)
    assert not FileBaton(str(lock)).try_acquire()  # what a killed build leaves: a hang

    assert clear_stale_locks(say=lambda _: None) == [lock]
    baton = FileBaton(str(lock))
    assert baton.try_acquire()
    baton.release()


def test_default_root_matches_torch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    monkeypatch.setattr(cpp_extension, "get_default_build_root", lambda: str(tmp_path))
    build_dir = Path(cpp_extension._get_build_directory("tiny_op", verbose=False))
    assert extensions_root() == build_dir.parent
    assert extensions_root().parent == tmp_path


def test_import_leaves_path_alone_and_the_build_prefers_the_interpreters_ninja(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``import meft_ds`` changes no ``PATH``; the op build puts the interpreter's ``bin``
    (with its ``ninja``) first, once."""
    import sys

    env = {**os.environ, "PATH": "/usr/bin:/bin"}
    code = "import os, meft_ds; print(os.environ['PATH'])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, check=True, cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "/usr/bin:/bin"
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "ninja").touch()
    monkeypatch.setattr(sys, "executable", str(fake / "python"))
    monkeypatch.setenv("PATH", "/usr/bin")
    build_lock.prefer_interpreter_ninja()
    build_lock.prefer_interpreter_ninja()
    assert os.environ["PATH"] == f"{fake}{os.pathsep}/usr/bin"
