"""meft_ds: memory-efficient fine-tuning of LLMs on DeepSpeed.

The launcher is ``launch/train.py``; the same methods as a library, PEFT-style:
``get_sparse_model(model, SparseConfig(...))`` and the rest of ``__all__``
(:mod:`meft_ds.api`, imported on first use).

Importing the package puts this interpreter's own ``bin`` directory first on ``PATH`` when
it holds a ``ninja``: DeepSpeed's ops and meft_ds's row op are JIT-built with the ``ninja``
found on ``PATH``, and two ninja versions (the one pip installs with DeepSpeed into the
virtual environment, and a system one) hash build commands differently, so each rebuilds
what the other built (~2 minutes of compiling on two cores, at any run that follows a run
started the other way, e.g. ``deepspeed`` from the venv after ``.venv/bin/python``).
"""

import os
import sys

_BIN = os.path.dirname(sys.executable)
if os.path.isfile(os.path.join(_BIN, "ninja")) and not os.environ.get("PATH", "").startswith(
        _BIN + os.pathsep):
    os.environ["PATH"] = _BIN + os.pathsep + os.environ.get("PATH", "")

# The library API (meft_ds.api), imported on first use: ``import meft_ds`` stays light.
_API = ("MeftModel", "RowOptimizer", "SparseConfig", "ReversibleConfig", "ReadConfig",
        "get_meft_model", "get_sparse_model", "get_reversible_model", "get_read_model")
__all__ = list(_API)


def __getattr__(name: str):
    if name in _API:
        from meft_ds import api

        return getattr(api, name)
    raise AttributeError(f"module 'meft_ds' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
