"""The sparse store under data parallelism: replicated on every rank, or sharded by expert.

``--sparse_store replicated`` (:class:`ReplicatedStore`): every rank holds all rows and
their Adam state. Before the step the ranks' row sets are united (all_gather of the row
ids) and the row gradients summed on the union (all_reduce), so every rank applies the
same row-sparse AdamW. Every ``--sparse_check_every`` steps a CRC32 of each replica
(weights, moments, step counts) is all-gathered; different values raise
:class:`ReplicaDivergenceError`.

*One copy per node.* Where a node runs several ranks, they share one replica in host
memory (:mod:`meft_ds.sparse.shared`: the node's gloo group and a memory file that its
local rank 0, the *leader*, creates and the others map; weights, both moments and step
counts of every layer live in it). Exactly one process per node writes:

- initialisation: the leader draws the keys (the same random stream as an unshared
  replica) while the others wait;
- the step: every rank takes part in the gradient exchange (so every rank has the
  union's averaged gradients and the same squared norm for clipping, which
  :meth:`ReplicatedStore.total_sq_norm` returns), but :meth:`ReplicatedStore.coalesce`
  returns them to the leader only; the other local ranks get nothing to update. The
  leader writes once every local rank has finished reading for this step (they all
  entered the all_reduce), and the other ranks wait for that write at a node barrier
  before their next read (select, gather, centroids, export, save): the store marks
  itself stale at the exchange and the first read after it waits;
- checkpoint load and a full-weight import: after a node barrier the leader reads the
  file and writes; its errors are raised on every local rank.

The replica check then compares the leaders' checksums, i.e. one copy per node (the
local ranks read the same memory). :meth:`RowStore.nbytes` reports this rank's share,
the copy divided by the ranks that map it.

``--sparse_store sharded`` (:class:`ShardedStore`): rank ``w`` of ``W`` owns the
contiguous block of experts ``[w*N/W, (w+1)*N/W)`` (rows ``[w*r/W, (w+1)*r/W)``), i.e.
their keys, values, both moments and step counts; ``W`` must divide ``N``. Per adapted
layer and micro-batch (each transfer is one ``all_to_all_single`` with split sizes, i.e.
gloo's alltoallv -- gloo's list ``all_to_all`` in torch 2.13 needs equal sizes -- preceded
by a count exchange of ``8`` bytes per peer where the sizes are not known yet):

1. *scoring*: each token's hidden state ``h`` (``4d`` bytes, fp32) and expert ids
   (``8E``) go to the owners of its ``E`` experts only (at most ``min(E, W)`` ranks);
2. each owner scores the token against its experts' keys (the same grouped matmuls as
   the replicated :func:`~meft_ds.sparse.router.select_rows`, so the scores are the same
   numbers) and returns the token's top-K among them (``K`` fp32 scores + ``K`` int64
   row ids); the requester keeps the top-K of the merged candidates. The top-K of a
   union is the top-K of the parts' top-Ks, so the selection equals the replicated one
   (ties between equal fp32 scores aside). Keys never leave their owner;
3. *rows*: the requester sends the ids of its working set (``8U``) to their owners,
   which return the rows (``U * 2d * 4`` bytes).

Before the step, each rank's coalesced row gradients (ids ``8U'`` + ``U' * 2d * 4``) go
to their owners, which sum them over ranks, divide by ``W`` (the average, as DeepSpeed
averages the engine's gradients and as the replicated store does) and run the same
:class:`~meft_ds.sparse.optim.RowAdamW` on their rows. The squared gradient norm for
clipping is all-reduced (8 bytes). :attr:`ShardedStore.comm_bytes` counts the bytes this
rank sends to other ranks (payloads and counts).

Collectives run on the store's own gloo group (the default group on CPU; a separate
gloo group when the default backend is NCCL, since the store's tensors are host
tensors). Every rank must therefore make the same sequence of adapter calls: the same
layers and micro-batches (true for data-parallel training and for evaluating the same
prompts on every rank).

Checkpoints: every owner writes its rows with their global row range
(``sparse_rows_<start>_<end>.pt``); a load picks the rows it owns from whichever files
hold them, so a checkpoint of ``W`` ranks resumes on ``W'`` ranks, in either mode (the
replicated store writes ``sparse_store.pt``, the range ``[0, r)``). On several nodes the
checkpoint directory must be shared (or its files collected) for a resume.
"""

