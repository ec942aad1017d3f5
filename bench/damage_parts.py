"""Which part of a trained sparse adapter does the damage? Damage with parts switched off.

The knowledge study's damage (``bench/knowledge.py``) is the change of the model's mean
answer-token NLL on GSM8K (48 held-out examples, teacher forced) after training. A sparse
run adds to the frozen model two things: the CPU row store (its values, read through the
router's rows) and the rank-r LoRA beside it (on attention, and on the FFN projections
with ``--sparse_lora_targets all``). This scores each trained run's export as trained and
with one part zeroed: the store's values (no store output), every LoRA ``B`` (no LoRA),
only the FFN LoRA, only the attention LoRA. A part whose removal lowers the damage most
is where the damage comes from. Every run (any method) also gets the damage's profile over
an answer's tokens: the NLL change by position (first token, 2-4, 5-16, 17 on), as a mean and
as a share of the damage, the probability the model puts on its end-of-turn token at the
answer's tokens (short answers were trained), and the damage with that probability removed
(each token's NLL renormalised over the other tokens). Device-independent (NLL in nats);
fp32 on the CPU.

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
POSITIONS = {"1": (0, 1), "2-4": (1, 4), "5-16": (4, 16), "17+": (16, None)}
Edit = Callable[[str, torch.Tensor], torch.Tensor]


def _zero_lora(parts: tuple[str, ...]) -> Edit:
    """Zero the LoRA ``B`` matrices of modules whose names hold one of ``parts``."""

    def edit(name: str, t: torch.Tensor) -> torch.Tensor:
        hit = "lora_B" in name and any(p in name for p in parts)
        return torch.zeros_like(t) if hit else t

    return edit


def _zero_store_values(name: str, t: torch.Tensor) -> torch.Tensor:
    """Zero the store rows' values: the right half of each layer's ``[rows, keys | values]``."""
    if not name.startswith("sparse_store."):
        return t
    t = t.clone()
    t[:, t.shape[1] // 2 :] = 0.0
    return t


def variants() -> dict[str, Edit | None]:
    """Name -> tensor edit (``None``: the export as trained)."""
    return {"as_trained": None, "no_store": _zero_store_values,
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


def token_nll(adapted, examples) -> tuple[list, list]:
    """Per example: the answer tokens' NLL ``[A]`` and the end-of-turn probability ``[A]``
    at each of them (A: that example's answer tokens)."""
    end = adapted.tokenizer.eos_token_id
    nll, end_p = [], []
    for logits, labels in knowledge.answer_logits(adapted, examples):
        logp = logits[:, :-1].float().log_softmax(-1)
        labels = labels[:, 1:]
        target = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        for row in range(labels.shape[0]):
            answer = labels[row] != -100
            nll.append(-target[row][answer])
            end_p.append(logp[row, :, end][answer].exp())
    return nll, end_p


def profile(base: tuple[list, list], after: tuple[list, list]) -> dict:
    """Where over an answer's tokens ``after`` loses against ``base`` (see the module doc)."""
    change = [a - b for a, b in zip(after[0], base[0], strict=True)]
    tokens = sum(len(c) for c in change)
    by_position = {}
    for name, (lo, hi) in POSITIONS.items():
        picked = torch.cat([c[lo:hi] for c in change])
        by_position[name] = {"tokens": len(picked), "mean_change": float(picked.mean()),
                             "share_of_damage": float(picked.sum()) / tokens}
    # NLL over the other tokens: -log p(y) + log(1 - p(end)), before and after
    def renormalised(nll: list, end_p: list) -> float:
        return float(sum((n + torch.log1p(-e.clamp(max=1 - 1e-6))).sum()
                         for n, e in zip(nll, end_p, strict=True))) / tokens

    return {"damage": float(sum(c.sum() for c in change)) / tokens, "by_position": by_position,
            "end_probability": float(sum(e.sum() for e in after[1])) / tokens,
            "end_probability_before": float(sum(e.sum() for e in base[1])) / tokens,
            "damage_without_end": renormalised(*after) - renormalised(*base)}


def score_run(run: Path, examples: list, base: float,
              label: str | None = None) -> dict[str, float]:
    """Damage (nats per answer token of ``examples``, against the base NLL ``base``) of
    ``run``'s export under each variant; ``{}`` for a run of another method."""
    from meft_ds.inference import load_adapted

    adapter = run / "adapter"
    meta = json.loads((adapter / "adapter_config.json").read_text())
    if meta.get("method") != "sparse":
        return {}
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, edit in variants().items():
            path = adapter if edit is None else edited_copy(adapter, edit, Path(tmp) / name)
            out[name] = knowledge.answer_nll(load_adapted(path), examples) - base
            print(f"{label or run.name:<20} {name:<18} damage {out[name]:+.3f}", flush=True)
    return out


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5))
    runs = list(report["parts"])
    names = list(next(iter(report["parts"].values()), {}))
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        left.bar([r + i * width for r in range(len(runs))],
                 [report["parts"][run][name] for run in runs], width, label=name)
    left.set_xticks([r + 0.4 - width / 2 for r in range(len(runs))], runs)
    left.set_ylabel("damage (nats per GSM8K answer token)")
    left.set_title("sparse runs: damage with one part switched off")
    left.legend(fontsize=8)
    runs = list(report["profiles"])
    bottom = [0.0] * len(runs)
    for position in POSITIONS:
        shares = [report["profiles"][r]["by_position"][position]["share_of_damage"]
                  for r in runs]
        right.bar(runs, shares, bottom=bottom, label=f"answer tokens {position}")
        bottom = [b + x for b, x in zip(bottom, shares, strict=True)]
    right.plot(runs, [report["profiles"][r]["damage_without_end"] for r in runs], "kD",
               label="damage, end-of-turn probability removed")
    right.set_ylabel("damage (nats per answer token)")
    right.set_title("where over the answer the damage lies")
    right.tick_params(axis="x", labelrotation=20)
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", nargs="+", required=True, metavar="NAME=DIR",
                   help="run directories of bench/knowledge.py (holding adapter/); sparse "
                   "runs get the parts, every run the profile")
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

    examples = knowledge.damage_examples(study)
    fresh = load_adapted(next(iter(runs.values())) / "adapter", weights=False)
    base, base_tokens = knowledge.answer_nll(fresh, examples), token_nll(fresh, examples)
    parts, profiles = {}, {}
    for name, run in runs.items():
        parts[name] = score_run(run, examples, base, name)
        profiles[name] = profile(base_tokens, token_nll(load_adapted(run / "adapter"), examples))
        print(f"{name:<20} end-of-turn p {profiles[name]['end_probability']:.3f}, damage "
              f"without it {profiles[name]['damage_without_end']:+.3f}", flush=True)
    report = {"base_nll": base, "examples": study.damage_examples,
              "sources": {k: str(v) for k, v in runs.items()},
              "parts": {k: v for k, v in parts.items() if v}, "profiles": profiles}
    from bench.report import write_report

    write_report(report, args.out, plot)


if __name__ == "__main__":
    main()
