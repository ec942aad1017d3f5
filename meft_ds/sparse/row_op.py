"""The row-sparse CPU Adam op: DeepSpeed's CPU Adam kernel over selected store rows.

``csrc/row_adam.cpp`` loops over the selected rows (torch's intra-op threads) and calls DeepSpeed's
``Adam_Optimizer::Step_4`` on each row's own memory in the store, with that row's bias
correction. The kernel is compiled from the installed DeepSpeed's own source
(``csrc/adam/cpu_adam_impl.cpp``, with DeepSpeed's cpu_adam compiler flags), JIT-built
on first use like DeepSpeed's ops and cached under ``TORCH_EXTENSIONS_DIR``.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

from meft_ds.build_lock import clear_stale_locks, prefer_interpreter_ninja

CSRC = Path(__file__).resolve().parent / "csrc"
NAME = "meft_row_adam"


def load_row_adam() -> ModuleType:
    """Build (once) and load the op."""
    from deepspeed.ops.op_builder import CPUAdamBuilder

    class RowAdamBuilder(CPUAdamBuilder):
        NAME = NAME

        def absolute_name(self) -> str:
            return f"meft_ds.sparse.{NAME}_op"

        def sources(self) -> list[str]:
            return [str(CSRC / "row_adam.cpp")]

        def include_paths(self) -> list[str]:
            return [*super().include_paths(), "csrc/adam"]

        def cxx_args(self) -> list[str]:
            # Rows are spread over OpenMP threads by the op itself (GOMP_parallel); the
            # kernel's own OpenMP pragmas are left out (a serialized region per row cost
            # ~30% of the row's update).
            return [arg for arg in super().cxx_args() if arg != "-fopenmp"]

    prefer_interpreter_ninja()  # the ninja the cached build was made with (see there)
    clear_stale_locks()  # a killed build's lock would make the load wait forever
    return RowAdamBuilder().load(verbose=False)
