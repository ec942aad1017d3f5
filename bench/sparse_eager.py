"""The eager row update under gradient clipping, on the main job (``make train``'s config).

Runs ``launch/train.py --deepspeed ds_configs/24gb.json`` twice on this machine, one after
the other: ``--sparse_eager_update true`` (speculative under the config's clip of 1.0,
see :mod:`meft_ds.sparse.eager`) and ``false`` (every row update after backward). Reports:

- whether the two runs' losses are the same bit for bit (they must be: the speculative
  update is rolled back and redone whenever a step clips);
- per step: how many layers' updates the thread took and kept (off the critical path on a
  GPU), redid after a clip, or left to the step once the clip was certain; the steps
  that clipped; the bytes of the rows' copies;
- the step-time ratio of the two runs (this machine's; on a CPU the thread competes with
  backward for the same cores, so this says nothing about a GPU, where the CPU is idle
  during backward).

    python bench/sparse_eager.py            # ~8 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import write_report  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
COUNTS = ("sparse_eager_layers", "sparse_eager_layers_redone", "sparse_eager_layers_deferred")


def train(out: Path, eager: bool, extra: list[str]) -> list[dict]:
    """One main-job run without evaluation; its per-step metrics."""
    deepspeed = shutil.which("deepspeed", path=str(Path(sys.executable).parent)) or "deepspeed"
    command = [deepspeed, "launch/train.py", "--deepspeed", "ds_configs/24gb.json",
               "--output_dir", str(out), "--overwrite_output_dir", "true",
               "--sparse_eager_update", str(eager).lower(), "--eval_trained", "0",
               "--eval_heldout", "0", "--save_final", "false", "--progress", "false", *extra]
    print("+", " ".join(command), flush=True)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    subprocess.run(command, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [s for s in map(json.loads, lines) if "loss" in s]


def summarise(eager: list[dict], plain: list[dict], clip: float) -> dict:
    per_step = []
    for e in eager:
        taken = e.get(COUNTS[0], 0.0)
        per_step.append({
            "step": e["step"], "grad_norm": e["grad_norm"], "clipped": e["grad_norm"] > clip,
            "kept": taken - e.get(COUNTS[1], 0.0), "redone": e.get(COUNTS[1], 0.0),
            "deferred": e.get(COUNTS[2], 0.0),
            "backup_bytes": e.get("sparse_eager_backup_bytes", 0.0),
        })
    layers = sum(s["kept"] + s["redone"] + s["deferred"] for s in per_step)
    diffs = [abs(a["loss"] - b["loss"]) for a, b in zip(eager, plain)]
    return {
        "steps": len(eager),
        "losses_bit_identical": len(eager) == len(plain) and max(diffs) == 0.0,
        "max_loss_diff": max(diffs),
        "steps_clipped": sum(s["clipped"] for s in per_step),
        "layer_updates": layers,
        "kept_fraction": sum(s["kept"] for s in per_step) / layers,
        "redone_fraction": sum(s["redone"] for s in per_step) / layers,
        "deferred_fraction": sum(s["deferred"] for s in per_step) / layers,
        "backup_bytes_mean": statistics.fmean(s["backup_bytes"] for s in per_step),
        "backup_bytes_max": max(s["backup_bytes"] for s in per_step),
        "store_bytes": eager[-1].get("sparse_store_bytes"),
        "cpu_step_time_ratio_eager_over_plain": (
            sum(s["step_s"] for s in eager) / sum(s["step_s"] for s in plain)),
        "wait_s_mean": statistics.fmean(s.get("sparse_wait_s", 0.0) for s in eager),
        "per_step": per_step,
    }


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = report["per_step"]
    x = [s["step"] for s in steps]
    fig, ax = plt.subplots(figsize=(9, 4))
    bottom = [0.0] * len(x)
    for key, colour in (("kept", "tab:green"), ("redone", "tab:orange"),
                        ("deferred", "tab:grey")):
        values = [s[key] for s in steps]
        ax.bar(x, values, bottom=bottom, color=colour, width=1.0, label=f"layers {key}")
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.set_xlabel("step")
    ax.set_ylabel("layer row updates")
    norm = ax.twinx()
    norm.plot(x, [s["grad_norm"] for s in steps], color="black", lw=0.8, label="grad norm")
    norm.axhline(report["clip"], color="red", lw=0.8, ls="--", label="clip")
    norm.set_yscale("log")
    norm.set_ylabel("global gradient norm")
    ax.legend(loc="upper right", fontsize=8)
    norm.legend(loc="center right", fontsize=8)
    ax.set_title(f"speculative eager update, make train: {report['kept_fraction']:.0%} kept, "
                 f"{report['redone_fraction']:.0%} redone, losses identical: "
                 f"{report['losses_bit_identical']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "sparse_eager"))
    parser.add_argument("--note", default="", help="how the machine was loaded")
    parser.add_argument("extra", nargs="*", help="more launch/train.py arguments (after --)")
    args = parser.parse_args()
    clip = json.loads((ROOT / "ds_configs" / "24gb.json").read_text())["gradient_clipping"]
    with tempfile.TemporaryDirectory() as tmp:
        eager = train(Path(tmp) / "eager", True, args.extra)
        plain = train(Path(tmp) / "plain", False, args.extra)
    report = {"config": "ds_configs/24gb.json", "clip": clip, "extra": args.extra,
              **summarise(eager, plain, clip), "note": args.note}
    write_report(report, args.out, plot)
    print(json.dumps({k: v for k, v in report.items() if k != "per_step"}, indent=1))


if __name__ == "__main__":
    main()
