"""The data-parallel sparse stores on two gloo processes of one node (no model): the
sharded store and the replicated store with one copy per node select, serve and update
exactly what a replicated store with a copy per rank does; checkpoints reshard and
resume; diverged replicas are caught; bad world sizes are refused."""

from __future__ import annotations

import os
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from meft_ds.errors import UserError
from meft_ds.runner import free_port
from meft_ds.sparse.optim import RowAdamW
from meft_ds.sparse.options import SparseSizes
from meft_ds.sparse.sharded import (
    STATE_NAMES,
    ReplicaDivergenceError,
    ReplicatedStore,
    ShardedStore,
)

SIZES = SparseSizes(hidden=16, rank=64, num_experts=8, experts_per_token=2, top_k=6,
                    layers=(0, 1))


def _per_token_rows(selection) -> list[list[int]]:
    rows = selection.rows[selection.local]
    return [sorted(r) for r in rows.tolist()]


def _worker(rank: int, world: int, port: int, directory: str) -> None:
    torch.set_num_threads(1)
    os.environ["LOCAL_RANK"] = str(rank)  # both ranks on one node
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        _check(rank, world, Path(directory))
    finally:
        dist.destroy_process_group()


def _gathered(value: int) -> list[int]:
    every: list = [None] * dist.get_world_size()
    dist.all_gather_object(every, value)
    return every


def _same_state(store: ReplicatedStore, want: ReplicatedStore) -> None:
    for layer in SIZES.layers:
        store.full_weight(layer)  # a read: waits for the leader's update
        for name in STATE_NAMES:
            got, ref = getattr(store.layers[layer], name), getattr(want.layers[layer], name)
            assert torch.equal(got, ref), (layer, name)


