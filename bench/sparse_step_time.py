"""Step time of ``--method sparse`` against ``--method parallel_adapter`` of the same
width held entirely in memory: real SmolLM2-135M on the CPU, through the launcher.

For each width r, the two methods run alternately (sparse, dense, sparse, dense, ...), each
in its own process via :func:`bench.bench_baselines.run_one` (DeepSpeed, cpu.json, GSM8K
truncated to ``--seq`` tokens); the first step of each run (warm-up) is dropped. Reported:
the ratio of mean step times for each interleaved pair, their median, and the sparse
runs' own figures (rows per layer, bytes, CPU Adam and wait seconds) from metrics.jsonl.
The ratio is only meaningful side by side on one machine; on the CPU the "device" is the
CPU itself, so there is no transfer to hide: this is a CPU-cost comparison.

Writes ``bench/results/sparse_step_time.json`` and ``.png``.
Run: ``nice -n 10 .venv/bin/python bench/sparse_step_time.py`` (~10 min on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_baselines import run_one  # noqa: E402
from bench.report import write_report  # noqa: E402
from bench.sparse_offload import machine  # noqa: E402


def mean_step(records: list[dict]) -> float:
    timed = records[1:] or records
    return statistics.fmean(r["step_s"] for r in timed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--top_k", type=int, default=64)
    parser.add_argument("--cache", type=float, default=0.25, help="sparse_cache_rows")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "sparse_step_time"))
    parser.add_argument("--work", default="/tmp/meft_bench_sparse_step")
    args = parser.parse_args()

    results = []
    for rank in args.ranks:
        configs = {
            "sparse": ("sparse", ("--sparse_rank", str(rank), "--sparse_top_k", str(args.top_k),
                                  "--sparse_cache_rows", str(args.cache))),
            "parallel_adapter": ("parallel_adapter", ("--adapter_size", str(rank),
                                                      "--adapter_activation", "relu")),
        }
        pairs, sparse_records = [], []
        for rep in range(args.repeats):
            times = {}
            for label, (method, extra) in configs.items():
                print(f"r {rank} rep {rep}: {label} ...", flush=True)
                records = run_one(method, False, args, Path(args.work) / f"{label}_r{rank}_{rep}",
                                  extra)
                times[label] = mean_step(records)
                if label == "sparse":
                    sparse_records += records[1:]
            pairs.append(times)
        ratios = [p["sparse"] / p["parallel_adapter"] for p in pairs]
        keys = [k for k in sparse_records[0] if k.startswith("sparse_")
                and not isinstance(sparse_records[0][k], list)]
        results.append({
            "rank": rank, "pairs_mean_step_s": pairs, "ratios": ratios,
            "ratio_median": statistics.median(ratios),
            "sparse_step_figures_mean": {k: statistics.fmean(r[k] for r in sparse_records)
                                         for k in keys},
        })
        print(json.dumps(results[-1]["ratios"]), flush=True)
    report = {"benchmark": "sparse_step_time", "model": "smollm2-135m", "machine": machine(),
              "config": vars(args), "ds_config": "ds_configs/cpu.json", "results": results,
              "note": "CPU only: ratios measured side by side (interleaved runs) on a shared "
                      "2-core machine; absolute seconds are not comparable elsewhere"}
    write_report(report, args.out, plot)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for res in report["results"]:
        ax.plot([res["rank"]] * len(res["ratios"]), res["ratios"], "o", color="tab:blue")
    ax.plot([r["rank"] for r in report["results"]],
            [r["ratio_median"] for r in report["results"]], "-", color="tab:blue",
            label="median of interleaved pairs")
    ax.axhline(1.0, color="grey", ls=":")
    ax.set(xscale="log", xlabel="adapter width r", ylabel="step time sparse / parallel_adapter",
           title="SmolLM2-135M on CPU, same width")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
