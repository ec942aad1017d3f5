"""Summary of the sparse GPU check (``bench/gpu/checks.sh`` part 2): the sparse adapter
under a GPU memory cap against the same-width parallel adapter held on the GPU.

Reads ``RUNS/{sparse,dense}/metrics.jsonl`` (per-step records of the trainer) and writes
``OUT/sparse_gpu.json`` and ``.png``: mean step time after the first two steps, their
ratio (target <= 1.25), CUDA peak allocated memory, and the sparse run's per-step CPU-side
figures (CPU Adam, the optimizer step the GPU waits for, prefetch wait, bytes moved).

    python bench/gpu/summary.py RUNS OUT
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

TARGET = 1.25
WARMUP = 2


def load(run: Path) -> dict:
    """Step records (after warm-up) and the run's results."""
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "step_s" in r]
    timed = steps[WARMUP:] or steps
    peak = [r["cuda_peak_alloc_gib"] for r in steps if "cuda_peak_alloc_gib" in r]
    reserved = [r["cuda_peak_reserved_gib"] for r in steps if "cuda_peak_reserved_gib" in r]
    sparse = {k: statistics.fmean(r[k] for r in timed) for k in timed[0]
              if k.startswith(("sparse_", "prefetch_")) and isinstance(timed[0][k], int | float)}
    return {"steps": len(steps), "mean_step_s": statistics.fmean(r["step_s"] for r in timed),
            "mean_tokens_per_s": statistics.fmean(r["tokens_per_s"] for r in timed),
            "cuda_peak_alloc_gib": max(peak) if peak else None,
            "cuda_peak_reserved_gib": max(reserved) if reserved else None,
            "per_step_means": sparse,
            "results": json.loads((run / "results.json").read_text())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", type=Path, help="directory holding the sparse/ and dense/ runs")
    parser.add_argument("out", type=Path, help="directory for sparse_gpu.json and .png")
    args = parser.parse_args()
    runs, out = args.runs, args.out
    report = {"benchmark": "sparse_gpu", "runs": {k: load(runs / k) for k in ("sparse", "dense")},
              "target_ratio_max": TARGET}
    ratio = report["runs"]["sparse"]["mean_step_s"] / report["runs"]["dense"]["mean_step_s"]
    report["step_time_ratio"] = ratio
    report["meets_target"] = ratio <= TARGET
    out.mkdir(parents=True, exist_ok=True)
    (out / "sparse_gpu.json").write_text(json.dumps(report, indent=2))
    print(json.dumps({k: report[k] for k in ("step_time_ratio", "meets_target")}))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.6))
    names = list(report["runs"])
    a.bar(names, [report["runs"][n]["mean_step_s"] for n in names])
    a.set(ylabel="mean step time (s)", title=f"sparse / dense = {ratio:.2f} (target {TARGET})")
    peaks = [report["runs"][n]["cuda_peak_alloc_gib"] or 0.0 for n in names]
    b.bar(names, peaks)
    b.set(ylabel="CUDA peak allocated (GiB)", title="peak GPU memory (sparse capped)")
    fig.tight_layout()
    fig.savefig(out / "sparse_gpu.png", dpi=110)


if __name__ == "__main__":
    main()
