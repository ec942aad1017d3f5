"""Row-sparse CPU Adam: updating U selected rows of the store against the alternatives.

Store: one LLaMA-7B-shape layer at r 6144 (``[6144, 2*4096]`` fp32 weights and both
moments, 201 MB each). For each fraction of rows selected, interleaved repetitions of:

- ``sparse``: :meth:`RowAdamW.step` on the store (gather rows, gradients and moments into
  contiguous buffers, DeepSpeedCPUAdam kernel, scatter back), rows at one step count;
- ``sparse_mixed``: the same with rows at different step counts (sorted, one kernel call
  per step count), as after some training;
- ``sparse_per_row``: no gather/scatter at all: the kernel called once per selected row
  on the store's row views (each row of a ``[r, 2d]`` row-major tensor is contiguous, so
  the kernel updates the store in place), each row with its own step count;
- ``(a) kernel``: the DeepSpeedCPUAdam kernel on U rows already contiguous;
- ``(b) dense``: ``DeepSpeedCPUAdam.step`` over the whole store;
- ``(c) torch``: ``torch.optim.AdamW(fused=True)`` (``foreach`` if fused fails on CPU) on
  U contiguous rows.

Reported: the minimum over repetitions of each (least disturbed on a shared machine),
and the ratios sparse/(a) (gather/scatter overhead; target <= 1.2), (b)/sparse (target
>= 10 at 5%), (c)/(a). Times are from this machine and only compared side by side.

Writes ``bench/results/sparse_adam.json`` and ``.png``.
Run: ``OMP_NUM_THREADS=2 .venv/bin/python bench/sparse_adam.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))

import torch  # noqa: E402

from bench.report import write_report  # noqa: E402
from bench.sparse_offload import machine  # noqa: E402
from meft_ds.sparse.optim import RowAdamW  # noqa: E402

LR = 1e-3


def torch_adamw(param: torch.Tensor) -> tuple[torch.optim.Optimizer, str]:
    try:
        opt = torch.optim.AdamW([param], lr=LR, fused=True)
        param.grad = torch.zeros_like(param)
        opt.step()
        return opt, "fused"
    except (RuntimeError, TypeError):
        return torch.optim.AdamW([param], lr=LR, foreach=True), "foreach"


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run_fraction(store: dict, fraction: float, repeats: int, dense, gen) -> dict:
    rank, width = store["weight"].shape
    count = max(1, round(fraction * rank))
    rows = torch.sort(torch.randperm(rank, generator=gen)[:count]).values
    grad = torch.randn(count, width, generator=gen) * 1e-3
    sparse = RowAdamW("cpu_adam")
    # (a): the kernel alone on contiguous rows
    kernel = RowAdamW("cpu_adam")
    p, m, v = (store[k].index_select(0, rows) for k in ("weight", "exp_avg", "exp_avg_sq"))
    # (c): torch AdamW on the same rows
    param = torch.nn.Parameter(p.clone())
    topt, kind = torch_adamw(param)
    mixed_steps = torch.randint(1, 20, (rank,), generator=gen)
    times: dict[str, list[float]] = {k: [] for k in
                                     ("sparse", "sparse_mixed", "sparse_per_row", "kernel",
                                      "dense", "torch")}
    step = [0]

    def run_kernel():
        step[0] += 1
        kernel._op.adam_update(kernel._opt_id, step[0], LR, 0.9, 0.999, 1e-8, 0.0, True,
                               p, grad, m, v)

    row_list = rows.tolist()

    def run_per_row():
        op, oid = kernel._op, kernel._opt_id
        row_steps = (mixed_steps[rows] + 1).tolist()
        weight, exp_avg, exp_avg_sq = store["weight"], store["exp_avg"], store["exp_avg_sq"]
        for j, (i, t) in enumerate(zip(row_list, row_steps)):
            op.adam_update(oid, t, LR, 0.9, 0.999, 1e-8, 0.0, True,
                           weight[i], grad[j], exp_avg[i], exp_avg_sq[i])
        mixed_steps[rows] += 1

    def run_torch():
        param.grad = grad
        topt.step()

    equal_steps = torch.zeros(rank, dtype=torch.int64)  # selected rows stay equal
    for _ in range(repeats):
        times["sparse"].append(timed(lambda: sparse.step(
            store["weight"], store["exp_avg"], store["exp_avg_sq"], equal_steps, rows, grad,
            LR)))
        times["sparse_mixed"].append(timed(lambda: sparse.step(
            store["weight"], store["exp_avg"], store["exp_avg_sq"], mixed_steps, rows, grad,
            LR)))
        times["sparse_per_row"].append(timed(run_per_row))
        times["kernel"].append(timed(run_kernel))
        times["torch"].append(timed(run_torch))
        if dense is not None:
            times["dense"].append(timed(dense.step))
    best = {k: min(t) for k, t in times.items() if t}
    out = {
        "fraction": fraction, "rows": count, "torch_adamw": kind,
        "min_s": best, "median_s": {k: statistics.median(t) for k, t in times.items() if t},
        "overhead_sparse_over_kernel": best["sparse"] / best["kernel"],
        "overhead_sparse_mixed_over_kernel": best["sparse_mixed"] / best["kernel"],
        "overhead_per_row_over_kernel": best["sparse_per_row"] / best["kernel"],
        "torch_over_kernel": best["torch"] / best["kernel"],
    }
    if "dense" in best:
        out["dense_over_sparse"] = best["dense"] / best["sparse"]
        out["dense_over_sparse_mixed"] = best["dense"] / best["sparse_mixed"]
    print(json.dumps({k: v for k, v in out.items() if not isinstance(v, dict)}), flush=True)
    return out


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["results"]
    x = [100 * r["fraction"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    ax = axes[0]
    for key, label in (("sparse", "row-sparse (gather+kernel+scatter)"),
                       ("sparse_mixed", "row-sparse, mixed step counts"),
                       ("sparse_per_row", "kernel per row in place (mixed steps)"),
                       ("kernel", "(a) kernel on contiguous rows"),
                       ("torch", "(c) torch AdamW on rows"), ("dense", "(b) dense CPU Adam")):
        ax.plot(x, [r["min_s"].get(key, float("nan")) * 1e3 for r in rows], "o-", label=label)
    ax.set(xscale="log", yscale="log", xlabel="% of rows selected", ylabel="ms (min)",
           title="Times on this machine (side by side)")
    ax.legend(fontsize=7)
    ax = axes[1]
    ax.plot(x, [r["overhead_sparse_over_kernel"] for r in rows], "o-", label="sparse / (a)")
    ax.plot(x, [r["overhead_sparse_mixed_over_kernel"] for r in rows], "s-",
            label="sparse mixed / (a)")
    ax.plot(x, [r["overhead_per_row_over_kernel"] for r in rows], "d-",
            label="per row in place / (a)")
    ax.plot(x, [r.get("dense_over_sparse", float("nan")) for r in rows], "^-",
            label="(b) / sparse")
    ax.plot(x, [r["torch_over_kernel"] for r in rows], "v-", label="(c) / (a)")
    ax.axhline(1.2, color="grey", ls=":", lw=0.8)
    ax.axhline(10, color="grey", ls=":", lw=0.8)
    ax.set(xscale="log", yscale="log", xlabel="% of rows selected", ylabel="ratio",
           title="Ratios (targets 1.2 and 10 dotted)")
    ax.legend(fontsize=7)
    fig.suptitle(f"store {report['config']['rank']} x {report['config']['width']} fp32")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rank", type=int, default=6144)
    parser.add_argument("--width", type=int, default=8192)
    parser.add_argument("--fractions", type=float, nargs="+",
                        default=[0.01, 0.05, 0.1, 0.25, 0.5])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "sparse_adam"))
    args = parser.parse_args()
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(args.rank, args.width, generator=gen) * 0.02
    store = {"weight": weight, "exp_avg": torch.zeros_like(weight),
             "exp_avg_sq": torch.zeros_like(weight)}
    # (b): a separate dense parameter of the same size (the store itself stays untouched)
    dense_param = torch.nn.Parameter(weight.clone())
    dense_param.grad = torch.randn(args.rank, args.width, generator=gen) * 1e-3
    dense = DeepSpeedCPUAdam([dense_param], lr=LR, adamw_mode=True)
    dense.step()
    results = [run_fraction(store, f, args.repeats, dense, gen) for f in args.fractions]
    report = {"benchmark": "sparse_adam", "machine": machine(), "config": vars(args),
              "threads": torch.get_num_threads(), "results": results,
              "note": "min over interleaved repetitions; compare only ratios"}
    write_report(report, args.out, plot)


if __name__ == "__main__":
    main()
