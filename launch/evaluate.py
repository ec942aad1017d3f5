"""Evaluate a base model or an exported adapter on NQ-open (EM) or GSM8K (accuracy).

    python launch/evaluate.py --adapter runs/latest/adapter --split train --limit 128
    python launch/evaluate.py --model smollm2-135m --dataset gsm8k --split heldout
"""

import _bootstrap  # noqa: F401  (import path, environment defaults)

from meft_ds.evaluate_cli import main

if __name__ == "__main__":
    raise SystemExit(main())