def _check(rank: int, world: int, directory: Path) -> None:
    full = ReplicatedStore(SIZES, seed=3, share_local=False)  # a copy per rank
    part, shared = ShardedStore(SIZES, seed=3), ReplicatedStore(SIZES, seed=3)
    # One copy per node: the same memory file on both ranks, half of it accounted to each.
    assert shared.node is not None and shared.node.leader == (rank == 0)
    assert len(set(_gathered(shared.memory.inode))) == 1
    assert shared.nbytes() == full.nbytes() // world
    _same_state(shared, full)
    lo, hi = part.row_start, part.row_end
    assert hi - lo == SIZES.rank // world
    assert torch.equal(part.layers[0].weight, full.layers[0].weight[lo:hi])
    assert torch.equal(part.key_centroids(1), full.key_centroids(1))
    optim = RowAdamW(backend="torch")
    gen = torch.Generator().manual_seed(100 + rank)  # every rank its own tokens
    for _ in range(3):  # steps
        for _ in range(2):  # micro-batches
            for layer in SIZES.layers:
                hidden = torch.randn(10, SIZES.hidden, generator=gen)
                experts = torch.rand(10, SIZES.num_experts, generator=gen).topk(2).indices
                want, got = full.select(layer, hidden, experts), part.select(layer, hidden, experts)
                assert torch.equal(want.rows, got.rows)
                assert _per_token_rows(want) == _per_token_rows(got)
                assert torch.equal(experts.gather(1, got.slot) * 8 + (
                    got.rows[got.local] % 8), got.rows[got.local])
                assert torch.equal(part.gather(layer, got.rows), full.gather(layer, want.rows))
                same = shared.select(layer, hidden, experts)
                assert torch.equal(same.rows, want.rows) and torch.equal(same.slot, want.slot)
                assert torch.equal(shared.gather(layer, same.rows), full.gather(layer, want.rows))
                grad = torch.randn(got.rows.numel(), 2 * SIZES.hidden, generator=gen)
                full.add_grad(layer, want.rows, grad)
                part.add_grad(layer, got.rows, grad.clone())
                shared.add_grad(layer, same.rows, grad.clone())
        want, got, once = full.coalesce(), part.coalesce(), shared.coalesce()
        # Only the leader updates the node's copy; every rank clips by the same norm.
        assert sorted(once) == (sorted(want) if rank == 0 else [])
        for layer, (rows, grad) in once.items():
            assert torch.equal(rows, want[layer][0]) and torch.equal(grad, want[layer][1])
        sq_full = sum(float(g.double().pow(2).sum()) for _, g in want.values())
        sq_part = part.total_sq_norm(sum(float(g.double().pow(2).sum()) for _, g in got.values()))
        assert abs(sq_full - sq_part) <= 1e-9 * sq_full
        assert shared.total_sq_norm(0.0) == sq_full
        for layer in SIZES.layers:
            rows, grad = want[layer]
            mine = (rows >= lo) & (rows < hi)
            assert torch.equal(got[layer][0], rows[mine] - lo)
            torch.testing.assert_close(got[layer][1], grad[mine], rtol=1e-6, atol=1e-7)
            for store, (r, g) in ((full, want[layer]), (part, got[layer])):
                s = store.layers[layer]
                optim.step(s.weight, s.exp_avg, s.exp_avg_sq, s.steps, r, g, 1e-2)
        for layer, (r, g) in once.items():
            s = shared.layers[layer]
            optim.step(s.weight, s.exp_avg, s.exp_avg_sq, s.steps, r, g, 1e-2)
        for store in (full, part, shared):
            store.clear_grads()
    _same_state(shared, full)  # bit for bit: the same arithmetic, once per node
    for layer in SIZES.layers:
        torch.testing.assert_close(part.layers[layer].weight, full.layers[layer].weight[lo:hi],
                                   rtol=1e-6, atol=1e-7)
        assert torch.equal(part.layers[layer].steps, full.layers[layer].steps[lo:hi])
    assert part.comm_bytes > 0 and full.comm_bytes > 0
    # Full export on rank 0.
    exported = part.full_weight(0)
    if rank == 0:
        torch.testing.assert_close(exported, full.layers[0].weight, rtol=1e-6, atol=1e-7)
    # Checkpoints reshard: the sharded files load into one full replica and back.
    (directory / "sharded").mkdir(exist_ok=True)
    part.save(directory / "sharded")
    full.save(directory / "replicated")
    shared.save(directory / "shared")
    dist.barrier()
    resumed = ReplicatedStore(SIZES, seed=9)  # a shared copy, loaded once per node
    resumed.load(directory / "shared")
    _same_state(resumed, full)
    with pytest.raises(UserError, match="has no sparse store"):  # on both ranks, no hang
        resumed.load(directory)
    again = ReplicatedStore(SIZES, seed=9)
    again.load(directory / "sharded")
    torch.testing.assert_close(again.layers[1].exp_avg, full.layers[1].exp_avg,
                               rtol=1e-6, atol=1e-7)
    assert torch.equal(again.layers[1].steps, full.layers[1].steps)
    shard = ShardedStore(SIZES, seed=9)
    shard.load(directory / "replicated")
    assert torch.equal(shard.layers[1].exp_avg_sq, full.layers[1].exp_avg_sq[lo:hi])
    # Identical replicas pass the check; a corrupted one is caught on every rank.
    full.check_replicas()
    shared.check_replicas()
    # A rank that cannot map the leader's memory: the node keeps a copy per rank.
    with mock.patch("os.open", side_effect=PermissionError(13, "Permission denied")):
        if rank == 1:
            with pytest.warns(UserWarning, match="keep one copy each"):
                private = ReplicatedStore(SIZES, seed=3)
        else:
            private = ReplicatedStore(SIZES, seed=3)
    assert private.node is None and private.nbytes() == full.nbytes()
    if rank == 1:
        full.layers[1].exp_avg_sq[5, 3] += 1e-3
    with pytest.raises(ReplicaDivergenceError, match="replicas diverged"):
        full.check_replicas()
    bad = SparseSizes(hidden=16, rank=48, num_experts=3, experts_per_token=2, top_k=6,
                      layers=(0,))
    with pytest.raises(UserError, match=r"world size \(2\) to divide sparse_experts \(3\)"):
        ShardedStore(bad)


@pytest.mark.multiprocess
def test_sharded_store_equals_replicated_on_two_ranks(tmp_path: Path) -> None:
    # A failed assertion in either rank raises ProcessRaisedException here.
    mp.start_processes(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")