from __future__ import annotations

import re
import threading
import zlib
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from meft_ds import dist as mdist
from meft_ds.errors import UserError
from meft_ds.sparse.huge_pages import huge_zeros
from meft_ds.sparse.options import SparseOptions, SparseSizes
from meft_ds.sparse.router import Selection, candidate_scores, select_rows
from meft_ds.sparse.shared import Layout, NodeGroup, NodeMemory, node_group
from meft_ds.sparse.store import (
    LayerRows,
    RowStore,
    init_layer_weight,
    new_layer_rows,
    saved_step_count,
)

SHARD_PATTERN = re.compile(r"sparse_rows_(\d+)_(\d+)\.pt")
STATE_NAMES = ("weight", "exp_avg", "exp_avg_sq", "steps")


class ReplicaDivergenceError(RuntimeError):
    """The ranks' copies of the replicated store are no longer identical."""


def make_store(options: SparseOptions, sizes: SparseSizes) -> RowStore:
    """The store of ``--sparse_store``."""
    if options.sparse_store == "sharded":
        return ShardedStore(sizes, seed=options.sparse_init_seed,
                            huge_pages=options.sparse_huge_pages)
    return ReplicatedStore(sizes, seed=options.sparse_init_seed,
                           huge_pages=options.sparse_huge_pages)


