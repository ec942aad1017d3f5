"""Row-store tensors on transparent huge pages.

The row-sparse update and the gathers for the device touch a few hundred scattered
32 KB rows of a 200 MB array per layer (7B shape). On 4 KB pages each row costs its
own TLB misses, and a scattered row costs more than a contiguous one: on the
development VM, 1.29x for a copy of 5% of the rows (``bench/sparse_adam.py``). On 2 MB
pages all of a layer's pages fit in the TLB, and the scattered copy costs 1.07x.

Linux hands out transparent huge pages to anonymous memory marked with
``madvise(MADV_HUGEPAGE)`` when ``/sys/kernel/mm/transparent_hugepage/enabled`` is
``madvise`` (the usual default) or ``always``. :func:`huge_zeros` marks a fresh
allocation before its first touch, so the pages are huge from the start; where the
call fails (another OS, THP ``never``) the tensor is the same, on small pages.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from functools import cache

import torch

HUGE_PAGE = 2 << 20
MADV_HUGEPAGE = 14  # linux/mman.h


@cache
def _madvise():
    """libc's ``madvise`` (``None`` off Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None
    fn = libc.madvise
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def advise_huge_pages(tensor: torch.Tensor) -> bool:
    """Ask for huge pages under ``tensor``'s memory (the whole 2 MB pages inside it);
    whether the kernel took the advice. Effective for pages not yet touched."""
    madvise = _madvise()
    if madvise is None or tensor.device.type != "cpu":
        return False
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    first = -(-start // HUGE_PAGE) * HUGE_PAGE
    last = end // HUGE_PAGE * HUGE_PAGE
    if last <= first:
        return False
    return madvise(first, last - first, MADV_HUGEPAGE) == 0


def huge_zeros(*shape: int, dtype: torch.dtype = torch.float32,
               huge: bool = True) -> torch.Tensor:
    """``torch.zeros(shape)`` on huge pages where the OS gives them (``huge=False``: as
    ``torch.zeros``, for comparison)."""
    tensor = torch.empty(shape, dtype=dtype)
    if huge:
        advise_huge_pages(tensor)
    return tensor.zero_()
