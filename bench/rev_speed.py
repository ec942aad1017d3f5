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

Beside the times, the matmul + attention FLOPs of one step of each config are counted at
the dispatcher (:mod:`bench.flops`, device-independent): their ratio to
``parallel_adapter`` is the floor of the time ratio for a matmul-bound step. It is also
counted at the LLaMA-7B shape (``--flops-model``): models of 1 and 2 layers with random
weights, extrapolated linearly to the real depth.

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
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.flops import FlopCounter  # noqa: E402
from bench.rev_memory import build  # noqa: E402
from meft_ds import methods, options  # noqa: E402
from meft_ds.models import loader  # noqa: E402
from meft_ds.reversible.streams import LatticeStreams  # noqa: E402

CONFIGS: dict[str, tuple[str, dict]] = {
    "parallel_adapter": ("parallel_adapter", {"adapter_size": 64}),
    "meft1": ("reversible", {"rev_variant": "meft1"}),
    "meft2": ("reversible", {"rev_variant": "meft2"}),
    "meft3": ("reversible", {"rev_variant": "meft3"}),
    "meft1_autograd": ("reversible", {"rev_variant": "meft1", "rev_backward": "autograd"}),
    # The exact streams' arithmetic as compiled kernels or as eager ops (unset, the first on
    # CUDA, the second on CPU: only the other one is in the default list of each device).
    "meft1_fused": ("reversible", {"rev_variant": "meft1", "rev_fused": True}),
    "meft1_eager": ("reversible", {"rev_variant": "meft1", "rev_fused": False}),
    # Float streams instead of the exact fixed point (restart points bound their error).
    "meft1_float64": ("reversible", {"rev_variant": "meft1", "rev_exact": False}),
    "meft1_fp32_streams": ("reversible", {"rev_variant": "meft1", "rev_stream_dtype": "fp32"}),
    # The top layers keep their activations (plain autograd): recompute traded for memory.
    "meft1_keep2": ("reversible", {"rev_variant": "meft1", "rev_keep_top": 2}),
    "meft1_keep4": ("reversible", {"rev_variant": "meft1", "rev_keep_top": 4}),
}
REFERENCE = "parallel_adapter"


class Runner:
    """One config: the method's module, its optimizer, and one timed training step."""

    def __init__(self, base: torch.nn.Module, name: str, extra: dict,
                 device: torch.device | str = "cpu") -> None:
        cls = methods.get(name)
        self.method = cls(options.build(cls.Options, extra), base.config)
        # Adapters in the weights' dtype, as the DeepSpeed engine casts them in bf16 mode.
        self.module = self.method.apply(copy.deepcopy(base)).to(base.dtype).to(device).train()
        params = [p for p in self.module.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=1e-4)
        self.cuda = torch.device(device).type == "cuda"
        self.peak_extra: list[int] = []  # CUDA: step's peak bytes above what was resident

    def step(self, ids: torch.Tensor) -> float:
        """Seconds of one forward + backward + optimizer step."""
        if self.cuda:
            torch.cuda.synchronize()
            resident = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        logits = self.method.forward(self.module, ids, torch.ones_like(ids))
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        if self.cuda:
            torch.cuda.synchronize()
            self.peak_extra.append(torch.cuda.max_memory_allocated() - resident)
        return time.perf_counter() - start

    def inexact_backwards(self) -> int:
        """Backwards whose recompute did not reproduce the forward (exact streams)."""
        return int(self.method.step_metrics().get("rev_inexact_backwards", 0))

    def flops(self, ids: torch.Tensor) -> FlopCounter:
        """FLOPs of one (untimed) step."""
        with FlopCounter() as counter:
            self.step(ids)
        return counter


def random_ids(vocab: int, batch: int, seq: int) -> torch.Tensor:
    """The token ids every config steps on (seeded)."""
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))


def flop_ratios(counts: dict[str, float]) -> dict[str, float]:
    return {k: v / counts[REFERENCE] for k, v in counts.items()}


def count_flops(base: torch.nn.Module, names: list[str], ids: torch.Tensor) -> dict:
    """Per-config FLOPs of one step (matmul + attention), built one config at a time."""
    out = {}
    for name in names:
        counter = Runner(base, *CONFIGS[name]).flops(ids)
        out[name] = {"total": counter.total, **counter.counts, "calls": dict(counter.calls)}
    return out


def flops_at_shape(spec: str, names: list[str], seq: int, batch: int) -> dict:
    """FLOPs per step at ``spec``'s real depth, extrapolated from 1- and 2-layer models."""
    depth = loader.model_config(spec).num_hidden_layers
    ids = random_ids(loader.model_config(spec).vocab_size, batch, seq)
    per = {n: count_flops(build(spec, n, torch.float32), names, ids) for n in (1, 2)}
    totals = {k: per[1][k]["total"] + (depth - 1) * (per[2][k]["total"] - per[1][k]["total"])
              for k in names}
    return {"model": spec, "depth": depth, "seq": seq, "batch": batch,
            "measured_layers": [1, 2], "total": totals, "ratio_to_parallel_adapter":
            flop_ratios(totals)}


