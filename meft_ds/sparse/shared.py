"""Host memory that the local ranks of one node map together (one copy per node).

The replicated sparse store holds the same rows and Adam state on every rank; the ranks
of one node share one copy of them instead (see :mod:`meft_ds.sparse.sharded`). This
module finds the nodes and allocates the shared memory; the store decides who writes.

- *Nodes.* Ranks on the same host with the same ``RANK - LOCAL_RANK`` (the first global
  rank of their launcher: torchrun and the deepspeed launcher number a node's ranks
  contiguously) form a node; without ``LOCAL_RANK`` a rank is a node of its own. Every
  rank all-gathers its (host, first rank) key, then creates every node's gloo group in the
  same order (``new_group`` is collective over the whole world, also for groups a rank is
  not in). The leader of a node is its lowest global rank (local rank 0).
- *Memory.* The leader creates an anonymous memory file (``memfd_create``: not bounded by
  the size of ``/dev/shm``, which containers often keep at 64 MiB, and nothing is left
  behind when a process dies), sizes it and broadcasts its pid and descriptor number; the
  other ranks open ``/proc/<pid>/fd/<n>`` and map it (``MAP_SHARED``). Once every rank
  has it open, the leader closes its descriptor: the memory lives while one mapping does
  and is freed with the last one. Fresh pages read as zero and cost nothing until touched.
  If a rank cannot open the leader's file (``/proc`` mounted with ``hidepid``, say), the
  whole node falls back to private memory with a warning.
"""

from __future__ import annotations

import math
import mmap
import os
import socket
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from meft_ds import dist as mdist
from meft_ds.errors import UserError

Layout = list[tuple[tuple[int, ...], torch.dtype]]  # shapes and dtypes, in order


@dataclass
class NodeGroup:
    """The ranks of this rank's node and their gloo group."""

    group: Any
    ranks: tuple[int, ...]
    leader: bool

    @property
    def size(self) -> int:
        return len(self.ranks)

    def barrier(self) -> None:
        dist.barrier(group=self.group)

    def leader_only(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the leader; the other local ranks return once it is done. A
        :class:`UserError` of ``fn`` is raised on every local rank (none waits forever)."""
        error = None
        if self.leader:
            try:
                fn()
            except UserError as exc:
                error = str(exc)
        box = [error]
        dist.broadcast_object_list(box, src=self.ranks[0], group=self.group)
        if box[0] is not None:
            raise UserError(box[0])


def node_group() -> NodeGroup | None:
    """This rank's node, or None when it runs alone there (or without torch.distributed).
    Collective: every rank of the world must call it."""
    if not mdist.initialized() or mdist.world_size() == 1:
        return None
    me = mdist.rank()
    local = os.environ.get("LOCAL_RANK", "")
    key = (socket.gethostname(), me - int(local) if local.isdigit() else -1 - me)
    keys: list[Any] = [None] * mdist.world_size()
    dist.all_gather_object(keys, key)
    nodes: dict[tuple, list[int]] = {}
    for rank, value in enumerate(keys):
        nodes.setdefault(tuple(value), []).append(rank)
    mine = None
    for ranks in sorted(nodes.values()):  # the same order on every rank
        if len(ranks) < 2:
            continue
        group = dist.new_group(ranks, backend="gloo")
        if me in ranks:
            mine = NodeGroup(group=group, ranks=tuple(ranks), leader=ranks[0] == me)
    return mine


class NodeMemory:
    """Tensors of a layout mapped by every rank of a node (see the module docstring).
    Each tensor is its own page-aligned mapping, i.e. its own storage (``torch.save``
    then writes each tensor, not the whole block once per view)."""

    def __init__(self, tensors: list[torch.Tensor], nbytes: int, inode: int) -> None:
        self.tensors = tensors
        self.nbytes = nbytes  # the node's copy, alignment included
        self.inode = inode  # the same on every rank of the node: one file, one copy

    @classmethod
    def create(cls, layout: Layout, node: NodeGroup) -> NodeMemory | None:
        """Map ``layout`` (shapes and dtypes, in order) on every rank of ``node``
        (collective over it); None on every rank of the node when some rank cannot map
        the leader's memory."""
        offsets, nbytes = _offsets(layout)
        fd = -1
        if node.leader:
            fd = os.memfd_create("meft_ds_sparse_store", os.MFD_CLOEXEC)
            os.ftruncate(fd, max(nbytes, 1))
        where = [(os.getpid(), fd)]
        dist.broadcast_object_list(where, src=node.ranks[0], group=node.group)
        problem = ""
        if not node.leader:
            path = "/proc/{}/fd/{}".format(*where[0])
            try:
                fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            except OSError as exc:
                problem = f"rank {mdist.rank()} cannot open {path} ({exc.strerror})"
        opened = torch.tensor([0 if problem else 1], dtype=torch.int64)
        dist.all_reduce(opened, op=dist.ReduceOp.MIN, group=node.group)
        try:
            if not int(opened.item()):
                if problem:
                    warnings.warn(f"sparse store: ranks {list(node.ranks)} keep one copy "
                                  f"each: {problem}", stacklevel=2)
                return None
            tensors = []
            for (shape, dtype), offset in zip(layout, offsets):
                size = _size(shape, dtype)
                mapping = mmap.mmap(fd, max(size, 1), offset=offset)
                tensors.append(torch.frombuffer(mapping, dtype=torch.uint8)[:size]
                               .view(dtype).view(shape))
            return cls(tensors, nbytes, os.fstat(fd).st_ino)
        finally:
            if fd >= 0:  # every rank has it open (or gave up): the mappings keep it alive
                os.close(fd)


def _offsets(layout: Layout) -> tuple[list[int], int]:
    """Page-aligned offset of every tensor of ``layout`` and the total bytes."""
    offsets, end = [], 0
    for shape, dtype in layout:
        start = -(-end // mmap.ALLOCATIONGRANULARITY) * mmap.ALLOCATIONGRANULARITY
        offsets.append(start)
        end = start + _size(shape, dtype)
    return offsets, end


def _size(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()
