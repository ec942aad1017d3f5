"""Plot a training run's curves (loss, lr, grad norm, tokens/s, evaluations, ...).

    python launch/plot.py runs/latest                 # writes runs/latest/curves.png
    python launch/plot.py runs/latest --out curves.png
"""

import _bootstrap  # noqa: F401  (import path, environment defaults)

from meft_ds.plot import main

if __name__ == "__main__":
    raise SystemExit(main())
