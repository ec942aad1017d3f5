"""Shared start-up of the launch scripts: import path and environment defaults (the Hub is
not forced offline: ``HF_HUB_OFFLINE`` is the user's; ``make`` sets it)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))

from meft_ds.build_lock import prefer_interpreter_ninja  # noqa: E402

prefer_interpreter_ninja()  # the runs' JIT op builds and the ranks they launch share one ninja
