"""The row store's tensors are on transparent huge pages where the OS gives them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from meft_ds.sparse.huge_pages import HUGE_PAGE, huge_zeros
from meft_ds.sparse.options import SparseOptions, resolve_sizes
from meft_ds.sparse.sharded import make_store

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _thp_mode() -> str | None:
    """The bracketed mode of the OS's THP setting (``None`` without THP)."""
    if not THP.is_file():
        return None
    found = re.search(r"\[(\w+)\]", THP.read_text())
    return found.group(1) if found else None


def _huge_bytes(tensor: torch.Tensor) -> int:
    """AnonHugePages of the mappings under ``tensor`` (from /proc/self/smaps; madvise
    splits a mapping at the advised range's ends)."""
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = re.match(r"^([0-9a-f]+)-([0-9a-f]+) ", line)
        if head:
            inside = int(head.group(1), 16) < end and start < int(head.group(2), 16)
        elif inside and line.startswith("AnonHugePages:"):
            total += int(line.split()[1]) * 1024
    return total


@pytest.mark.unit
def test_store_tensors_are_on_huge_pages_where_the_os_gives_them() -> None:
    plain = huge_zeros(8 * HUGE_PAGE // 4, huge=False)
    huge = huge_zeros(8 * HUGE_PAGE // 4)
    assert torch.equal(plain, huge) and not huge.any()
    plain.fill_(1.0), huge.fill_(1.0)  # pages are allocated on the first write
    mode = _thp_mode()
    if mode in ("madvise", "always"):  # the development VM and CI: madvise
        assert _huge_bytes(huge) >= 6 * HUGE_PAGE  # all whole 2 MB pages inside it
    if mode == "madvise":
        assert _huge_bytes(plain) == 0  # without the advice: small pages
    # the store: every layer's weights and both moments, unless turned off
    options = SparseOptions(sparse_rank=1024, sparse_experts=8, sparse_top_k=8)
    sizes = resolve_sizes(options, 2048, range(1), 1)
    for wanted in (True, False):
        options.sparse_huge_pages = wanted
        rows = make_store(options, sizes).layers[0]
        tensors = (rows.weight, rows.exp_avg, rows.exp_avg_sq)
        assert not rows.exp_avg.any() and rows.weight[:, :2048].abs().sum() > 0
        for t in tensors:
            t.mul_(1.0)  # as Adam's first writes would
        huge_bytes = [_huge_bytes(t) for t in tensors]
        if mode == "madvise":
            assert all(b > 0 for b in huge_bytes) == wanted, huge_bytes