def stream_arithmetic(shape: tuple[int, ...] = (4, 128, 576)) -> dict:
    """Ops run and bytes written per element by one centred λ = 1/10 coupling of the exact
    streams and its inverse: the eager ops (counted at the dispatcher) against the fused
    kernels (one compiled call each, writing only their outputs)."""
    a = LatticeStreams().quantize(torch.randn(shape, dtype=torch.float64))
    base = LatticeStreams().quantize(torch.randn(shape, dtype=torch.float64))
    value = torch.randn(shape, dtype=torch.float64)
    eager = LatticeStreams(fused=False)
    scale = eager.scale(0.1)
    with FlopCounter() as counter:
        y, aux = eager.couple(scale, a, value, base)
        eager.uncouple(scale, y, value, aux, base)
    n = a.numel()
    fused_out = y.element_size() + aux.numel() * aux.element_size() / n + a.element_size()
    return {"shape": list(shape), "eager": {"ops": counter.calls["other"],
                                            "bytes_written_per_element":
                                            counter.counts["other_bytes"] / n},
            "fused": {"compiled_calls": 2, "bytes_written_per_element": fused_out}}


def measure(dtype: torch.dtype, args: argparse.Namespace) -> tuple[dict, dict, dict]:
    """Per-config step times, interleaved over ``args.reps`` repetitions (after warm-up),
    on CUDA each config's peak step memory above its resident weights (GiB), and each
    config's count of inexact backwards (must be 0)."""
    device = torch.device(args.device)
    base = loader.load_model(args.model, dtype=dtype, device=device).model
    ids = random_ids(base.config.vocab_size, args.batch, args.seq).to(device)
    runners = {k: Runner(base, *CONFIGS[k], device=device) for k in args.configs.split(",")}
    del base
    times: dict[str, list[float]] = {k: [] for k in runners}
    for rep in range(args.warmup + args.reps):
        for name, runner in runners.items():
            seconds = runner.step(ids)
            if rep >= args.warmup:
                times[name].append(seconds)
        print(dtype, rep, {k: round(v[-1], 3) for k, v in times.items() if v}, flush=True)
    peaks = {k: max(r.peak_extra) / 2**30 for k, r in runners.items() if r.peak_extra}
    return times, peaks, {k: r.inexact_backwards() for k, r in runners.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--configs", default="",
                        help="comma-separated (default: all but the one meft1 already is)")
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--flops-model", default="llama2-7b-shape",
                        help="also count FLOPs at this shape (1 and 2 layers, extrapolated); "
                             "empty to skip")
    parser.add_argument("--flops-seq", type=int, default=256)
    parser.add_argument("--no-flops", action="store_true", help="skip all FLOP counting")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (adds peak memory and "
                        "tokens/s per config)")
    parser.add_argument("--name", default="rev_speed", help="stem of the JSON and plot")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--plot-only", action="store_true",
                        help="redraw the plot from the existing rev_speed.json")
    args = parser.parse_args()
    if args.plot_only:
        path = Path(args.out) / f"{args.name}.json"
        plot(json.loads(path.read_text()), path.with_suffix(".png"))
        return
    torch.manual_seed(0)
    same_as_meft1 = "meft1_fused" if args.device.startswith("cuda") else "meft1_eager"
    args.configs = args.configs or ",".join(k for k in CONFIGS if k != same_as_meft1)
    names = args.configs.split(",")
    flops = flops_ratio = bytes_ratio = shape = None
    if not args.no_flops:
        ids = random_ids(loader.model_config(args.model).vocab_size, args.batch, args.seq)
        flops = count_flops(loader.load_model(args.model).model, names, ids)
        flops_ratio = flop_ratios({k: v["total"] for k, v in flops.items()})
        bytes_ratio = flop_ratios({k: v["other_bytes"] for k, v in flops.items()})
        print("flops / parallel_adapter", json.dumps(flops_ratio), flush=True)
        print("other ops' bytes / parallel_adapter", json.dumps(bytes_ratio), flush=True)
        if args.flops_model:
            shape = flops_at_shape(args.flops_model, [REFERENCE, "meft1", "meft2", "meft3"],
                                   args.flops_seq, 1)
            print(args.flops_model, json.dumps(shape["ratio_to_parallel_adapter"]), flush=True)
    results = {}
    for label in args.dtypes.split(","):
        times, peaks, inexact = measure(
            {"fp32": torch.float32, "bf16": torch.bfloat16}[label], args)
        ref = statistics.median(times[REFERENCE])
        results[label] = {
            **({"step_peak_gib_above_weights": peaks, "tokens_per_s": {
                k: args.batch * args.seq / statistics.median(v) for k, v in times.items()}}
               if peaks else {}),
            "ratio_to_parallel_adapter": {k: statistics.median(v) / ref for k, v in times.items()},
            "ratio_min_to_min": {k: min(v) / min(times[REFERENCE]) for k, v in times.items()},
            "seconds": times,
            "inexact_backwards": inexact,
        }
        print(label, json.dumps(results[label]["ratio_to_parallel_adapter"]), flush=True)
    report = {
        "benchmark": "reversible_step_time_ratio",
        "machine": platform.machine(), "python": platform.python_version(),
        "device": (torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "config": {"model": args.model, "seq": args.seq, "batch": args.batch,
                   "reps": args.reps, "warmup": args.warmup,
                   "configs": {k: CONFIGS[k] for k in names},
                   "step": "forward + backward + torch AdamW step, interleaved per repetition",
                   "reversible": "fp64 exact streams unless the config says otherwise, all "
                                 "layers, adapters of width 64"},
        "target": "ratio <= 1.4",
        "flops": None if flops is None else {
            "per_step": flops, "ratio_to_parallel_adapter": flops_ratio,
            "other_bytes_ratio_to_parallel_adapter": bytes_ratio,
            "counted": "matmul (mm/addmm/bmm) + attention kernels, fp32, one step; "
                       "other_bytes: output bytes of every other op (casts, elementwise); "
                       "under the counter's dispatch mode compiled code runs op by op, so "
                       "meft1_fused's other_bytes are those of its traced ops, not of its "
                       "fused kernels",
            "at_shape": shape},
        "stream_arithmetic": stream_arithmetic(),
        "results": results,
        "meets_target": {d: {k: v <= 1.4 for k, v in r["ratio_to_parallel_adapter"].items()}
                         for d, r in results.items()},
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(report, indent=2))
    plot(report, out / f"{args.name}.png")
    bad = {d: {k: n for k, n in r["inexact_backwards"].items() if n}
           for d, r in results.items()}
    if any(bad.values()):  # exact streams whose recompute differed: the gradients are off
        raise SystemExit(f"error: inexact reversible backwards {bad}: the recompute did not "
                         "reproduce the forward bit for bit")


def plot(report: dict, path: Path) -> None:
    """Bars of the time ratios per precision, the FLOP floor as black ticks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results, flops = report["results"], report["flops"] or {}
    flops_ratio, shape = flops.get("ratio_to_parallel_adapter"), flops.get("at_shape")
    fig, ax = plt.subplots(figsize=(9, 4.4))
    names = list(next(iter(results.values()))["ratio_to_parallel_adapter"])
    width = 0.8 / len(results)
    for i, (label, res) in enumerate(results.items()):
        xs = [j + i * width for j in range(len(names))]
        ax.bar(xs, [res["ratio_to_parallel_adapter"][n] for n in names], width, label=label)
    ax.axhline(1.4, color="red", ls="--", lw=1, label="target 1.4x")
    centers = [j + width * (len(results) - 1) / 2 for j in range(len(names))]
    if flops_ratio:
        ax.plot(centers, [flops_ratio[n] for n in names], "k_", markersize=22, mew=2,
                label="matmul + attention FLOPs / parallel_adapter")
    if flops.get("other_bytes_ratio_to_parallel_adapter"):
        ratios = [f"{k} {v:.1f}" for k, v in flops["other_bytes_ratio_to_parallel_adapter"].items()
                  if k not in (REFERENCE, "meft1_fused")]  # compiled code is not seen op by op
        text = "bytes written outside matmuls / parallel_adapter (fp32): " + ", ".join(ratios)
        ax.text(0.01, 0.91, "\n".join(textwrap.wrap(text, 130)), transform=ax.transAxes,
                va="top", fontsize=7)
    if shape:
        head = f"FLOPs / parallel_adapter at {shape['model']} (seq {shape['seq']}): "
        ax.text(0.01, 0.97, head + ", ".join(
            f"{k} {v:.2f}" for k, v in shape["ratio_to_parallel_adapter"].items()
            if k != REFERENCE), transform=ax.transAxes, va="top", fontsize=7)
    ax.set_xticks(centers, names, rotation=20, ha="right")
    ax.set_ylabel("step time / parallel_adapter (median)")
    cfg = report["config"]
    where = report.get("device", "cpu")
    ax.set_title(f"{cfg['model']}, seq {cfg['seq']}, batch {cfg['batch']}, {where}, side by side")
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)

if __name__ == "__main__":
    main()
