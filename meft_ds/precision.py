"""The compute dtype a run uses: the DeepSpeed config's, fitted to the machine.

Without CUDA, bf16 is only fast where the CPU computes it natively (AVX512-BF16 or AMX):
on an AVX2-only CPU a bf16 matmul is emulated and measured ~37x slower than fp32 (a
512x576 @ 576x1536 product: 852 ms vs 23 ms), so ``--precision auto`` runs such a machine
in fp32 and says so; ``--precision bf16`` / ``fp32`` are the user's choice and win.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

CHOICES = ("auto", "bf16", "fp32")
# The one table of dtype names (options, exports, the evaluator's --dtype); the reversible
# streams add fp64 to it (meft_ds.reversible.precision).
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def dtype_name(dtype: torch.dtype, default: str = "fp32") -> str:
    """The name of ``dtype`` in :data:`DTYPES` (``default`` for any other)."""
    return next((name for name, value in DTYPES.items() if value == dtype), default)


def cast_parameters(module: torch.nn.Module, dtype: torch.dtype,
                    device: torch.device | str = "cpu") -> torch.nn.Module:
    """``module`` on ``device`` with its floating parameters in ``dtype`` and its buffers
    as they are: what DeepSpeed's engine and ``from_pretrained(dtype=...)`` do. A whole
    ``module.to(dtype)`` also rounds buffers such as the rotary frequencies ``inv_freq``,
    which shifts every attention score from what training computed (measured: bf16 logits
    up to 0.75 apart, a different greedy answer)."""
    module.to(device)
    for param in module.parameters():
        if param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)
    return module


def cpu_native_bf16() -> bool:
    """Whether torch's CPU kernels compute bf16 natively on this machine.

    Both the instruction set (AVX512-BF16 / AMX tiles) and torch's kernel dispatch level
    count: ``ATEN_CPU_CAPABILITY=avx2`` makes an AVX-512 CPU run the AVX2 kernels.
    """
    hardware = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    level = torch.backends.cpu.get_cpu_capability().upper()
    return hardware and level.startswith(("AVX512", "AMX"))


def resolve(ds: dict[str, Any], choice: str, cuda: bool,
            native_bf16: bool | None = None) -> tuple[dict[str, Any], str | None]:
    """``(DeepSpeed config with the chosen precision, one-line note or None)``.

    ``choice`` is ``auto`` (keep the config, except bf16 on a CPU without native bf16),
    ``bf16`` or ``fp32``; ``ds`` itself is not changed.
    """
    wants_bf16 = bool(ds.get("bf16", {}).get("enabled") or ds.get("bfloat16", {}).get("enabled"))
    note = None
    if choice == "auto":
        use_bf16 = wants_bf16
        if wants_bf16 and not cuda:
            native = cpu_native_bf16() if native_bf16 is None else native_bf16
            if not native:
                use_bf16 = False
                level = torch.backends.cpu.get_cpu_capability()
                note = (f"precision: fp32, not the config's bf16: this CPU ({level}) has no "
                        "native bf16 (AVX512-BF16/AMX), where bf16 runs ~37x slower; "
                        "--precision bf16 to insist")
    else:
        use_bf16 = choice == "bf16"
    if use_bf16 == wants_bf16 and choice == "auto":
        return ds, note
    out = copy.deepcopy(ds)
    out.pop("bfloat16", None)
    out["bf16"] = {**out.get("bf16", {}), "enabled": use_bf16}
    if use_bf16 or choice == "fp32":
        out.pop("fp16", None)  # one half-precision mode at a time; fp32 means neither
    return out, note
