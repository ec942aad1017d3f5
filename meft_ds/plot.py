"""``launch/plot.py RUN_DIR``: a PNG of a training run's curves from its ``metrics.jsonl``
(and ``results.json``, where the run finished)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from meft_ds.errors import OneLineArgumentParser, UserError, cli_message

# (metrics.jsonl key, panel title, scale): every run has the first four
PANELS = (
    ("loss", "loss", 1.0),
    ("lr", "learning rate", 1.0),
    ("grad_norm", "grad norm", 1.0),
    ("tokens_per_s", "tokens/s (all ranks)", 1.0),
    ("periodic_eval", "evaluation score (%)", 100.0),
    ("sparse_rows_moved", "sparse rows moved per step", 1.0),
    ("saved_activation_bytes", "saved activations (MiB)", 1.0 / 2**20),
)
EVAL_KEY = "periodic_eval"


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The run's metric records (a line cut short by a crash is left out)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"{run_dir} has no metrics.jsonl: give a training run's --output_dir")
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
    if not records:
        raise UserError(f"{path} holds no metrics")
    return records


def read_results(run_dir: Path) -> dict[str, Any]:
    """``results.json`` of a finished run ({} where there is none or it is unreadable)."""
    try:
        results = json.loads((run_dir / "results.json").read_text())
    except (OSError, ValueError):
        return {}
    return results if isinstance(results, dict) else {}


def _series(records: list[dict[str, Any]], key: str, scale: float) -> tuple[list, list]:
    points = [(r["step"], scale * r[key]) for r in records
              if isinstance(r.get(key), int | float) and not isinstance(r.get(key), bool)]
    return [p[0] for p in points], [p[1] for p in points]


def _title(run_dir: Path, results: dict[str, Any]) -> str:
    if not results:
        return str(run_dir)
    head = (f"{results.get('method')} on {results.get('model')}, "
            f"{results.get('precision', '?')}, {results.get('steps')} steps")
    before = results.get("before") or {}
    scores = [f"{name} {res['metric']} "
              + (f"{100 * before[name]['score']:.1f}% -> " if name in before else "")
              + f"{100 * res['score']:.1f}%"
              for name, res in (results.get("after") or {}).items()]
    return "\n".join([head, "; ".join(scores)] if scores else [head])


def plot_run(run_dir: Path, out: Path) -> Path:
    """Write the curves of ``run_dir`` to ``out``; returns ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    records, results = read_metrics(run_dir), read_results(run_dir)
    scored = {name: res for name, res in (results.get("after") or {}).items()
              if isinstance(res, dict) and "score" in res}
    panels = [(key, title, scale) for key, title, scale in PANELS
              if _series(records, key, scale)[0] or (key == EVAL_KEY and scored)]
    cols = 2
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(11, 3.2 * rows), squeeze=False)
    last = max(r["step"] for r in records)
    for ax, (key, title, scale) in zip(axes.flat, panels):
        steps, values = _series(records, key, scale)
        if steps:
            ax.plot(steps, values, marker="." if len(steps) < 50 else None,
                    label="periodic, trained questions")
        if key == EVAL_KEY:  # the final evaluation's scores (results.json)
            for name, res in scored.items():
                ax.scatter([last], [100 * res["score"]], marker="*", s=90, zorder=3,
                           label=f"{name}, after training (n={res['n']})")
            ax.set_ylim(-3, 103)
            ax.legend(fontsize=8)
        if key in ("lr", "grad_norm") and values and min(values) > 0:
            ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(_title(run_dir, results), fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def build_parser() -> argparse.ArgumentParser:
    """Flags of the plotter."""
    p = OneLineArgumentParser(prog="launch/plot.py",
                              description="Plot a training run's curves (metrics.jsonl).")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a training run's --output_dir")
    p.add_argument("--out", default=None, help="PNG to write (default: RUN_DIR/curves.png)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point; user errors exit 2 with one line."""
    args = build_parser().parse_args(argv)
    run_dir = Path(args.run_dir)
    out = Path(args.out) if args.out else run_dir / "curves.png"
    try:
        if not run_dir.is_dir():
            raise UserError(f"{run_dir} is not a directory")
        plot_run(run_dir, out)
    except UserError as exc:
        print(f"error: {cli_message(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: cannot write {out}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0
