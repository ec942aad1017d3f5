"""Train with DeepSpeed: ``deepspeed launch/train.py --deepspeed ds_configs/24gb.json``.

Also runs under plain ``python`` and ``torchrun``. ``--help`` lists every option.
"""

import _bootstrap  # noqa: F401  (import path, environment defaults)

from meft_ds.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
