"""Baselines side by side: saved-activation bytes, RSS and step-time ratios.

Each configuration (full, lora, parallel_adapter, each with and without gradient
checkpointing) trains a few steps through the real launcher (DeepSpeed, cpu.json) in its
own process, one after the other in this run, on GSM8K prompts+answers truncated to
``--seq`` tokens. Saved-activation bytes exclude weights; step times are reported as
ratios to ``parallel_adapter`` (the first step, with warm-up costs, is dropped).

    python bench/bench_baselines.py --seq 256 --batch 4 --steps 4
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["full", "lora", "parallel_adapter"]


def run_one(
    method: str, ckpt: bool, args: argparse.Namespace, out: Path, extra: tuple[str, ...] = ()
) -> list[dict]:
    """Train ``args.steps`` steps in a fresh process (``extra``: more launcher flags);
    returns its metric records."""
    argv = [
        sys.executable, str(ROOT / "launch" / "train.py"), "--deepspeed",
        str(ROOT / "ds_configs" / "cpu.json"), "--method", method, "--dataset", "gsm8k",
        "--max_seq_len", str(args.seq), "--micro_batch_size", str(args.batch),
        "--max_steps", str(args.steps), "--train_examples", str(args.batch * args.steps),
        "--eval_trained", "0", "--eval_heldout", "0", "--progress", "false",
        "--lr", "1e-5", "--output_dir", str(out),
    ] + (["--gradient_checkpointing"] if ckpt else []) + list(extra)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"{method} failed:\n{proc.stderr[-2000:]}")
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--work", default="/tmp/meft_bench_baselines")
    args = parser.parse_args()
    rows = []
    for method in METHODS:
        for ckpt in (False, True):
            label = method + ("+ckpt" if ckpt else "")
            print(f"running {label} ...", flush=True)
            rec = run_one(method, ckpt, args, Path(args.work) / label)
            timed = rec[1:] or rec
            rows.append({
                "config": label,
                "saved_activation_bytes": max(r["saved_activation_bytes"] for r in rec),
                "peak_rss_gib": max(r["rss_gib"] for r in rec),
                "step_s_mean": sum(r["step_s"] for r in timed) / len(timed),
                "tokens_per_step": rec[-1]["tokens"],
            })
    ref = next(r for r in rows if r["config"] == "parallel_adapter")
    for r in rows:
        r["step_time_ratio_vs_parallel_adapter"] = r["step_s_mean"] / ref["step_s_mean"]
        r["saved_bytes_ratio_vs_parallel_adapter"] = (
            r["saved_activation_bytes"] / ref["saved_activation_bytes"]
        )
    import deepspeed
    import torch
    import transformers

    result = {
        "bench": "baselines", "model": "smollm2-135m", "seq": args.seq, "batch": args.batch,
        "steps": args.steps, "dataset": "gsm8k", "ds_config": "ds_configs/cpu.json (fp32, ZeRO-0)",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "processor": platform.processor()},
        "versions": {"torch": torch.__version__, "deepspeed": deepspeed.__version__,
                     "transformers": transformers.__version__},
        "note": "absolute step times are CPU times on this machine; compare only the ratios",
        "rows": rows,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"baselines_s{args.seq}_b{args.batch}"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2))
    plot(rows, out / f"{stem}.png", args)
    for r in rows:
        print(f"{r['config']:<24}{r['saved_activation_bytes'] / 2**20:>10.1f} MiB"
              f"{r['peak_rss_gib']:>8.2f} GiB{r['step_time_ratio_vs_parallel_adapter']:>8.2f}x")


def plot(rows: list[dict], path: Path, args: argparse.Namespace) -> None:
    """Bars of saved-activation MiB and step-time ratio per configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [r["config"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    series = [
        ([r["saved_activation_bytes"] / 2**20 for r in rows], "saved activations (MiB)"),
        ([r["peak_rss_gib"] for r in rows], "peak RSS (GiB)"),
        ([r["step_time_ratio_vs_parallel_adapter"] for r in rows], "step time / parallel_adapter"),
    ]
    for ax, (values, title) in zip(axes, series):
        ax.bar(labels, values, color="tab:blue")
        ax.set_title(title)
        ax.tick_params(axis="x", rotation=45)
    fig.suptitle(f"SmolLM2-135M, seq {args.seq}, batch {args.batch}, CPU, DeepSpeed ZeRO-0")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
