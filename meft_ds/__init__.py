"""meft_ds: memory-efficient fine-tuning of LLMs on DeepSpeed.

The launcher is ``launch/train.py``; the same methods as a library, PEFT-style:
``get_sparse_model(model, SparseConfig(...))`` and the rest of ``__all__``
(:mod:`meft_ds.api`, imported on first use). Importing it changes no environment variable:
the ``ninja`` of the JIT-built ops is picked where they are built
(:func:`meft_ds.build_lock.prefer_interpreter_ninja`).
"""

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
