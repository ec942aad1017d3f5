"""Matrix-multiply FLOPs of the work that actually runs, counted at the ATen dispatcher.

:class:`FlopCounter` sees every ``mm``/``addmm``/``bmm``/``baddbmm`` and the CPU/CUDA
scaled-dot-product attention kernels that run while it is active, including those inside a
custom ``autograd.Function``'s backward (the reversible recompute), which module-hook
counters miss. Attention is priced by its shapes: forward ``4·B·H·Sq·Sk·D`` (QK^T and PV,
causal masking not discounted), backward 2.5x that (scores recomputed, dV, dP, dQ, dK).
These FLOPs bound a step from below. Everything else is counted as memory traffic:
``counts['other_bytes']`` is the bytes written by every other op that allocates an output
(elementwise arithmetic, casts, reductions; views and ``empty`` excluded), a
device-independent measure of the memory-bound work around the matmuls.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
_MATMUL = {aten.mm.default: (0, 1), aten.bmm.default: (0, 1),
           aten.addmm.default: (1, 2), aten.baddbmm.default: (1, 2)}
_ATTENTION_FWD = ("_scaled_dot_product_flash_attention_for_cpu",
                  "_scaled_dot_product_flash_attention",
                  "_scaled_dot_product_efficient_attention",
                  "_scaled_dot_product_cudnn_attention")


def _attention_flops(q: torch.Tensor, k: torch.Tensor) -> int:
    """QK^T plus PV for ``q`` ``[B, H, Sq, D]`` and ``k`` ``[B, H, Sk, D]``."""
    batch, heads, sq, dim = q.shape
    return 4 * batch * heads * sq * k.shape[-2] * dim


class FlopCounter(TorchDispatchMode):
    """Counts matmul and attention FLOPs (``counts['matmul']``, ``counts['attention']``),
    the other ops' output bytes (``counts['other_bytes']``) and calls while active."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()
        self.calls: Counter[str] = Counter()

    @property
    def total(self) -> int:
        return self.counts["matmul"] + self.counts["attention"]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in _MATMUL:
            a, b = (args[i] for i in _MATMUL[func])
            self.counts["matmul"] += 2 * a.numel() * b.shape[-1]
            self.calls["matmul"] += 1
            return out
        name = func.overloadpacket.__name__
        if name in _ATTENTION_FWD:
            self.counts["attention"] += _attention_flops(args[0], args[1])
            self.calls["attention_fwd"] += 1
        elif name.removesuffix("_backward") in _ATTENTION_FWD:
            # grad_out, q, k, ... : the kernels take the output's gradient first
            self.counts["attention"] += 5 * _attention_flops(args[1], args[2]) // 2
            self.calls["attention_bwd"] += 1
        elif not func.is_view and not name.startswith("empty"):
            written = [t for t in (out if isinstance(out, tuple | list) else (out,))
                       if isinstance(t, torch.Tensor)]
            self.counts["other_bytes"] += sum(t.numel() * t.element_size() for t in written)
            self.calls["other"] += 1
        return out
