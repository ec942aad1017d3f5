"""Why the sparse adapter learns what it learns: its row-usage figures over training,
beside the loss and exact match, for several runs (configurations) side by side.

Reads run directories of ``launch/train.py --method sparse --sparse_diagnostics N`` (for
instance the knowledge study's, ``runs/knowledge/<config>/n<N>_lr<lr>``; LoRA runs may be
given too, for their loss curve) and writes ``bench/results/sparse_diagnostics.{json,png}``:
per run the EM on trained and held-out questions, the loss per window of steps, and the
usage figures of :mod:`meft_ds.sparse.diagnostics` at each report (mean over layers; the
per-layer lists of the last report), with how often gradient clipping fired and the row
store's share of the squared gradient norm.

    .venv/bin/python bench/sparse_diagnostics.py --run paper=runs/a --run lora=runs/b
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIGURES = ("distinct_rows", "row_entropy", "top1pct_share", "expert_entropy", "experts_used",
           "updated_rows", "update_top1pct_share", "selection_kept", "gate_mean", "gate_std",
           "key_norm_all_mean", "key_norm_updated_max", "value_norm_updated_mean",
           "value_norm_updated_max")


def summarise(run: Path, window: int = 16) -> dict:
    """One run's curves and figures (see the module docstring)."""
    steps = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [s for s in steps if "loss" in s]
    if not steps:
        raise SystemExit(f"error: {run}/metrics.jsonl has no training steps")
    results = json.loads((run / "results.json").read_text()) \
        if (run / "results.json").is_file() else {}
    after = results.get("after") or {}
    out: dict = {
        "run": str(run), "method": results.get("method"), "steps": len(steps),
        "trained_em": (after.get("trained") or {}).get("score"),
        "heldout_em": (after.get("heldout") or {}).get("score"),
        "final_loss": steps[-1]["loss"],
        "loss_windows": [sum(s["loss"] for s in steps[i : i + window])
                         / len(steps[i : i + window]) for i in range(0, len(steps), window)],
        "window": window,
    }
    reports = [s for s in steps if "sparse_usage_row_entropy" in s]
    if reports:
        out["usage"] = [{"step": s["step"], **{k: s.get(f"sparse_usage_{k}") for k in FIGURES}}
                        for s in reports]
        out["usage_layers_last"] = reports[-1]["sparse_usage_layers"]
    if "sparse_clip_coef" in steps[0]:
        out["clip_fired_share"] = sum(s["sparse_clip_coef"] < 1.0 for s in steps) / len(steps)
        out["store_grad_sq_share"] = sum(
            min(1.0, s["sparse_store_grad_norm"] ** 2 / max(s["grad_norm"] ** 2, 1e-30))
            for s in steps) / len(steps)
    return out


def plot(runs: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("loss", None), ("row_entropy", "row usage entropy (1 = uniform)"),
              ("top1pct_share", "share of selections on the top 1% rows"),
              ("experts_used", "experts picked in the window"),
              ("selection_kept", "probe tokens' top-K rows kept since the last report"),
              ("value_norm_updated_mean", "mean value norm (updated rows)")]
    window = next(iter(runs.values()))["window"]
    fig, axes = plt.subplots(2, 3, figsize=(14, 7))
    colour = {label: f"C{i}" for i, label in enumerate(runs)}  # one colour per run
    for ax, (key, title) in zip(axes.flat, panels):
        for label, run in runs.items():
            if key == "loss":
                w, em = run["window"], run["trained_em"]
                tag = f" (EM {100 * em:.0f}%)" if em is not None else ""
                ax.plot([w * (i + 1) for i in range(len(run["loss_windows"]))],
                        run["loss_windows"], label=label + tag, color=colour[label])
            elif "usage" in run and run["usage"][0][key] is not None:
                ax.plot([u["step"] for u in run["usage"]], [u[key] for u in run["usage"]],
                        "o-", label=label, color=colour[label])
        ax.set_title(title or f"training loss (mean of {window} steps)", fontsize=9)
        ax.set_xlabel("step")
    axes.flat[0].legend(fontsize=7)
    axes.flat[1].legend(fontsize=7)
    axes.flat[4].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", action="append", required=True, metavar="LABEL=DIR")
    parser.add_argument("--note", default="", help="what the runs are and what they show")
    parser.add_argument("--out",
                        default=str(ROOT / "bench" / "results" / "sparse_diagnostics.json"))
    args = parser.parse_args()
    runs = {}
    for item in args.run:
        label, _, directory = item.partition("=")
        if not directory or not (Path(directory) / "metrics.jsonl").is_file():
            parser.error(f"--run {item!r}: give LABEL=DIR with DIR a run directory")
        runs[label] = summarise(Path(directory))
    Path(args.out).write_text(json.dumps({"note": args.note, "runs": runs}, indent=1))
    plot(runs, Path(args.out).with_suffix(".png"))
    for label, run in runs.items():
        em = "-" if run["trained_em"] is None else f"{100 * run['trained_em']:.1f}%"
        print(f"{label:<24} trained EM {em:>6}  final loss {run['final_loss']:.3f}")


if __name__ == "__main__":
    main()
