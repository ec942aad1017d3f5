"""Which part of a trained sparse adapter does the damage? Damage with parts switched off.

The knowledge study's damage (``bench/knowledge.py``) is the change of the model's mean
answer-token NLL on GSM8K (48 held-out examples, teacher forced) after training. A sparse
run adds to the frozen model two things: the CPU row store (its values, read through the
router's rows) and the rank-r LoRA beside it (on attention, and on the FFN projections
with ``--sparse_lora_targets all``). This scores each trained run's export as trained and
with one part zeroed: the store's values (no store output), every LoRA ``B`` (no LoRA),
only the FFN LoRA, only the attention LoRA. A part whose removal lowers the damage most
is where the damage comes from. Device-independent (NLL in nats); fp32 on the CPU.

    .venv/bin/python bench/damage_parts.py --runs defaults_n2048=/tmp/runs/x/n2048_lr0.001
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import knowledge  # noqa: E402

FFN = ("mlp.",)
ATTENTION = ("self_attn.",)
Edit = Callable[[str, torch.Tensor], torch.Tensor]


def _zero_lora(parts: tuple[str, ...]) -> Edit:
    """Zero the LoRA ``B`` matrices of modules whose names hold one of ``parts``."""

    def edit(name: str, t: torch.Tensor) -> torch.Tensor:
        hit = "lora_B" in name and any(p in name for p in parts)
        return torch.zeros_like(t) if hit else t

    return edit


def _zero_store_values(hidden: int) -> Edit:
    """Zero the store rows' values (columns ``hidden:`` of ``[rows, 2 * hidden]``)."""

    def edit(name: str, t: torch.Tensor) -> torch.Tensor:
        if not name.startswith("sparse_store."):
            return t
        t = t.clone()
        t[:, hidden:] = 0.0
        return t

    return edit


def variants(hidden: int) -> dict[str, Edit | None]:
    """Name -> tensor edit (``None``: the export as trained)."""
    return {"as_trained": None, "no_store": _zero_store_values(hidden),
            "no_lora": _zero_lora(FFN + ATTENTION), "no_ffn_lora": _zero_lora(FFN),
            "no_attention_lora": _zero_lora(ATTENTION)}


def edited_copy(adapter: Path, edit: Edit, into: Path) -> Path:
    """A copy of the export ``adapter`` with every tensor passed through ``edit``."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(adapter, into)
    for path in into.glob("*.safetensors"):
        tensors = load_file(str(path))
        save_file({k: edit(k, v).contiguous() for k, v in tensors.items()}, str(path))
    return into


def score_run(run: Path, study: knowledge.Study, base: float,
              label: str | None = None) -> dict[str, float]:
    """Damage (nats per answer token) of ``run``'s export under each variant."""
    from meft_ds.inference import load_adapted

    examples = knowledge.damage_examples(study)
    adapter = run / "adapter"
    meta = json.loads((adapter / "adapter_config.json").read_text())
    if meta.get("method") != "sparse":
        raise SystemExit(f"error: {run} is not a sparse run (method {meta.get('method')!r})")
    hidden = int(load_adapted(adapter, weights=False).module.config.hidden_size)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, edit in variants(hidden).items():
            path = adapter if edit is None else edited_copy(adapter, edit, Path(tmp) / name)
            out[name] = knowledge.answer_nll(load_adapted(path), examples) - base
            print(f"{label or run.name:<20} {name:<18} damage {out[name]:+.3f}", flush=True)
    return out


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = list(report["runs"])
    names = list(next(iter(report["runs"].values())))
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        ax.bar([r + i * width for r in range(len(runs))],
               [report["runs"][run][name] for run in runs], width, label=name)
    ax.set_xticks([r + 0.4 - width / 2 for r in range(len(runs))], runs)
    ax.set_ylabel("damage (nats per GSM8K answer token)")
    ax.set_title("sparse adapter: damage with one part switched off")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", nargs="+", required=True, metavar="NAME=DIR",
                   help="run directories of bench/knowledge.py (holding adapter/)")
    p.add_argument("--out", default=str(ROOT / "bench/results/damage_parts"))
    args = p.parse_args()
    runs = {}
    for item in args.runs:
        name, sep, directory = item.partition("=")
        if not sep or not (Path(directory) / "adapter").is_dir():
            raise SystemExit(f"error: --runs {item!r}: expected NAME=DIR with DIR/adapter")
        runs[name] = Path(directory)
    study = knowledge.Study()
    from meft_ds.inference import load_adapted

    first = next(iter(runs.values()))
    base = knowledge.answer_nll(load_adapted(first / "adapter", weights=False),
                                knowledge.damage_examples(study))
    report = {"base_nll": base, "examples": study.damage_examples,
              "sources": {k: str(v) for k, v in runs.items()},
              "runs": {name: score_run(run, study, base, name) for name, run in runs.items()}}
    from bench.report import write_report

    write_report(report, args.out, plot)


if __name__ == "__main__":
    main()
