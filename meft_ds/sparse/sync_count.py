"""Count host synchronisation points: where the compute device would wait for the host.

A *host synchronisation point* is an operation on the thread that launches the model's
work after which the host cannot go on before the device has caught up:

- ``scalar``: a scalar read of a compute-device tensor (``aten._local_scalar_dense``:
  ``.item()``, ``bool()``, ``int()``, ``float()``; ``aten.equal``);
- ``dynamic``: an op whose output shape depends on a compute-device tensor's data
  (``nonzero``, ``masked_select``, ``unique``, boolean-mask indexing, ``bincount``,
  ``repeat_interleave`` without ``output_size``): the host needs the size;
- ``d2h``: a blocking device-to-host copy (``.to("cpu")``, ``.cpu()``, ``.tolist()``,
  ``.numpy()``, ``host.copy_(device)``; also a ``non_blocking`` copy into memory that is
  not a registered staging buffer: CUDA copies into pageable memory synchronously);
- ``wait``: a host wait on a device event (:meth:`DeviceEvent.synchronize`).

``non_blocking`` copies into staging buffers (:func:`register_staging`: the pinned
buffers of :mod:`meft_ds.sparse.staging`) are counted apart (``async_d2h``): no sync.

**Device-independent.** On a CPU-only machine the compute device is the CPU too, so
"device" is decided by provenance, the same way on every device. Device tensors are the
roots given to :meth:`HostSyncCounter.mark_device` (the model's parameters and buffers,
the batch), everything computed from a device tensor on the counted thread (a dispatch
mode sees every op, backward's included), tensors made by a factory called with an
explicit ``torch.device`` (``torch.zeros(..., device=x.device)``; a function mode, so in
forward only: backward runs without them), and host tensors sent with
``.to(<torch.device>)``. Transfers are seen by patching ``Tensor``'s transfer methods
while a counter is active (``to``, ``cpu``, ``copy_``, ``tolist``, ``numpy``): a
``.to("cpu")`` of a CPU tensor reaches no dispatcher, and function modes do not run in
backward. Host tensors are everything else: the store's rows,
staging buffers, results of ``.to("cpu")`` / ``.cpu()`` / a copy into a host tensor,
factories without a device or with the string ``"cpu"``, and whatever worker threads
compute (modes are per thread: their work is not counted, as it does not hold up the
compute stream). So host code names the host as ``"cpu"`` (a string) and device code
names the device as a ``torch.device``; then a CUDA run and a CPU run count the same.
CUDA-only calls outside :class:`DeviceEvent` (``torch.cuda.synchronize``) are not seen.

Each point is counted in a phase: ``backward`` while the autograd engine runs a node,
else the phase set with :meth:`HostSyncCounter.phase` (``forward`` by default), and
attributed to the innermost calling frame in this repository outside ``torch``
(``sites``), so a model's own syncs can be told from the sparse adapter's.
"""

from __future__ import annotations

import os
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

_ROOT = str(Path(__file__).resolve().parents[2])
_aten = torch.ops.aten

_SCALAR = {_aten._local_scalar_dense.default, _aten.equal.default}
_DYNAMIC = {
    _aten.nonzero.default, _aten.nonzero_numpy.default, _aten.masked_select.default,
    _aten._unique.default, _aten._unique2.default, _aten.unique_dim.default,
    _aten.unique_consecutive.default, _aten.unique_dim_consecutive.default,
    _aten.bincount.default,
}
_FACTORIES = {
    torch.zeros, torch.ones, torch.empty, torch.full, torch.arange, torch.tensor,
    torch.rand, torch.randn, torch.randint, torch.linspace, torch.eye, torch.as_tensor,
    torch.empty_strided,
}
_STAGING: dict[int, int] = {}  # storage data_ptr -> nbytes of registered staging buffers
_ACTIVE: list[HostSyncCounter] = []


def register_staging(buffer: torch.Tensor) -> None:
    """Count ``non_blocking`` copies into ``buffer`` (a pinned staging buffer; on a CPU
    device its stand-in) as asynchronous."""
    _STAGING[buffer.untyped_storage().data_ptr()] = buffer.untyped_storage().nbytes()


def unregister_staging(buffer: torch.Tensor) -> None:
    _STAGING.pop(buffer.untyped_storage().data_ptr(), None)


def note_wait() -> None:
    """A host wait on a device event (called by :class:`DeviceEvent`)."""
    for counter in _ACTIVE:
        counter._note_wait()


