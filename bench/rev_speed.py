"""Training-step time of reversible MEFT1/2/3 over ``parallel_adapter`` (standard autograd).

All configs are built once and timed side by side: every repetition times one step
(forward, backward, AdamW step) of each config in turn, so machine load hits all of them
alike; the ratio of medians to ``parallel_adapter`` is reported (absolute times of this
CPU mean nothing elsewhere). Two precisions: fp32 weights, and bf16 weights (MEFT then
computes F/G in bf16 with fp64 streams; the parallel adapter runs in bf16). Adapters of
width 64 everywhere; ``meft1_autograd`` is the same two-stream network with stored
activations, separating the cost of the two-stream structure from the recomputation;
``meft1_float64`` / ``meft1_fp32_streams`` use plain float streams (fp64 without the exact
fixed point, or fp32) with restart points, separating the cost of exactness.

    python bench/rev_speed.py [--seq 128 --batch 4 --reps 5]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from meft_ds import methods, options  # noqa: E402
from meft_ds.models import loader  # noqa: E402

CONFIGS: dict[str, tuple[str, dict]] = {
    "parallel_adapter": ("parallel_adapter", {"adapter_size": 64}),
    "meft1": ("reversible", {"rev_variant": "meft1"}),
    "meft2": ("reversible", {"rev_variant": "meft2"}),
    "meft3": ("reversible", {"rev_variant": "meft3"}),
    "meft1_autograd": ("reversible", {"rev_variant": "meft1", "rev_backward": "autograd"}),
    # Float streams instead of the exact fixed point (restart points bound their error).
    "meft1_float64": ("reversible", {"rev_variant": "meft1", "rev_exact": False}),
    "meft1_fp32_streams": ("reversible", {"rev_variant": "meft1", "rev_stream_dtype": "fp32"}),
}
REFERENCE = "parallel_adapter"


class Runner:
    """One config: the method's module, its optimizer, and one timed training step."""

    def __init__(self, base: torch.nn.Module, name: str, extra: dict) -> None:
        cls = methods.get(name)
        self.method = cls(options.build(cls.Options, extra), base.config)
        # Adapters in the weights' dtype, as the DeepSpeed engine casts them in bf16 mode.
        self.module = self.method.apply(copy.deepcopy(base)).to(base.dtype).train()
        params = [p for p in self.module.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=1e-4)

    def step(self, ids: torch.Tensor) -> float:
        """Seconds of one forward + backward + optimizer step."""
        start = time.perf_counter()
        logits = self.method.forward(self.module, ids, torch.ones_like(ids))
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return time.perf_counter() - start


def measure(dtype: torch.dtype, args: argparse.Namespace) -> dict[str, list[float]]:
    """Per-config step times, interleaved over ``args.reps`` repetitions (after warm-up)."""
    base = loader.load_model(args.model, dtype=dtype).model
    ids = torch.randint(0, base.config.vocab_size, (args.batch, args.seq),
                        generator=torch.Generator().manual_seed(0))
    runners = {k: Runner(base, *CONFIGS[k]) for k in args.configs.split(",")}
    del base
    times: dict[str, list[float]] = {k: [] for k in runners}
    for rep in range(args.warmup + args.reps):
        for name, runner in runners.items():
            seconds = runner.step(ids)
            if rep >= args.warmup:
                times[name].append(seconds)
        print(dtype, rep, {k: round(v[-1], 3) for k, v in times.items() if v}, flush=True)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args()
    torch.manual_seed(0)
    results = {}
    for label in args.dtypes.split(","):
        times = measure({"fp32": torch.float32, "bf16": torch.bfloat16}[label], args)
        ref = statistics.median(times[REFERENCE])
        results[label] = {
            "ratio_to_parallel_adapter": {k: statistics.median(v) / ref for k, v in times.items()},
            "ratio_min_to_min": {k: min(v) / min(times[REFERENCE]) for k, v in times.items()},
            "seconds": times,
        }
        print(label, json.dumps(results[label]["ratio_to_parallel_adapter"]), flush=True)
    report = {
        "benchmark": "reversible_step_time_ratio",
        "machine": platform.machine(), "python": platform.python_version(),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "config": {"model": args.model, "seq": args.seq, "batch": args.batch,
                   "reps": args.reps, "warmup": args.warmup, "configs": CONFIGS,
                   "step": "forward + backward + torch AdamW step, interleaved per repetition",
                   "reversible": "fp64 exact streams unless the config says otherwise, all "
                                 "layers, adapters of width 64"},
        "target": "ratio <= 1.4",
        "results": results,
        "meets_target": {d: {k: v <= 1.4 for k, v in r["ratio_to_parallel_adapter"].items()}
                         for d, r in results.items()},
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "rev_speed.json").write_text(json.dumps(report, indent=2))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    names = list(next(iter(results.values()))["ratio_to_parallel_adapter"])
    width = 0.8 / len(results)
    for i, (label, res) in enumerate(results.items()):
        xs = [j + i * width for j in range(len(names))]
        ax.bar(xs, [res["ratio_to_parallel_adapter"][n] for n in names], width, label=label)
    ax.axhline(1.4, color="red", ls="--", lw=1, label="target 1.4x")
    ax.set_xticks([j + width * (len(results) - 1) / 2 for j in range(len(names))], names)
    ax.set_ylabel("step time / parallel_adapter (median)")
    ax.set_title(f"{args.model}, seq {args.seq}, batch {args.batch}, CPU, side by side")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "rev_speed.png", dpi=120)


if __name__ == "__main__":
    main()
