"""The data-parallel sparse stores on two gloo processes (no model): the sharded store
selects, serves and updates exactly what the replicated one does; checkpoints reshard;
diverged replicas are caught; bad world sizes are refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from meft_ds.errors import UserError
from meft_ds.runner import free_port
from meft_ds.sparse.optim import RowAdamW
from meft_ds.sparse.options import SparseSizes
from meft_ds.sparse.sharded import ReplicaDivergenceError, ReplicatedStore, ShardedStore

SIZES = SparseSizes(hidden=16, rank=64, num_experts=8, experts_per_token=2, top_k=6,
                    layers=(0, 1))


def _per_token_rows(selection) -> list[list[int]]:
    rows = selection.rows[selection.local]
    return [sorted(r) for r in rows.tolist()]


def _worker(rank: int, world: int, port: int, directory: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        _check(rank, world, Path(directory))
    finally:
        dist.destroy_process_group()


def _check(rank: int, world: int, directory: Path) -> None:
    full, part = ReplicatedStore(SIZES, seed=3), ShardedStore(SIZES, seed=3)
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
                grad = torch.randn(got.rows.numel(), 2 * SIZES.hidden, generator=gen)
                full.add_grad(layer, want.rows, grad)
                part.add_grad(layer, got.rows, grad.clone())
        want, got = full.coalesce(), part.coalesce()
        sq_full = sum(float(g.double().pow(2).sum()) for _, g in want.values())
        sq_part = part.total_sq_norm(sum(float(g.double().pow(2).sum()) for _, g in got.values()))
        assert abs(sq_full - sq_part) <= 1e-9 * sq_full
        for layer in SIZES.layers:
            rows, grad = want[layer]
            mine = (rows >= lo) & (rows < hi)
            assert torch.equal(got[layer][0], rows[mine] - lo)
            torch.testing.assert_close(got[layer][1], grad[mine], rtol=1e-6, atol=1e-7)
            for store, (r, g) in ((full, want[layer]), (part, got[layer])):
                s = store.layers[layer]
                optim.step(s.weight, s.exp_avg, s.exp_avg_sq, s.steps, r, g, 1e-2)
        full.clear_grads()
        part.clear_grads()
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
    dist.barrier()
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
    if rank == 1:
        full.layers[1].exp_avg_sq[5, 3] += 1e-3
    with pytest.raises(ReplicaDivergenceError, match="replicas diverged"):
        full.check_replicas()
    bad = SparseSizes(hidden=16, rank=48, num_experts=3, experts_per_token=2, top_k=6,
                      layers=(0,))
    with pytest.raises(UserError, match=r"world size \(2\) to divide sparse_experts \(3\)"):
        ShardedStore(bad)


def test_sharded_store_equals_replicated_on_two_ranks(tmp_path: Path) -> None:
    # A failed assertion in either rank raises ProcessRaisedException here.
    mp.start_processes(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")