class DeviceEvent:
    """A point in a device stream: a CUDA event, or on a CPU device a stand-in whose work
    is done when recorded. Host waits on it are counted (``wait``) on any device."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = torch.cuda.Event() if device.type == "cuda" else None

    def record(self, stream: Any = None) -> DeviceEvent:
        if self.cuda is not None:
            self.cuda.record(stream)
        return self

    def query(self) -> bool:
        """Done? (never blocks)"""
        return self.cuda is None or self.cuda.query()

    def synchronize(self) -> None:
        """Block the host until the work before the event is done (a sync point)."""
        note_wait()
        if self.cuda is not None:
            self.cuda.synchronize()

    def wait(self, stream: Any = None) -> None:
        """Make ``stream`` wait for the event (device side: no sync)."""
        if self.cuda is not None:
            (stream or torch.cuda.current_stream()).wait_event(self.cuda)


def _tensors(tree: Any) -> list[torch.Tensor]:
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


class _Dispatch(TorchDispatchMode):
    def __init__(self, counter: HostSyncCounter) -> None:
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        counter = self.counter
        inputs = _tensors((args, kwargs))
        device = any(counter.is_device(t) for t in inputs)
        if func is _aten.copy_.default:  # the destination keeps its side (a transfer)
            device = counter.is_device(args[0])
        if device:
            if func in _SCALAR:
                counter._count("scalar")
            elif func in _DYNAMIC or _dynamic(func, args, kwargs):
                counter._count("dynamic")
            for t in _tensors(out):
                counter._device[t] = True
        return out


def _dynamic(func, args: tuple, kwargs: dict) -> bool:
    """Boolean-mask indexing, and repeat_interleave without ``output_size``."""
    if func in (_aten.index.Tensor, _aten.index_put_.default, _aten.index_put.default):
        return any(t is not None and t.dtype in (torch.bool, torch.uint8) for t in args[1])
    if func is _aten.repeat_interleave.Tensor or func is _aten.repeat_interleave.self_Tensor:
        return kwargs.get("output_size") is None
    return False


class _Factories(TorchFunctionMode):
    """Factories called with a ``torch.device`` make device tensors (forward only: the
    autograd engine runs backward without Python function modes)."""

    def __init__(self, counter: HostSyncCounter) -> None:
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in _FACTORIES and isinstance(kwargs.get("device"), torch.device):
            self.counter._mark(out, True)
        return out


_TRANSFERS = ("to", "cpu", "copy_", "tolist", "numpy")
_ORIGINAL: dict[str, Any] = {}


def _patch_transfers() -> None:
    """Route ``Tensor``'s transfer methods through the counter of the calling thread.
    A method patch, not a mode: no-op transfers (``.to("cpu")`` of a CPU tensor) reach
    no dispatcher, and function modes do not run in backward."""
    for name in _TRANSFERS:
        original = _ORIGINAL.setdefault(name, getattr(torch.Tensor, name))

        def method(self, *args, _name=name, _original=original, **kwargs):
            counter = _counter_here()
            if counter is None or counter._busy:  # busy: re-entered through a mode
                return _original(self, *args, **kwargs)
            counter._busy = True
            try:
                return counter._transfer(_name, _original, self, args, kwargs)
            finally:
                counter._busy = False

        method.__name__ = method.__qualname__ = name
        method.__doc__ = original.__doc__
        setattr(torch.Tensor, name, method)


def _unpatch_transfers() -> None:
    for name, original in _ORIGINAL.items():
        setattr(torch.Tensor, name, original)
    _ORIGINAL.clear()


def _counter_here() -> HostSyncCounter | None:
    ident = threading.get_ident()
    for counter in _ACTIVE:
        if counter._thread == ident:
            return counter
    return None


def _target(args: tuple, kwargs: dict) -> str | torch.device | None:
    """The device a ``Tensor.to`` call names: ``"cpu"`` (named as a string), a
    ``torch.device``, or ``None`` (no device: a dtype change)."""
    for value in (kwargs.get("device"), *args):
        if isinstance(value, str):
            return "cpu" if value == "cpu" else torch.device(value)
        if isinstance(value, torch.device):
            return value
        if isinstance(value, torch.Tensor):
            return value.device
    return None


def _alias(out: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """A distinct tensor object for a transfer that was a no-op (same device), so the
    result can be on the other side than its source."""
    if out is not source:
        return out
    return out.view_as(out) if out.requires_grad else out.detach()


class HostSyncCounter:
    """Counts host synchronisation points on the thread that enters it (see the module
    docstring): ``counts[(phase, kind)]`` and ``sites[(phase, kind, "file:line")]``."""

    def __init__(self) -> None:
        self._device: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.counts: Counter[tuple[str, str]] = Counter()
        self.sites: Counter[tuple[str, str, str]] = Counter()
        self._phase = "forward"
        self._thread: int | None = None
        self._modes: list = []
        self._busy = False

    def mark_device(self, *objects: Any) -> HostSyncCounter:
        """Mark tensors, and modules' parameters and buffers, as compute-device data."""
        for obj in objects:
            if isinstance(obj, torch.nn.Module):
                for t in (*obj.parameters(), *obj.buffers()):
                    self._device[t] = True
            else:
                for t in _tensors(obj):
                    self._device[t] = True
        return self

    def is_device(self, tensor: Any) -> bool:
        return isinstance(tensor, torch.Tensor) and self._device.get(tensor, False)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Count the points inside as ``name`` (backward is detected by itself)."""
        previous, self._phase = self._phase, name
        try:
            yield
        finally:
            self._phase = previous

    def total(self, phase: str, kinds: tuple[str, ...] = ("scalar", "dynamic", "d2h", "wait"),
              where: str | None = None) -> int:
        """Sync points of ``phase`` (only those at sites containing ``where``)."""
        if where is None:
            return sum(self.counts[(phase, kind)] for kind in kinds)
        return sum(n for (p, kind, site), n in self.sites.items()
                   if p == phase and kind in kinds and where in site)

    def reset(self) -> None:
        self.counts.clear()
        self.sites.clear()

    def __enter__(self) -> HostSyncCounter:
        self._thread = threading.get_ident()
        self._modes = [_Factories(self), _Dispatch(self)]
        for mode in self._modes:
            mode.__enter__()
        if not _ACTIVE:
            _patch_transfers()
        _ACTIVE.append(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        _ACTIVE.remove(self)
        if not _ACTIVE:
            _unpatch_transfers()
        for mode in reversed(self._modes):
            mode.__exit__(*exc)
        self._modes = []

    # --- internals --------------------------------------------------------------------
    def _mark(self, tensor: torch.Tensor, device: bool) -> torch.Tensor:
        self._device[tensor] = device
        return tensor

    def _transfer(self, name: str, original: Any, tensor: torch.Tensor, args: tuple,
                  kwargs: dict) -> Any:
        """A transfer method called on this counter's thread: count and classify it."""
        device = self.is_device(tensor)
        if name == "copy_":
            src = args[0]
            blocking = not (kwargs.get("non_blocking") or (len(args) > 1 and args[1]))
            if self.is_device(src) and not device:
                staged = tensor.untyped_storage().data_ptr() in _STAGING
                self._count("d2h" if blocking or not staged else "async_d2h")
            return original(tensor, *args, **kwargs)
        if name in ("tolist", "numpy"):
            if device:
                self._count("d2h")
            return original(tensor, *args, **kwargs)
        out = original(tensor, *args, **kwargs)
        target = "cpu" if name == "cpu" else _target(args, kwargs)
        if device and target == "cpu":
            self._count("d2h")
            return self._mark(_alias(out, tensor), False)
        if not device and isinstance(target, torch.device):
            return self._mark(_alias(out, tensor), True)  # host -> device
        return out

    def _note_wait(self) -> None:
        if threading.get_ident() == self._thread:
            self._count("wait")

    def _count(self, kind: str) -> None:
        phase = "backward" if torch._C._current_autograd_node() is not None else self._phase
        self.counts[(phase, kind)] += 1
        self.sites[(phase, kind, _site())] += 1


def _site() -> str:
    """``path:line`` of the innermost calling frame outside ``torch`` and this module
    (relative to the repository when inside it)."""
    frame = sys._getframe(1)
    while frame is not None:
        path = frame.f_code.co_filename
        if path != __file__ and f"{os.sep}torch{os.sep}" not in path and "<" not in path:
            where = path[len(_ROOT) + 1:] if path.startswith(_ROOT + os.sep) else path
            return f"{where}:{frame.f_lineno}"
        frame = frame.f_back
    return "?"
