"""Answer prompts with an exported adapter (any method).

    python launch/generate.py --adapter runs/latest/adapter "who wrote the iliad"
    python launch/generate.py --adapter runs/latest/adapter --prompts_file questions.txt
    python launch/generate.py --adapter runs/latest/adapter --do_sample --temperature 0.7
"""

import _bootstrap  # noqa: F401  (import path, environment defaults)

from meft_ds.generate_cli import main

if __name__ == "__main__":
    raise SystemExit(main())
