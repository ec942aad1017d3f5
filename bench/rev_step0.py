"""Step-0 distance of reversible MEFT1/2/3 to the base model (SmolLM2, NQ-open prompts).

At initialisation the adapters output zero, but the two-stream coupling still adds its
λ/β terms to the hidden state; the output ``main + γ·other`` (γ learnable) and the
centred couplings are there to keep the model's output close to the base model. For
every variant this compares the next-token distributions of the reversible model at
step 0 with the base model's on real prompts (``Question: ...\\nAnswer: <answer>`` of
NQ-open, every non-padding position): KL(base ‖ variant) per token, top-1 agreement,
max and mean |logit difference|. Three initialisations per variant: the default
(centred couplings, γ = 0), uncentred with γ = −λ (MEFT1) or −β (MEFT2/3), and
uncentred with γ = 0 (the plain coupling).

    python bench/rev_step0.py [--prompts 64 --batch 16]
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from bench.report import write_report  # noqa: E402
from bench.sparse_offload import machine  # noqa: E402
from meft_ds.data import collate, encode, load_split  # noqa: E402
from meft_ds.models.loader import load_model  # noqa: E402
from meft_ds.reversible.model import ReversibleLM  # noqa: E402
from meft_ds.reversible.options import ReversibleOptions  # noqa: E402
from meft_ds.reversible.variants import VARIANTS  # noqa: E402

INITS: dict[str, dict] = {
    "centred, γ=0 (default)": {},
    "uncentred, γ=−λ|−β": {"rev_center": False},
    "uncentred, γ=0": {"rev_center": False, "rev_mix_init": 0.0},
}


class Distance:
    """Running sums of the per-token distance between two sets of logits."""

    def __init__(self) -> None:
        self.tokens = 0
        self.kl = 0.0
        self.kl_max = 0.0
        self.agree = 0
        self.abs_sum = 0.0
        self.abs_max = 0.0

    def add(self, base: torch.Tensor, other: torch.Tensor, mask: torch.Tensor) -> None:
        """Accumulate over the positions where ``mask`` is true (logits ``[b, s, v]``)."""
        base, other = base[mask].double(), other[mask].double()
        p_log, q_log = base.log_softmax(-1), other.log_softmax(-1)
        kl = (p_log.exp() * (p_log - q_log)).sum(-1)
        diff = (other - base).abs()
        self.tokens += len(kl)
        self.kl += float(kl.sum())
        self.kl_max = max(self.kl_max, float(kl.max()))
        self.agree += int((base.argmax(-1) == other.argmax(-1)).sum())
        self.abs_sum += float(diff.mean(-1).sum())
        self.abs_max = max(self.abs_max, float(diff.max()))

    def summary(self) -> dict[str, float]:
        """Per-token means and maxima."""
        return {"kl_per_token": self.kl / self.tokens, "kl_max": self.kl_max,
                "top1_agreement": self.agree / self.tokens,
                "mean_abs_logit_diff": self.abs_sum / self.tokens,
                "max_abs_logit_diff": self.abs_max}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--max_len", type=int, default=64)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "rev_step0"))
    args = parser.parse_args()
    loaded = load_model("smollm2-135m")
    base, tok = loaded.model.eval(), loaded.tokenizer
    examples = load_split("nq_open", "train", limit=args.prompts)
    encoded = [encode(e, tok, args.max_len, base.config.vocab_size) for e in examples]
    batches = [collate(encoded[i:i + args.batch], tok.pad_token_id or 0)
               for i in range(0, len(encoded), args.batch)]
    with torch.no_grad():
        base_logits = [base(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
                       for b in batches]
    results: dict[str, dict[str, dict[str, float]]] = {}
    for variant in VARIANTS:
        results[variant] = {}
        for label, extra in INITS.items():
            model = ReversibleLM(copy.deepcopy(base), ReversibleOptions(rev_variant=variant,
                                                                        **extra)).eval()
            dist = Distance()
            with torch.no_grad():
                for b, want in zip(batches, base_logits, strict=True):
                    got = model(b["input_ids"], b["attention_mask"])
                    dist.add(want, got, b["attention_mask"].bool())
            results[variant][label] = dist.summary()
            print(f"{variant} {label:24s} " + " ".join(
                f"{k} {v:.4g}" for k, v in results[variant][label].items()), flush=True)
    report = {
        "benchmark": "reversible_step0_distance", "machine": machine(),
        "config": {"model": "smollm2-135m", "data": "nq_open train (NQ-open.dev.jsonl)",
                   "prompts": len(encoded), "tokens": int(sum(b["attention_mask"].sum()
                                                              for b in batches)),
                   "text": "Question: ...\\nAnswer: <answer><eos>, all non-padding positions",
                   "reversible": "all 30 layers, fp64 exact streams, fp32 weights, adapters "
                                 "zero-initialised (width 64)",
                   "inits": INITS},
        "distance": results,
    }
    write_report(report, args.out, plot)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = report["distance"]
    labels = list(next(iter(results.values())))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / len(labels)
    for ax, key, name in ((axes[0], "kl_per_token", "KL(base ‖ variant) per token (log)"),
                          (axes[1], "top1_agreement", "top-1 agreement with the base model")):
        for i, label in enumerate(labels):
            xs = [j + i * width for j in range(len(results))]
            ax.bar(xs, [results[v][label][key] for v in results], width, label=label)
        ax.set_xticks([j + width * (len(labels) - 1) / 2 for j in range(len(results))],
                      list(results))
        ax.set_title(name)
    axes[0].set_yscale("log")
    axes[1].set_ylim(0, 1)
    axes[1].legend(fontsize=8, loc="lower right")
    fig.suptitle(f"SmolLM2-135M at step 0, {report['config']['tokens']} NQ-open tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
