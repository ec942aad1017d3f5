"""Memory accounting: saved-activation bytes, CUDA peaks, process RSS, RAM checks."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import psutil
import torch

from meft_ds.errors import UserError

GIB = 1024**3


@dataclass
class SavedTensorMeter:
    """Counts the bytes autograd saves for backward (device-independent).

    Storages shared by several saved tensors (views of one activation) are counted
    once. Weights that autograd saves (a frozen linear layer keeps its weight to compute
    the input gradient) are not activations: pass the module to :meth:`exclude_module`.
    """

    total_bytes: int = 0
    count: int = 0
    _seen: set[int] = field(default_factory=set)
    _excluded: set[int] = field(default_factory=set)
    _pinned: list[torch.UntypedStorage] = field(default_factory=list)

    def exclude_module(self, module: torch.nn.Module) -> SavedTensorMeter:
        """Do not count the storages of ``module``'s parameters and buffers.

        The storages are kept alive: a buffer replaced during the forward would otherwise
        free its address for an activation, which would then go uncounted.
        """
        for tensor in list(module.parameters()) + list(module.buffers()):
            storage = tensor.untyped_storage()
            self._excluded.add(storage.data_ptr())
            self._pinned.append(storage)
        return self

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        key = storage.data_ptr() if storage.data_ptr() else id(storage)
        if key not in self._seen and key not in self._excluded:
            self._seen.add(key)
            self.total_bytes += storage.nbytes()
            self.count += 1
        # Detached: the saved tensor itself would link an output back to its own grad_fn,
        # a cycle through C++ that keeps a graph never run backward alive (a leak).
        return tensor.detach()

    @contextmanager
    def record(self) -> Iterator[SavedTensorMeter]:
        """Context in which every tensor saved for backward is counted."""
        with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t):
            yield self

    def reset(self) -> None:
        """Forget what was counted (exclusions stay)."""
        self.total_bytes = 0
        self.count = 0
        self._seen.clear()


def rss_bytes() -> int:
    """Resident set size of this process."""
    return psutil.Process().memory_info().rss


RAM_ENV = "MEFT_DS_RAM_GIB"


def available_ram() -> int:
    """RAM psutil reports as available, or ``$MEFT_DS_RAM_GIB`` GiB where that is set (a
    host shared with other jobs, or a test that must be refused on any host)."""
    override = os.environ.get(RAM_ENV)
    if override:
        try:
            return int(float(override) * GIB)
        except ValueError:
            raise UserError(f"{RAM_ENV}={override!r} is not a number of GiB") from None
    return psutil.virtual_memory().available


def require_ram(needed: int, what: str, headroom: float = 1.1) -> None:
    """Refuse (UserError) before allocating ``needed`` bytes that would not fit in RAM."""
    have = available_ram()
    if needed * headroom > have:
        source = f" (set by {RAM_ENV})" if os.environ.get(RAM_ENV) else ""
        raise UserError(
            f"{what} needs {needed / GIB:.1f} GiB of RAM but only {have / GIB:.1f} GiB is "
            f"available{source}; choose a smaller model/adapter or free memory"
        )


def cap_device_memory(gib: float | None, dev: torch.device) -> None:
    """Let this process allocate at most ``gib`` GiB on ``dev`` (a 24 GB card simulated on a
    bigger one): beyond it allocations fail with CUDA's out-of-memory error."""
    if gib is None:
        return
    if dev.type != "cuda":
        raise UserError(f"`gpu_memory_gib` needs a CUDA device; this run is on {dev.type}")
    total = torch.cuda.get_device_properties(dev).total_memory
    if gib * GIB > total:
        raise UserError(f"`gpu_memory_gib` {gib:g} exceeds the device's {total / GIB:.1f} GiB")
    # The CUDA context (and anything else outside torch's allocator) takes memory of the
    # simulated card too: the allocator may use what is left of the cap.
    free, _ = torch.cuda.mem_get_info(dev)
    outside = max(0, total - free - torch.cuda.memory_reserved(dev))
    if gib * GIB <= outside:
        raise UserError(f"`gpu_memory_gib` {gib:g} is less than the {outside / GIB:.2f} GiB the "
                        "CUDA context already takes")
    torch.cuda.set_per_process_memory_fraction((gib * GIB - outside) / total, dev)


def device_memory() -> dict[str, float]:
    """CUDA peak allocated / reserved in GiB (empty without CUDA)."""
    if not torch.cuda.is_available():
        return {}
    return {
        "cuda_peak_alloc_gib": torch.cuda.max_memory_allocated() / GIB,
        "cuda_peak_reserved_gib": torch.cuda.max_memory_reserved() / GIB,
    }


def snapshot() -> dict[str, float]:
    """Memory figures logged every step."""
    return {"rss_gib": rss_bytes() / GIB, **device_memory()}


def param_bytes(model: torch.nn.Module) -> int:
    """Bytes of all parameters and buffers."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)
