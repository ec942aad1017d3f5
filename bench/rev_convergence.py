"""Convergence of reversible MEFT1 against the same adapters trained without reversibility.

The fair comparison is the *same* two-stream network with the same adapters (width,
initialisation, data order, learning rate, seed) trained with plain autograd
(``--rev_backward autograd``): it differs from MEFT1 only in how the gradients are
obtained (stored activations vs inputs recomputed in backward), so any gap in the loss
curves comes from reversibility. A dense parallel adapter of the same width (the usual
adapter baseline, a different network) is a third curve for context. Each config is a
real launcher run (DeepSpeed engine, NQ-open, SmolLM2), one after another.

    python bench/rev_convergence.py [--steps 200 --seq 128 --batch 4]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MEFT_DS_DATA", str(ROOT.parent / "shared" / "data"))

import torch  # noqa: E402

from meft_ds import cli  # noqa: E402
from meft_ds.runner import run  # noqa: E402

CONFIGS: dict[str, list[str]] = {
    "meft1": ["--method", "reversible", "--rev_variant", "meft1"],
    "meft1_autograd": ["--method", "reversible", "--rev_variant", "meft1",
                       "--rev_backward", "autograd"],
    "parallel_adapter": ["--method", "parallel_adapter"],
}


def train(name: str, args: argparse.Namespace, out: Path) -> list[float]:
    """Per-step training losses of one launcher run."""
    size = ["--rev_adapter_size" if name.startswith("meft") else "--adapter_size",
            str(args.adapter_size)]
    argv = [
        "--deepspeed", str(ROOT / "ds_configs" / "cpu.json"), *CONFIGS[name], *size,
        "--max_steps", str(args.steps), "--train_examples", str(args.steps * args.batch),
        "--micro_batch_size", str(args.batch), "--max_seq_len", str(args.seq),
        "--lr", str(args.lr), "--eval_trained", "0", "--eval_heldout", "0",
        "--progress", "false", "--output_dir", str(out / name),
    ]
    run(cli.parse(argv))
    rows = [json.loads(x) for x in (out / name / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def summary(losses: list[float], window: int) -> dict[str, float]:
    """Mean and std of the loss over the first and the final ``window`` steps."""
    tail, head = losses[-window:], losses[:window]
    return {"first_window_mean": statistics.fmean(head),
            "final_window_mean": statistics.fmean(tail),
            "final_window_std": statistics.stdev(tail)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--adapter_size", type=int, default=64)
    parser.add_argument("--window", type=int, default=20)
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args()
    curves: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.configs.split(","):
            curves[name] = train(name, args, Path(tmp))
            print(name, json.dumps(summary(curves[name], args.window)), flush=True)
    stats = {k: summary(v, args.window) for k, v in curves.items()}
    ref = stats.get("meft1_autograd")
    report = {
        "benchmark": "reversible_convergence",
        "machine": platform.machine(), "python": platform.python_version(),
        "torch": torch.__version__,
        "config": {"model": "smollm2-135m", "dataset": "nq_open", "steps": args.steps,
                   "seq": args.seq, "batch": args.batch, "lr": args.lr,
                   "adapter_size": args.adapter_size, "window": args.window,
                   "engine": "DeepSpeed, ds_configs/cpu.json (fp32, ZeRO 0, AdamW, warmup+decay)",
                   "fair_baseline": "meft1_autograd: the same two-stream network and adapters, "
                                    "plain autograd instead of the reversible backward"},
        "losses": curves,
        "summary": stats,
    }
    if ref is not None and "meft1" in stats:
        gap = stats["meft1"]["final_window_mean"] - ref["final_window_mean"]
        report["meft1_minus_autograd_final_mean"] = gap
        report["within_noise"] = abs(gap) <= ref["final_window_std"]
        report["max_abs_step_difference"] = max(
            abs(a - b) for a, b in zip(curves["meft1"], curves["meft1_autograd"], strict=True))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "rev_convergence.json").write_text(json.dumps(report, indent=2))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    styles = {"meft1": "-", "meft1_autograd": "--", "parallel_adapter": ":"}
    for name, losses in curves.items():
        ax.plot(range(1, len(losses) + 1), losses, styles.get(name, "-"), label=name, lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(f"SmolLM2 on NQ-open, seq {args.seq}, batch {args.batch}, lr {args.lr}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "rev_convergence.png", dpi=120)
    print(json.dumps({k: v for k, v in report.items() if k not in ("losses",)}, indent=1))


if __name__ == "__main__":
    main()