class ReplicatedStore(RowStore):
    """A full copy of the store on every rank, or one per node shared by its local ranks
    (``share_local``, where a node runs several ranks; see the module docstring)."""

    def __init__(self, sizes: SparseSizes, seed: int = 0, share_local: bool = True,
                 huge_pages: bool = True) -> None:
        """``huge_pages``: for a copy of this rank's own; a node's shared copy is in
        shared memory, where transparent huge pages follow the OS's ``shmem_enabled``."""
        self.comm_bytes = 0
        self.node: NodeGroup | None = node_group() if share_local else None
        self.memory: NodeMemory | None = None
        if self.node is not None:
            self.memory = NodeMemory.create(_layout(sizes), self.node)
        if self.memory is None:
            self.node = None
            super().__init__(sizes, seed, huge_pages)
            return
        self.sizes = sizes
        tensors = iter(self.memory.tensors)  # fresh pages are zero: moments, step counts
        self.layers = {layer: LayerRows(*(next(tensors) for _ in STATE_NAMES))
                       for layer in sizes.layers}
        self._stale = False  # the leader may be writing: wait before the next read
        self._lock = threading.Lock()  # reads may come from a prefetch thread
        self._grad_sq = 0.0

        def init() -> None:
            generator = torch.Generator().manual_seed(seed)
            for layer in sizes.layers:
                self.layers[layer].weight.copy_(
                    init_layer_weight(sizes.rank, sizes.hidden, generator))

        self.node.leader_only(init)

    # --- one copy per node: who writes, who waits -------------------------------------
    def _fresh(self) -> None:
        """Before reading: wait for the leader's write after the last exchange."""
        if self.node is None:
            return
        with self._lock:
            if self._stale:
                self.node.barrier()
                self._stale = False

    def _write(self, fn: Callable[[], None]) -> None:
        """Run a write of the whole store once per node, when no local rank reads."""
        if self.node is None:
            fn()
            return
        with self._lock:
            self.node.barrier()
            self.node.leader_only(fn)
            self._stale = False

    def nbytes(self) -> int:
        """This rank's share of the host bytes (the node's copy over its local ranks)."""
        return super().nbytes() // (1 if self.node is None else self.node.size)

    # --- the runtime's interface ------------------------------------------------------
    def select(self, layer: int, hidden: torch.Tensor, experts: torch.Tensor) -> Selection:
        """Top-K rows per token (:func:`~meft_ds.sparse.router.select_rows`)."""
        self._fresh()
        sizes = self.sizes
        return select_rows(self.keys(layer), hidden, experts, sizes.num_experts, sizes.top_k)

    def gather(self, layer: int, rows: torch.Tensor) -> torch.Tensor:
        """``[U, 2d]`` fp32 copy of ``rows`` (global ids)."""
        self._fresh()
        return self.layers[layer].weight.index_select(0, rows)

    def key_centroids(self, layer: int) -> torch.Tensor:
        """``[N, d]`` mean key of every expert (the router's initial rows)."""
        self._fresh()
        return _centroids(self.keys(layer), self.sizes)

    def total_sq_norm(self, local: float) -> float:
        """Squared norm of all row gradients (each replica holds all of them; a shared
        copy's non-leaders got none from :meth:`coalesce`, the value is kept for them)."""
        return local if self.node is None else self._grad_sq

    def coalesce(self, group=None) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """As :meth:`RowStore.coalesce`; with a shared copy, only the leader gets the rows
        to update (the others an empty dict) and the next read waits for its update."""
        result = super().coalesce(group)
        world = mdist.world_size(group)
        if world > 1:
            self.comm_bytes += _allreduce_bytes(self, result, world, group)
        if self.node is None:
            return result
        # The runtime's expression, so leader and non-leaders clip by the same coefficient.
        self._grad_sq = float(sum(g.double().pow(2).sum() for _, g in result.values()
                                  if g.numel()))
        self._stale = True
        return result if self.node.leader else {}

    # --- consistency ------------------------------------------------------------------
    def checksum(self) -> int:
        """CRC32 over every layer's weights, moments and step counts."""
        crc = 0
        for layer in sorted(self.layers):
            rows = self.layers[layer]
            for name in STATE_NAMES:
                crc = zlib.crc32(getattr(rows, name).contiguous().numpy().data, crc)
        return crc

    def check_replicas(self, group=None) -> None:
        """Raise :class:`ReplicaDivergenceError` unless every replica is the same (with
        shared copies: every node's, checksummed by its leader)."""
        world = mdist.world_size(group)
        if world == 1:
            return
        mine = self.node is None or self.node.leader
        value = torch.tensor([self.checksum() if mine else -1], dtype=torch.int64,
                             device=mdist.comm_device(group))
        every = [torch.empty_like(value) for _ in range(world)]
        dist.all_gather(every, value, group=group)
        values = {r: int(v.item()) for r, v in enumerate(every) if int(v.item()) >= 0}
        if len(set(values.values())) > 1:
            raise ReplicaDivergenceError(
                "sparse store replicas diverged: CRC32 per rank "
                + ", ".join(f"{r}:{v:08x}" for r, v in values.items())
                + " (a rank applied a different update or its memory was corrupted)"
            )

    # --- whole weights (export) and checkpoints ---------------------------------------
    def full_weight(self, layer: int) -> torch.Tensor:
        self._fresh()
        return self.layers[layer].weight

    def set_full_weight(self, layer: int, value: torch.Tensor) -> None:
        self._write(lambda: self.layers[layer].weight.copy_(value))

    def save(self, directory: Path) -> None:
        self._fresh()
        super().save(directory)

    def load(self, directory: Path) -> None:
        self._write(lambda: self.load_state_dict(
            read_rows(directory, 0, self.sizes.rank), str(directory)))
        self.step_count = read_step_count(directory)  # on every local rank, not the leader's
        self.clear_grads()


