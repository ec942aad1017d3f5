"""lm-evaluation-harness on what meft_ds trains: the ``meft_nq_open`` tasks.

::

    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from meft_ds.integrations.lm_eval import task_manager

    lm = HFLM(pretrained=model, tokenizer=tokenizer, add_bos_token=False)  # a PEFT model too
    out = simple_evaluate(lm, tasks=["meft_nq_open_heldout"], task_manager=task_manager())

The tasks (in :func:`task_dir`) read the shipped NQ-open files (no network), prompt in the
``plain`` format and score with meft_ds's exact match, so a score equals
``launch/evaluate.py``'s on the same questions (``add_bos_token=False``: training adds no
BOS). ``lm-eval==0.4.13`` is in the ``dev`` and ``lm_eval`` extras.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from meft_ds.errors import UserError

TASKS = ("meft_nq_open", "meft_nq_open_heldout")


def task_dir() -> Path:
    """The directory to give lm-eval as ``--include_path`` / ``TaskManager(include_path=)``."""
    return Path(__file__).resolve().parents[1] / "lm_eval_tasks"


def task_manager(**kwargs: Any) -> Any:
    """``lm_eval.tasks.TaskManager`` that knows the meft_ds tasks (``kwargs`` go to it)."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise UserError("lm-evaluation-harness is not installed: "
                        "pip install lm-eval==0.4.13") from None
    return TaskManager(include_path=str(task_dir()), **kwargs)
