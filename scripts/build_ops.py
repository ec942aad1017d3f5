"""Build the JIT-compiled C++ ops once, at set-up, instead of inside the first run.

DeepSpeed compiles its ops on first use (CPU Adam ~70 s on two cores) and so does
meft_ds's row-sparse Adam op; both land in ``TORCH_EXTENSIONS_DIR`` and are reused while
their sources stay the same (a changed source is rebuilt on first use, as before). Built
here: DeepSpeed's CPU Adam, the row op, and on the CPU accelerator the two ops DeepSpeed
builds for itself there (fused Adam, shared-memory collectives). An op that fails to build
is reported and left to its first use, where its own error names the fix.

Run by ``scripts/setup.sh``; by hand: ``.venv/bin/python scripts/build_ops.py``.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

# the launch scripts' start-up: import path and the extension cache the runs will use
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "launch"))
import _bootstrap  # noqa: E402, F401


def builders() -> list[tuple[str, Callable[[], object]]]:
    """(name, zero-argument loader) of every op to build on this machine."""
    from deepspeed.accelerator import get_accelerator
    from deepspeed.ops.op_builder import CPUAdamBuilder

    from meft_ds.sparse.row_op import load_row_adam

    ops: list[tuple[str, Callable[[], object]]] = [("DeepSpeed CPU Adam", CPUAdamBuilder().load),
                                     ("meft_ds row-sparse Adam", load_row_adam)]
    accelerator = get_accelerator()
    if accelerator.device_name() == "cpu":
        for name in ("FusedAdamBuilder", "ShareMemCommBuilder"):
            builder = accelerator.create_op_builder(name)
            if builder is not None:
                ops.append((f"DeepSpeed {builder.NAME} (CPU accelerator)", builder.load))
    return ops


def main() -> int:
    from meft_ds.build_lock import clear_stale_locks

    clear_stale_locks()  # a lock left by a killed build would block its op's build forever
    failed = 0
    for name, load in builders():
        start = time.perf_counter()
        try:
            load()
        except Exception as exc:  # reported; the op is built (or refused) on first use
            failed += 1
            first = str(exc).splitlines()[0] if str(exc) else ""
            print(f"build_ops: {name} did not build ({type(exc).__name__}: {first}); "
                  "it will be built on first use", file=sys.stderr)
            continue
        print(f"build_ops: {name} ready ({time.perf_counter() - start:.0f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
