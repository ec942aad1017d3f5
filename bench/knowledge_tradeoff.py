"""Facts learned against damage done: every scored point of the knowledge study's ledger.

Each point of ``bench/results/knowledge_points/`` (one configuration, N and learning rate,
trained in the study's setting) is a trade: trained EM (more is better) against damage,
the rise of the GSM8K answer NLL (less is better). At each N this lists every point and
marks the Pareto front (no other point has at least its EM with at most its damage, one
of them strictly), so a change that only moves along the front (fewer facts for less
damage) is told apart from one that moves it. Device-independent; no training.

    .venv/bin/python bench/knowledge_tradeoff.py --sizes 256 1024 2048
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import knowledge  # noqa: E402

LOWEST_EM = 85  # the plot's floor (the JSON keeps every point)


def ledger_points(root: Path, study: knowledge.Study) -> list[dict]:
    """Every ledger point of ``study``'s settings: ``{config, n, lr, em, damage, proxy_mib}``."""
    return [{"config": name, "n": n, "lr": lr, "em": p["trained_em"], "damage": p["damage"],
             "proxy_mib": p["memory_proxy_bytes"] / 2**20}
            for name, n, lr, p in knowledge.Ledger(root).points(study)]


def pareto(points: list[dict]) -> list[dict]:
    """``points`` (one N) with ``front``: True where no other point within the goal's memory
    bound dominates it, False for those it excludes (``over_budget``) too. The bound is LoRA
    r64's memory proxy at that N (issue 24), where r64 was run."""
    budget = max((p["proxy_mib"] for p in points if p["config"] == "lora_r64"),
                 default=float("inf"))
    points = [{**p, "over_budget": p["proxy_mib"] > budget} for p in points]
    within = [p for p in points if not p["over_budget"]]

    def dominates(a: dict, b: dict) -> bool:
        return (a["em"] >= b["em"] and a["damage"] <= b["damage"]
                and (a["em"] > b["em"] or a["damage"] < b["damage"]))

    return [{**p, "front": not p["over_budget"] and not any(dominates(q, p) for q in within)}
            for p in points]


def plot(report: dict, path: Path, highlight: tuple[str, ...]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = list(report["by_n"])
    fig, axes = plt.subplots(1, len(sizes), figsize=(5 * len(sizes), 4.2), squeeze=False)
    for ax, n in zip(axes[0], sizes):
        for p in report["by_n"][n]:
            lora = p["config"].startswith("lora")
            named = p["config"] in highlight or lora
            ax.scatter(p["damage"], 100 * p["em"], s=40 if named else 14,
                       marker="s" if lora else "o",
                       c="tab:blue" if lora else ("tab:red" if named else "0.6"),
                       edgecolors="k" if p["front"] else "none")
            if named:
                ax.annotate(f'{p["config"]} {p["lr"]:g}', (p["damage"], 100 * p["em"]),
                            fontsize=6, xytext=(3, 2), textcoords="offset points")
        ax.set_ylim(max(ax.get_ylim()[0], LOWEST_EM), 100.5)
        ax.set(title=f"N = {n}", xlabel="damage (GSM8K answer NLL rise, nats)",
               ylabel="trained EM (%)")
        ax.grid(alpha=0.3)
    fig.suptitle("knowledge study: facts against damage (black edge: Pareto front within "
                 f"LoRA r64's memory; EM below {LOWEST_EM}% not drawn)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", default=str(ROOT / "bench/results/knowledge_points"))
    parser.add_argument("--sizes", nargs="+", type=int, default=[256, 1024, 2048])
    parser.add_argument("--highlight", nargs="*", default=[], help="configs to label")
    parser.add_argument("--out", default=str(ROOT / "bench/results/knowledge_tradeoff.json"))
    args = parser.parse_args()
    points = ledger_points(Path(args.points), knowledge.Study())
    by_n = {str(n): sorted(pareto([p for p in points if p["n"] == n]),
                           key=lambda p: p["damage"]) for n in args.sizes}
    report = {"study": knowledge.study_settings(knowledge.Study()), "by_n": by_n}
    out = Path(args.out)
    out.write_text(json.dumps(report, indent=1) + "\n")
    plot(report, out.with_suffix(".png"), tuple(args.highlight))
    for n, rows in by_n.items():
        front = [f'{p["config"]}@{p["lr"]:g} {100 * p["em"]:.1f}% +{p["damage"]:.2f}'
                 for p in rows if p["front"]]
        print(f"N={n}: front " + "; ".join(front))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
