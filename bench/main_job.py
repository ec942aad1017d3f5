"""Summarise finished main-job runs (``make train``, one per prompt format) into
``bench/results/main_job_cpu.json`` and a plot of exact match before/after.

Reads each run directory's ``results.json`` (scores before and after, precision, prompt
format, peak RSS) and ``metrics.jsonl`` (per-step figures) and writes the headline figures
the README quotes: exact match before/after, final loss, store rows moved at the first and
last step, mean row-sparse CPU Adam seconds, training seconds (sum of step times: this
machine's only, and only meaningful when nothing else ran beside it; say so with
``--note``).

    make train && python bench/main_job.py --run runs/latest --run runs/chat --note "..."
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def summarise(run: Path) -> dict:
    """The main job's figures from its run directory."""
    results = json.loads((run / "results.json").read_text())
    steps = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [s for s in steps if "loss" in s]
    if not steps:
        raise SystemExit(f"error: {run}/metrics.jsonl has no training steps")
    summary = {k: results.get(k) for k in ("method", "model", "steps", "precision",
                                           "prompt_format", "final_loss", "before", "after",
                                           "peak_rss_gib", "mean_tokens_per_s")}
    summary["train_seconds"] = sum(s["step_s"] for s in steps)
    if "sparse_rows_moved" in steps[0]:
        summary["store_rows_moved_first_last_step"] = [steps[0]["sparse_rows_moved"],
                                                       steps[-1]["sparse_rows_moved"]]
        summary["sparse_cpu_adam_s_mean"] = statistics.fmean(
            s["sparse_cpu_adam_s"] for s in steps)
    summary["lr_first_steps"] = [s["lr"] for s in steps[:3]]
    return summary


def plot(runs: dict[str, dict], path: Path) -> None:
    """Bars of exact match before/after training, per prompt format and question set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, before, after = [], [], []
    for fmt, run in runs.items():
        for name, res in run["after"].items():
            labels.append(f"{fmt}\n{name}")
            before.append(100 * (run["before"] or {}).get(name, {}).get("score", 0.0))
            after.append(100 * res["score"])
    xs = range(len(labels))
    fig, ax = plt.subplots(figsize=(1.6 * len(labels) + 2, 3.2))
    ax.bar([x - 0.2 for x in xs], before, 0.4, label="before")
    ax.bar([x + 0.2 for x in xs], after, 0.4, label="after")
    ax.set_xticks(list(xs), labels)
    ax.set_ylabel("exact match (%)")
    ax.set_title("main job (make train) by prompt format")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", action="append",
                        help="run directory (repeat: one per prompt format; default "
                        "runs/latest)")
    parser.add_argument("--command", default="make train = deepspeed launch/train.py "
                        "--deepspeed ds_configs/24gb.json (the config's values; without CUDA "
                        "its when_no_cuda block: 160 steps, 64 questions)")
    parser.add_argument("--note", default="", help="how the machine was loaded during the run")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "main_job_cpu.json"))
    args = parser.parse_args()
    runs = {}
    for run in map(Path, args.run or [str(ROOT / "runs" / "latest")]):
        if not (run / "results.json").is_file():
            parser.error(f"{run} holds no finished run (no results.json)")
        summary = summarise(run)
        runs[summary["prompt_format"] or "plain"] = summary
    report = {"runs": runs, "machine": platform.machine(), "command": args.command,
              "note": args.note}
    Path(args.out).write_text(json.dumps(report, indent=1))
    plot(runs, Path(args.out).with_suffix(".png"))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