class ShardedStore(RowStore):
    """This rank's share of the rows, by expert (see the module docstring).

    ``layers[l]`` holds rows ``[row_start, row_end)``; row ``g`` is at local index
    ``g - row_start``. Pending gradients are kept by global row id until the step.
    """

    def __init__(self, sizes: SparseSizes, seed: int = 0, huge_pages: bool = True) -> None:
        self.sizes = sizes
        self.group = _store_group()
        self.world = mdist.world_size(self.group)
        self.me = mdist.rank(self.group)
        if sizes.num_experts % self.world:
            raise UserError(
                f"sparse: `sparse_store` sharded needs the world size ({self.world}) to "
                f"divide sparse_experts ({sizes.num_experts})"
            )
        self.experts_per_rank = sizes.num_experts // self.world
        self.rows_per_rank = sizes.rank // self.world
        self.row_start = self.me * self.rows_per_rank
        self.row_end = self.row_start + self.rows_per_rank
        self.comm_bytes = 0
        generator = torch.Generator().manual_seed(seed)
        self.layers: dict[int, LayerRows] = {}
        for layer in sizes.layers:
            # The same random stream as the replicated store; this rank keeps its block.
            full = init_layer_weight(sizes.rank, sizes.hidden, generator, huge_pages=False)
            weight = huge_zeros(self.rows_per_rank, 2 * sizes.hidden, huge=huge_pages)
            weight.copy_(full[self.row_start : self.row_end])
            del full
            self.layers[layer] = new_layer_rows(weight, huge_pages)

    # --- communication ----------------------------------------------------------------
    def _exchange(
        self, send: list[torch.Tensor], counts: list[int] | None = None
    ) -> tuple[list[torch.Tensor], list[int]]:
        """all_to_all of tensors with a variable first dimension: ``send[o]`` goes to
        rank ``o``; returns what every rank sent here and those sizes. ``counts``: the
        sizes to receive when already known (else 8 bytes per rank are exchanged)."""
        if counts is None:
            mine = torch.tensor([t.shape[0] for t in send], dtype=torch.int64)
            theirs = torch.empty_like(mine)
            dist.all_to_all_single(theirs, mine, group=self.group)
            counts = theirs.tolist()
            self.comm_bytes += 8 * (self.world - 1)
        tail, dtype = send[0].shape[1:], send[0].dtype
        recv = torch.empty((sum(counts), *tail), dtype=dtype)
        # all_to_all_single with split sizes (gloo's alltoallv); gloo's list all_to_all
        # needs equal sizes.
        dist.all_to_all_single(
            recv, torch.cat(send), output_split_sizes=counts,
            input_split_sizes=[t.shape[0] for t in send], group=self.group,
        )
        self.comm_bytes += sum(
            t.numel() * t.element_size() for o, t in enumerate(send) if o != self.me
        )
        return list(recv.split(counts)), counts

    # --- the runtime's interface ------------------------------------------------------
    def select(self, layer: int, hidden: torch.Tensor, experts: torch.Tensor) -> Selection:
        """Top-K rows per token, scored by the owners of the tokens' experts."""
        sizes = self.sizes
        m, k = sizes.rows_per_expert, sizes.top_k
        if self.world == 1:
            return select_rows(self.keys(layer), hidden, experts, sizes.num_experts, k)
        hidden = hidden.float()
        owner = experts // self.experts_per_rank
        wanted = [(owner == o).any(1).nonzero().squeeze(1) for o in range(self.world)]
        their_h, counts = self._exchange([hidden.index_select(0, t) for t in wanted])
        their_e, _ = self._exchange([experts.index_select(0, t) for t in wanted], counts)
        first = self.me * self.experts_per_rank
        scores, ids = [], []
        for h, e in zip(their_h, their_e):
            cand = candidate_scores(self.keys(layer), h, e, m, first)
            top = cand.topk(k, dim=1, sorted=False)
            scores.append(top.values)
            ids.append(e.gather(1, top.indices // m) * m + top.indices % m)
        sent = [t.numel() for t in wanted]
        got_scores, _ = self._exchange(scores, sent)
        got_ids, _ = self._exchange(ids, sent)
        merged = torch.full((hidden.shape[0], self.world * k), float("-inf"))
        merged_ids = torch.zeros(hidden.shape[0], self.world * k, dtype=torch.int64)
        for o, tokens in enumerate(wanted):
            merged[tokens, o * k : (o + 1) * k] = got_scores[o]
            merged_ids[tokens, o * k : (o + 1) * k] = got_ids[o]
        pick = merged.topk(k, dim=1, sorted=False).indices
        row_ids = merged_ids.gather(1, pick)
        slot = (experts.unsqueeze(1) == (row_ids // m).unsqueeze(2)).to(torch.int8).argmax(2)
        rows, local = torch.unique(row_ids, sorted=True, return_inverse=True)
        return Selection(rows=rows, local=local, slot=slot)

    def gather(self, layer: int, rows: torch.Tensor) -> torch.Tensor:
        """``[U, 2d]`` fp32 rows (sorted global ids), fetched from their owners."""
        if self.world == 1:
            return self.layers[layer].weight.index_select(0, rows)
        counts = torch.bincount(rows // self.rows_per_rank, minlength=self.world).tolist()
        requests, asked = self._exchange(list(rows.split(counts)))
        weight = self.layers[layer].weight
        served = [weight.index_select(0, r - self.row_start) for r in requests]
        back, _ = self._exchange(served, counts)
        return torch.cat(back)

    def coalesce(self, group=None) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """This rank's rows with their gradients averaged over ranks, as ``{layer:
        (local row ids, grad)}`` (``group`` is ignored: the store has its own)."""
        result: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        width = 2 * self.sizes.hidden
        for layer in self.layers:
            idx, grad = self.coalesce_layer(layer)
            if self.world == 1:
                result[layer] = (idx, grad)
                continue
            counts = torch.bincount(idx // self.rows_per_rank, minlength=self.world).tolist()
            their_ids, got = self._exchange(list(idx.split(counts)))
            their_grads, _ = self._exchange(list(grad.split(counts)), got)
            ids = torch.cat(their_ids) - self.row_start
            unique, inverse = torch.unique(ids, sorted=True, return_inverse=True)
            total = torch.zeros(unique.numel(), width, dtype=torch.float32)
            total.index_add_(0, inverse, torch.cat(their_grads).reshape(-1, width))
            result[layer] = (unique, total.div_(self.world))
        return result

    def key_centroids(self, layer: int) -> torch.Tensor:
        """``[N, d]`` mean key of every expert, all-gathered from the owners."""
        mine = _centroids(self.keys(layer), self.sizes)
        if self.world == 1:
            return mine
        every = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(every, mine, group=self.group)
        return torch.cat(every)

    def total_sq_norm(self, local: float) -> float:
        """Squared norm of all row gradients: the sum of the owners' parts."""
        if self.world == 1:
            return local
        value = torch.tensor([local], dtype=torch.float64)
        dist.all_reduce(value, group=self.group)
        self.comm_bytes += 8 * (self.world - 1)
        return float(value.item())

    def check_replicas(self, group=None) -> None:
        """Nothing is replicated."""

    # --- whole weights (export) and checkpoints ---------------------------------------
    def full_weight(self, layer: int) -> torch.Tensor:
        """All rows of ``layer`` on rank 0 (collective; other ranks get their share)."""
        weight = self.layers[layer].weight
        if self.world == 1:
            return weight
        parts = [torch.empty_like(weight) for _ in range(self.world)] if self.me == 0 else None
        dist.gather(weight, parts, dst=0, group=self.group)
        return torch.cat(parts) if parts is not None else weight

    def set_full_weight(self, layer: int, value: torch.Tensor) -> None:
        self.layers[layer].weight.copy_(value[self.row_start : self.row_end])

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["row_range"] = (self.row_start, self.row_end)
        return state

    def save(self, directory: Path) -> None:
        """Every owner writes its rows, named by their global range, atomically."""
        directory.mkdir(parents=True, exist_ok=True)
        name = f"sparse_rows_{self.row_start:09d}_{self.row_end:09d}.pt"
        tmp = directory / (name + ".tmp")
        torch.save(self.state_dict(), tmp)
        tmp.replace(directory / name)

    def load(self, directory: Path) -> None:
        self.load_state_dict(read_rows(directory, self.row_start, self.row_end), str(directory))


def read_rows(directory: Path, start: int, end: int) -> dict:
    """Rows ``[start, end)`` of every layer from a checkpoint written by either store
    (any number of ranks), as a :meth:`RowStore.state_dict`."""
    files = _store_files(directory)
    if not files:
        raise UserError(
            f"checkpoint {directory} has no sparse store ({RowStore.FILE} or sparse_rows_*.pt)"
        )
    sizes: dict | None = None
    layers: dict[int, dict[str, torch.Tensor]] = {}
    covered = torch.zeros(end - start, dtype=torch.bool)
    step_count = 0
    for first, last, path in files:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        step_count = max(step_count, saved_step_count(state))
        last = state["sizes"]["rank"] if last < 0 else last
        lo, hi = max(first, start), min(last, end)
        if lo >= hi:
            continue
        sizes = state["sizes"]
        for layer, saved in state["layers"].items():
            out = layers.setdefault(layer, {
                name: torch.zeros((end - start, *saved[name].shape[1:]), dtype=saved[name].dtype)
                for name in STATE_NAMES
            })
            for name in STATE_NAMES:
                out[name][lo - start : hi - start] = saved[name][lo - first : hi - first]
        covered[lo - start : hi - start] = True
    if sizes is None or not bool(covered.all()):
        missing = (~covered).nonzero()
        first_missing = start + int(missing[0]) if missing.numel() else start
        raise UserError(f"checkpoint {directory}: sparse store rows from {first_missing} "
                        f"(of {start}..{end}) are in none of its files")
    return {"sizes": sizes, "layers": layers, "step_count": step_count}


def _store_files(directory: Path) -> list[tuple[int, int, Path]]:
    """``(first row, end row, path)`` of each store file in a checkpoint (end -1: a whole
    store of :class:`RowStore`, all rows)."""
    files: list[tuple[int, int, Path]] = []
    for path in sorted(directory.glob("sparse_rows_*.pt")):
        match = SHARD_PATTERN.fullmatch(path.name)
        if match:
            files.append((int(match[1]), int(match[2]), path))
    full = directory / RowStore.FILE
    if full.is_file():
        files.append((0, -1, full))
    return files


def read_step_count(directory: Path) -> int:
    """The store steps taken when the checkpoint in ``directory`` was written (every file
    holds it; memory-mapped, so no rows are read unless an older checkpoint lacks it)."""
    return max((saved_step_count(torch.load(path, map_location="cpu", weights_only=True,
                                            mmap=True)) for _, _, path in _store_files(directory)),
               default=0)


def _layout(sizes: SparseSizes) -> Layout:
    """Shapes and dtypes of every layer's weight, exp_avg, exp_avg_sq and steps, in order
    (:data:`STATE_NAMES`)."""
    rows, width = sizes.rank, 2 * sizes.hidden
    per_layer = [((rows, width), torch.float32)] * 3 + [((rows,), torch.int64)]
    return per_layer * len(sizes.layers)


def _centroids(keys: torch.Tensor, sizes: SparseSizes) -> torch.Tensor:
    return keys.reshape(-1, sizes.rows_per_expert, sizes.hidden).mean(1)


def _store_group():
    """The process group of the store's host-tensor collectives (see module docstring)."""
    if not mdist.initialized() or mdist.world_size() == 1:
        return None
    if "nccl" in str(dist.get_backend()):
        return dist.new_group(backend="gloo")
    return None


def _allreduce_bytes(store: RowStore, result: dict, world: int, group) -> int:
    """Bytes one rank sends in the replicated store's gradient exchange (ring
    all_gather of the padded row ids: ``(W-1)*8*(1+n_max)``; ring all_reduce of the
    union's gradients: ``2*(W-1)/W*U*2d*4``). ``n_max`` comes from a MAX all_reduce of
    the local row counts made only for this accounting."""
    local = torch.tensor([len(store.layers[layer].pending[0][0])
                          if store.layers[layer].pending else 0 for layer in result],
                         dtype=torch.int64, device=mdist.comm_device(group))
    dist.all_reduce(local, op=dist.ReduceOp.MAX, group=group)
    width = 2 * store.sizes.hidden
    ids = sum((world - 1) * 8 * (1 + int(n)) for n in local.tolist())
    grads = sum(2 * (world - 1) * rows.numel() * width * 4 // world for rows, _ in result.values())
    return ids + grads
