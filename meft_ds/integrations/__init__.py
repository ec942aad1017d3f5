"""meft_ds inside other training loops: :mod:`meft_ds.integrations.hf` (``transformers.Trainer``);
its models in lm-evaluation-harness: :mod:`meft_ds.integrations.lm_eval`.

A plain PyTorch loop and an ``accelerate`` loop need no integration module: see
``examples/plain_pytorch.py`` and ``examples/accelerate_loop.py``.
"""
