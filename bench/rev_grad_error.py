"""Gradient error of reversible MEFT1 against plain autograd, as a function of depth.

One run per setting on the full SmolLM2 stack: the adapter of the layer ``d`` layers
below the top has its inputs reconstructed through ``d`` inverses, so its gradient's
relative error against plain autograd through the same two-stream network is the error
of a ``d``-layer reversible stack. Settings: stream arithmetic (fp32 floats, fp64 floats,
fp64 exact fixed point), compute dtype (fp32, bf16), λ in {0.1, 0.5, 1}; no restart
points, dropout 0.1. Beside each curve, the largest relative error of any layer's
reconstructed inputs (0 for the exact streams wherever the recompute reproduces the
forward bit for bit, which is what a run on a new device checks).

    python bench/rev_grad_error.py [--seq 16 --batch 2]
    python bench/rev_grad_error.py --device cuda --model smollm2-135m-shape \
        --name rev_grad_error_gpu
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from meft_ds.models.loader import load_model  # noqa: E402
from meft_ds.reversible.model import ReversibleLM  # noqa: E402
from meft_ds.reversible.options import ReversibleOptions  # noqa: E402

STREAMS = {"fp32": ("fp32", False), "fp64": ("fp64", False), "fp64-exact": ("fp64", True)}


def grads(model: ReversibleLM, ids: torch.Tensor, reversible: bool) -> dict[str, torch.Tensor]:
    """Adapter gradients of a fixed loss (same dropout masks in every call)."""
    model.reversible = reversible
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1234)
    logits = model(ids)
    logits.float().log_softmax(-1)[:, :-1].gather(-1, ids[:, 1:, None]).mean().backward()
    return {n: p.grad.double().clone() for n, p in model.named_parameters() if p.grad is not None}


def per_depth(rev: dict, ref: dict, n_layers: int) -> list[float]:
    """Relative error of each layer's adapter gradients, ordered from the top layer down."""
    out = []
    for depth in range(1, n_layers + 1):
        i = n_layers - depth
        keys = [k for k in ref if k.startswith(f"rev_layers.{i}.")]
        num = sum((rev[k] - ref[k]).pow(2).sum() for k in keys)
        den = sum(ref[k].pow(2).sum() for k in keys)
        out.append(float((num / den).sqrt()) if den > 0 else float("nan"))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq", type=int, default=16)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--model", default="smollm2-135m",
                        help="smollm2-135m-shape: the same architecture, random weights")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--name", default="rev_grad_error", help="stem of the JSON and plot")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args()
    base = load_model(args.model, device=args.device).model
    n = base.config.num_hidden_layers
    ids = torch.randint(0, base.config.vocab_size, (args.batch, args.seq),
                        generator=torch.Generator().manual_seed(0)).to(args.device)
    curves: dict[str, list[float]] = {}
    reconstruction: dict[str, float] = {}
    for stream, (dtype, exact) in STREAMS.items():
        for compute in ("fp32", "bf16"):
            for lam in (0.1, 0.5, 1.0):
                opts = ReversibleOptions(
                    rev_variant="meft1", rev_lambda=lam, rev_stream_dtype=dtype, rev_exact=exact,
                    rev_compute_dtype=compute, rev_restart_every=0, rev_adapter_dropout=0.1,
                    rev_adapter_size=16,
                )
                model = ReversibleLM(copy.deepcopy(base), opts).to(args.device).train()
                model.record_errors = True
                gen = torch.Generator().manual_seed(1)
                with torch.no_grad():
                    for name, p in model.named_parameters():
                        if p.requires_grad and name.endswith("up.weight"):
                            p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
                try:
                    rev = grads(model, ids, True)
                    worst = max(model.last_run.errors.values())
                    ref = grads(model, ids, False)
                    curve = per_depth(rev, ref, n)
                except FloatingPointError:
                    curve, worst = [float("nan")] * n, float("nan")
                label = f"{stream} streams, {compute} compute, λ={lam}"
                curves[label] = curve
                reconstruction[label] = worst
                print(f"{label:40s} d=1 {curve[0]:.1e} d=8 {curve[7]:.1e} d={n} {curve[-1]:.1e}"
                      f" inputs {worst:.1e}", flush=True)
    report = {
        "benchmark": "reversible_gradient_error_vs_depth",
        "machine": platform.machine(), "python": platform.python_version(),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "config": {"model": args.model, "variant": "meft1", "seq": args.seq,
                   "batch": args.batch, "restart_points": "none", "dropout": 0.1,
                   "depth": "layers reconstructed through (1 = top layer)"},
        "relative_error": curves,
        "max_input_reconstruction_error": reconstruction,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(report, indent=2))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4), sharey=True)
    for ax, stream in zip(axes, STREAMS, strict=True):
        for label, curve in curves.items():
            if label.startswith(f"{stream} "):
                ys = [max(v, 1e-18) for v in curve]
                ax.semilogy(range(1, n + 1), ys, label=label.split(", ", 1)[1])
        ax.axhline(1e-5, color="k", lw=0.5, ls="--")
        ax.set_title(f"{stream} streams")
        ax.set_xlabel("reversible layers below the top")
    axes[0].set_ylabel("adapter gradient relative error (floor 1e-18 = exact)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / f"{args.name}.png", dpi=120)


if __name__ == "__main__":
    main()
