"""Row-store tensors on transparent huge pages.

The row-sparse update and the gathers for the device touch a few hundred scattered
32 KB rows of a 200 MB array per layer (7B shape). On 4 KB pages each row costs its
own TLB misses, and a scattered row costs more than a contiguous one: on the
development VM, 1.29x for a copy of 5% of the rows (``bench/sparse_adam.py``). On 2 MB
pages all of a layer's pages fit in the TLB, and the scattered copy costs 1.07x.

Linux hands out transparent huge pages to anonymous memory marked with
``madvise(MADV_HUGEPAGE)`` when ``/sys/kernel/mm/transparent_hugepage/enabled`` is
``madvise`` (the usual default) or ``always``. :func:`huge_zeros` maps fresh anonymous
memory of its own (not the allocator's, which may hand back pages already touched, on
small pages for good) and marks it before the first touch, so its pages are huge from
the start. Where that is not possible (another OS, THP ``never``, under 2 MB) the
tensor is the same, on small pages.
"""

from __future__ import annotations

import math
import mmap

import torch

HUGE_PAGE = 2 << 20


def huge_zeros(*shape: int, dtype: torch.dtype = torch.float32,
               huge: bool = True) -> torch.Tensor:
    """``torch.zeros(shape)`` on huge pages where the OS gives them (``huge=False``: as
    ``torch.zeros``, for comparison). The tensor keeps its mapping alive."""
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if not huge or advice is None or nbytes < HUGE_PAGE:
        return torch.zeros(shape, dtype=dtype)
    # private anonymous memory (shared would be shmem, under another THP setting):
    # zero pages, none touched yet
    region = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        region.madvise(advice)
    except OSError:  # THP not built into this kernel: small pages
        pass
    return torch.frombuffer(region, dtype=dtype).view(shape)
