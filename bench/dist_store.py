"""Replicated against sharded sparse store at 1, 2, 4 ranks (CPU, gloo, store level).

Three layouts: ``replicated`` (a copy per rank), ``replicated_shared`` (one copy per node
shared by its local ranks; all ranks here are one node) and ``sharded``. Each rank routes
synthetic hidden states (its own random tokens, random expert choices: not the real
router's decisions) through select -> gather -> row gradients -> coalesce -> row-sparse
AdamW, for a few steps, and reports bytes sent to other ranks per step (the stores' own
counters), store bytes per rank (``store_bytes``: what the store accounts to the rank, a
shared copy divided by its ranks), host memory per rank measured as the growth of the
process's proportional set size (``pss_bytes``: shared pages divided among the processes
that map them; the optimizer's gather buffers included; zero pages of a shared copy that
were never written cost nothing and are not counted, while a private store's zeroed
moments are), and the step time of each layout over the per-rank replicated one, measured
side by side. Then, on paper from the measured rows per token, the
inter-node bytes per step of LLaMA-7B with a 10% sparse adapter at 2-16 nodes against
ZeRO-Offload's ring all-reduce of the same adapter's gradients (2*Phi*(W-1)/W per rank).

Writes bench/results/dist_store.{json,png} (``--out`` elsewhere).

    python bench/dist_store.py [--out DIR]     # ~30 s on 2 cores
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path

import psutil
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from meft_ds.runner import free_port  # noqa: E402
from meft_ds.sparse.optim import RowAdamW  # noqa: E402
from meft_ds.sparse.options import SparseSizes  # noqa: E402
from meft_ds.sparse.sharded import ReplicatedStore, ShardedStore  # noqa: E402

OUT = Path(__file__).resolve().parent / "results"
SIZES = SparseSizes(hidden=256, rank=4096, num_experts=64, experts_per_token=2, top_k=32,
                    layers=(0, 1, 2, 3))
TOKENS, STEPS = 128, 4
MODES = {
    "replicated": lambda: ReplicatedStore(SIZES, seed=0, share_local=False),
    "replicated_shared": lambda: ReplicatedStore(SIZES, seed=0, share_local=True),
    "sharded": lambda: ShardedStore(SIZES, seed=0),
}


def _pss() -> int:
    gc.collect()
    return psutil.Process().memory_full_info().pss


def _worker(rank: int, world: int, port: int, queue) -> None:
    torch.set_num_threads(1)
    os.environ["LOCAL_RANK"] = str(rank)  # one node
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    _run(MODES["replicated"], rank)  # warm-up: first-call allocations, not the store's
    result = {}
    for name, make in MODES.items():
        dist.barrier()
        before = _pss()
        result[name] = _run(make, rank)  # the store is freed when it returns
        result[name]["pss_bytes"] -= before
    queue.put((rank, result))
    dist.destroy_process_group()


def _run(make, rank: int) -> dict:
    """A few steps of one layout; its figures, ``pss_bytes`` with the store alive."""
    store = make()
    optim = RowAdamW(backend="torch")
    gen = torch.Generator().manual_seed(rank)
    rows_seen, elapsed = 0, 0.0
    store.comm_bytes = 0
    for _ in range(STEPS):
        dist.barrier()
        start = time.perf_counter()
        for layer in SIZES.layers:
            hidden = torch.randn(TOKENS, SIZES.hidden, generator=gen)
            experts = torch.rand(TOKENS, SIZES.num_experts, generator=gen).topk(2).indices
            sel = store.select(layer, hidden, experts)
            store.gather(layer, sel.rows)
            rows_seen += sel.rows.numel()
            store.add_grad(layer, sel.rows,
                           torch.randn(sel.rows.numel(), 2 * SIZES.hidden, generator=gen))
        for layer, (rows, grad) in store.coalesce().items():
            s = store.layers[layer]
            optim.step(s.weight, s.exp_avg, s.exp_avg_sq, s.steps, rows, grad, 1e-3)
        store.clear_grads()
        elapsed += time.perf_counter() - start
    store.full_weight(SIZES.layers[0])  # a read: the leader's last update is done
    dist.barrier()
    return {"comm_bytes_per_step": store.comm_bytes / STEPS, "store_bytes": store.nbytes(),
            "pss_bytes": _pss(), "step_s": elapsed / STEPS,
            "rows_per_layer": rows_seen / STEPS / len(SIZES.layers)}


def measure(world: int) -> dict:
    # Fixed mmap threshold: freed buffers go back to the OS (glibc's adaptive threshold
    # would keep one layout's freed memory in the heap and hide the next one's growth).
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(1 << 17)
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(_worker, args=(world, free_port(), queue), nprocs=world, join=True,
                       start_method="spawn")
    per_rank = dict(queue.get() for _ in range(world))
    out: dict = {}
    for mode in MODES:
        rows = [per_rank[r][mode] for r in range(world)]
        out[mode] = {k: sum(r[k] for r in rows) / world for k in rows[0]}  # per-rank mean
        out[mode]["node_pss_bytes"] = sum(r["pss_bytes"] for r in rows)
        out[f"{mode}_over_replicated_step_time"] = (
            out[mode]["step_s"] / out["replicated"]["step_s"])
    return out


def llama7b_projection(row_fraction: float = 0.56) -> list[dict]:
    """Per-rank inter-node bytes per step, one rank per node, fp32 rows and gradients.

    The working set of one rank per layer is ``row_fraction`` of the rows (0.56: the
    sparse-adapter paper's measured 0.56*Phi moved per iteration at batch 2, seq 256;
    the synthetic routing of this bench is uniform and not representative)."""
    d, layers, model = 4096, 32, 6.74e9
    phi = 0.10 * model
    r = phi / (2 * d * layers)
    tokens, k, e = 2 * 256, 64, 2
    out = []
    for w in (2, 4, 8, 16):
        share = (w - 1) / w
        u = row_fraction * r  # working-set rows per layer, one rank
        owners = min(e, w) * share  # other ranks a token goes to
        sharded = layers * (
            tokens * owners * (4 * d + 8 * e + 12 * k)  # hidden + ids out, top-K back
            + u * share * (8 + 2 * d * 4)  # row requests + rows back
            + u * share * (8 + 2 * d * 4)  # row gradients to owners
        )
        union = min(r, w * u)
        replicated = layers * ((w - 1) * 8 * u + 2 * share * union * 2 * d * 4)
        zero = 2 * phi * share * 4
        out.append({"nodes": w, "sharded_bytes": sharded, "replicated_bytes": replicated,
                    "zero_offload_allreduce_bytes": zero, "phi": phi})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(OUT), help="directory of the JSON and plot")
    out = Path(parser.parse_args().out)
    results = {str(w): measure(w) for w in (1, 2, 4)}
    base = results["1"]["replicated"]
    k = SIZES.top_k
    rows_per_token = base["rows_per_layer"] / (TOKENS * k)
    report = {
        "config": {**SIZES.as_dict(), "tokens_per_rank_layer": TOKENS, "steps": STEPS,
                   "routing": "synthetic: random hidden states and expert choices"},
        "machine": {"platform": platform.platform(), "torch": torch.__version__},
        "measured": results,
        "store_bytes_per_rank_ratio_over_replicated": {
            w: {mode: r[mode]["store_bytes"] / r["replicated"]["store_bytes"]
                for mode in MODES} for w, r in results.items()},
        "unique_rows_over_token_keys": rows_per_token,
        "llama7b_10pct_projection": llama7b_projection(),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "dist_store.json").write_text(json.dumps(report, indent=2))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    ws = [1, 2, 4]
    for mode in MODES:
        if mode != "replicated_shared":  # sends what "replicated" sends
            name = "replicated (both)" if mode == "replicated" else mode
            a.plot(ws, [results[str(w)][mode]["comm_bytes_per_step"] / 2**20 for w in ws],
                   "o-", label=f"{name}: MiB sent/step/rank")
        a.plot(ws, [results[str(w)][mode]["pss_bytes"] / 2**20 for w in ws], "s--",
               label=f"{mode}: host MiB/rank (PSS)")
    a.set_xlabel("ranks")
    a.set_title("measured (CPU, gloo, store level)")
    a.legend(fontsize=7)
    proj = report["llama7b_10pct_projection"]
    nodes = [p["nodes"] for p in proj]
    for key, label in (("sharded_bytes", "sharded store"), ("replicated_bytes", "replicated"),
                       ("zero_offload_allreduce_bytes", "ZeRO-Offload all-reduce")):
        b.plot(nodes, [p[key] / 2**30 for p in proj], "o-", label=label)
    b.set_xlabel("nodes")
    b.set_ylabel("GiB per step per node")
    b.set_title("LLaMA-7B, 10% sparse adapter (on paper)")
    b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "dist_store.png", dpi=120)
    print(json.dumps(report["measured"], indent=1))


if __name__ == "__main__":
    main()
