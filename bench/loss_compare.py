"""Is one run's loss really lower than another's? Paired window means of training losses.

Runs of the launcher with the same data, seed and micro-batch see the same micro-batch at
every step, so most of the step-to-step noise of their losses (which facts the batch
holds) is shared. Over a window of steps this reports each run's mean loss and its
difference from a reference run with the difference's standard error over the steps
(paired: ``sd(loss_run - loss_ref) / sqrt(steps)``), next to the unpaired standard error
of one run's window mean, which is what a comparison across different data would face.
Runs whose per-step token counts differ did not see the same batches and are refused.
Where every run directory holds ``predictions.json`` (the launcher's scored answers), the
report adds exact match on the trained questions, paired the same way: the questions only
one of two runs answers, and McNemar's exact two-sided p over them.

    .venv/bin/python bench/loss_compare.py --runs token=runs/a context=runs/b \\
        --windows 129-256 769-896 --name loss_compare_route
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SMOOTH = 32  # steps in the plot's moving average


def losses(run: Path) -> tuple[list[float], list[int]]:
    """``(loss, tokens)`` of every optimizer step in ``run/metrics.jsonl``, in step order."""
    path = run / "metrics.jsonl"
    if not path.is_file():
        raise SystemExit(f"error: {path} not found (a run directory of launch/train.py?)")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    by_step = {r["step"]: r for r in rows if "loss" in r}  # a resumed run logs steps again
    steps = sorted(by_step)
    return [by_step[s]["loss"] for s in steps], [by_step[s].get("tokens", -1) for s in steps]


def _mean_sd(xs: list[float]) -> tuple[float, float]:
    mean = sum(xs) / len(xs)
    return mean, math.sqrt(sum((x - mean) ** 2 for x in xs) / len(xs))


def compare(curves: dict[str, tuple[list[float], list[int]]], reference: str,
            windows: list[tuple[int, int]]) -> dict:
    """Per window ``(first, last)`` (1-based steps, inclusive): each run's mean loss and
    unpaired SE; for every other run, its mean difference from ``reference`` and the
    paired SE. Raises SystemExit where a run is too short or saw other batches."""
    ref_loss, ref_tokens = curves[reference]
    out: dict = {"reference": reference, "windows": []}
    for first, last in windows:
        if not 1 <= first <= last:
            raise SystemExit(f"error: window {first}-{last}: need 1 <= first <= last")
        entry: dict = {"first": first, "last": last, "runs": {}}
        for name, (loss, tokens) in curves.items():
            if len(loss) < last:
                raise SystemExit(f"error: run {name!r} has {len(loss)} steps, window ends "
                                 f"at {last}")
            if tokens[first - 1 : last] != ref_tokens[first - 1 : last]:
                raise SystemExit(f"error: run {name!r} saw other micro-batches than "
                                 f"{reference!r} (token counts differ): not a paired "
                                 "comparison")
            mean, sd = _mean_sd(loss[first - 1 : last])
            row = {"mean": mean, "se": sd / math.sqrt(last - first + 1)}
            if name != reference:
                diff, dsd = _mean_sd([a - b for a, b in zip(loss[first - 1 : last],
                                                            ref_loss[first - 1 : last])])
                row |= {"minus_reference": diff,
                        "paired_se": dsd / math.sqrt(last - first + 1)}
            entry["runs"][name] = row
        out["windows"].append(entry)
    return out


def answers(run: Path, split: str = "trained") -> list[tuple[str, bool]] | None:
    """``(question, answered exactly)`` in scoring order from ``run/predictions.json``; None
    without one. A list, not a dict: a question asked twice still counts twice."""
    path = run / "predictions.json"
    if not path.is_file():
        return None
    return [(p["question"], bool(p["ok"]))
            for p in json.loads(path.read_text())[split]["predictions"]]


def mcnemar_p(only_a: int, only_b: int) -> float:
    """Exact two-sided McNemar p: under no difference each discordant question is a fair
    coin, so ``min(only_a, only_b)`` is Binomial(only_a + only_b, 1/2) at its lower tail."""
    n = only_a + only_b
    tail = sum(math.comb(n, i) for i in range(min(only_a, only_b) + 1)) / 2**n
    return min(1.0, 2 * tail)


def compare_answers(scored: dict[str, list[tuple[str, bool]]], reference: str) -> dict:
    """Each run's exact match (and its binomial SE) and, against ``reference``, the
    questions only one of them answers. Raises SystemExit where runs scored other
    questions or another order (not a paired comparison)."""
    ref_questions, ref = zip(*scored[reference])
    out: dict = {"reference": reference, "n": len(ref), "runs": {}}
    for name, pairs in scored.items():
        questions, ok = zip(*pairs) if pairs else ((), ())
        if questions != ref_questions:
            raise SystemExit(f"error: run {name!r} scored other questions than "
                             f"{reference!r}: not a paired comparison")
        em = sum(ok) / len(ok)
        row = {"exact_match": em, "se": math.sqrt(em * (1 - em) / len(ok))}
        if name != reference:
            only_run = sum(a and not b for a, b in zip(ok, ref))
            only_ref = sum(b and not a for a, b in zip(ok, ref))
            row |= {"only_run": only_run, "only_reference": only_ref,
                    "mcnemar_p": mcnemar_p(only_run, only_ref)}
        out["runs"][name] = row
    return out


def plot(report: dict, path: Path) -> None:
    """Each run's loss (moving average of ``SMOOTH`` steps), the windows' bounds marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    for name, loss in report["curves"].items():
        smooth = [sum(loss[i : i + SMOOTH]) / SMOOTH for i in range(len(loss) - SMOOTH + 1)]
        ax.plot(range(SMOOTH // 2, SMOOTH // 2 + len(smooth)), smooth, label=name)
    for w in report["comparison"]["windows"]:  # bounds only: windows may tile the run
        for edge in (w["first"], w["last"]):
            ax.axvline(edge, color="grey", lw=0.6, alpha=0.5)
    ax.set_xlabel("step")
    ax.set_ylabel(f"training loss ({SMOOTH}-step mean)")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _window(text: str) -> tuple[int, int]:
    first, sep, last = text.partition("-")
    if not sep or not first.isdigit() or not last.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: give FIRST-LAST, e.g. 129-256")
    return int(first), int(last)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", nargs="+", required=True, metavar="NAME=DIR",
                        help="run directories of launch/train.py; the first is the reference")
    parser.add_argument("--windows", nargs="+", type=_window, required=True,
                        metavar="FIRST-LAST")
    parser.add_argument("--name", default="loss_compare")
    parser.add_argument("--out_dir", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args()
    runs = {}
    for item in args.runs:
        name, sep, directory = item.partition("=")
        if not sep or not name or not directory:
            parser.error(f"--runs {item!r}: give NAME=DIR")
        runs[name] = Path(directory)
    curves = {name: losses(run) for name, run in runs.items()}
    report = {"runs": {n: str(r) for n, r in runs.items()},
              "comparison": compare(curves, next(iter(runs)), args.windows),
              "curves": {n: c[0] for n, c in curves.items()}}
    scored = {name: answers(run) for name, run in runs.items()}
    if all(ok is not None for ok in scored.values()):
        report["exact_match"] = compare_answers(scored, next(iter(runs)))
        for name, row in report["exact_match"]["runs"].items():
            extra = (f"  {row['only_run']} only here, {row['only_reference']} only in the "
                     f"reference, McNemar p {row['mcnemar_p']:.3f}" if "mcnemar_p" in row
                     else "  (reference)")
            print(f"trained EM  {name:<16} {100 * row['exact_match']:.1f}% "
                  f"+- {100 * row['se']:.1f}{extra}")
    for w in report["comparison"]["windows"]:
        for name, row in w["runs"].items():
            extra = (f"  {row['minus_reference']:+.3f} +- {row['paired_se']:.3f} (paired)"
                     if "paired_se" in row else "  (reference)")
            print(f"steps {w['first']}-{w['last']}  {name:<16} {row['mean']:.3f} "
                  f"+- {row['se']:.3f}{extra}")
    from bench.report import write_report

    write_report(report, Path(args.out_dir) / args.name, plot)


if __name__ == "__main__":
    main()
