"""Greedy decoding of a reversible model with its KV cache against recomputing each prefix.

The launcher's evaluation path before and after the cache: ``meft_ds.eval.generate`` with
the ReversibleLM (transformers' loop, KV cache) and with its logits only (each new token
recomputes the whole prefix). Both decode the same NQ-open prompts (the training prompt
format, left padding) from SmolLM2-135M with MEFT1 adapters (perturbed, so they change
the outputs); reported: whether the answers agree, the matmul + attention FLOPs of each
path counted at the dispatcher (device-independent) and, timed side by side (the two
paths alternate within every repetition, so machine load hits both alike), the ratio of
their median times. Absolute times of this CPU mean nothing elsewhere and are not kept.

    .venv/bin/python bench/rev_generate.py [--prompts 32 --new-tokens 16 --reps 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from bench.flops import FlopCounter  # noqa: E402
from bench.report import write_report  # noqa: E402

PATHS = ("kv_cache", "recompute")


def _model(spec: str, variant: str):
    import meft_ds
    from meft_ds.models.loader import load_model

    loaded = load_model(spec)
    model = meft_ds.get_reversible_model(loaded.model, meft_ds.ReversibleConfig(
        rev_variant=variant))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # non-zero adapters: the outputs differ from the base model's
        for name, param in model.named_parameters():
            if param.requires_grad and name.endswith("up.weight"):
                param.copy_(torch.randn(param.shape, generator=gen) * 0.02)
    return model.eval(), loaded.tokenizer


def _prompts(n: int) -> list[str]:
    from meft_ds.data import default_data_dir
    from meft_ds.data.prompts import format_prompt

    dev = default_data_dir() / "nq_open" / "NQ-open.dev.jsonl"
    lines = dev.read_text().splitlines()[:n]
    return [format_prompt(json.loads(line)["question"]) for line in lines]


def decode(model, tokenizer, prompts: list[str], args: argparse.Namespace, path: str
           ) -> list[str]:
    """Answers of ``path`` (``kv_cache`` or ``recompute``)."""
    from meft_ds import eval as meval

    def logits(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return model(ids, mask).logits

    hf = model.method.generation_model(model.model) if path == "kv_cache" else None
    with torch.no_grad():
        return meval.generate(logits, tokenizer, prompts, args.new_tokens, args.batch,
                              progress=False, hf_model=hf)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--variant", default="meft1", choices=("meft1", "meft2", "meft3"))
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=16,
                        help="most tokens decoded per prompt (a batch stops when all its rows "
                             "reached EOS: with identical answers both paths do the same work)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "rev_generate"))
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    model, tokenizer = _model(args.model, args.variant)
    prompts = _prompts(args.prompts)
    answers = {p: decode(model, tokenizer, prompts, args, p) for p in PATHS}  # warm-up too
    flops = {}
    for path in PATHS:
        with FlopCounter() as counter:
            decode(model, tokenizer, prompts[: args.batch], args, path)
        flops[path] = counter.total
    times: dict[str, list[float]] = {p: [] for p in PATHS}
    for rep in range(args.reps):
        for path in PATHS:
            start = time.perf_counter()
            decode(model, tokenizer, prompts, args, path)
            times[path].append(time.perf_counter() - start)
        print(rep, {p: round(t[-1], 2) for p, t in times.items()}, flush=True)
    median = {p: statistics.median(t) for p, t in times.items()}
    same = sum(a == b for a, b in zip(answers["kv_cache"], answers["recompute"], strict=True))
    report = {
        "model": args.model, "variant": args.variant, "prompts": len(prompts),
        "batch": args.batch, "new_tokens": args.new_tokens, "reps": args.reps,
        "answers_identical": same, "answers": len(prompts),
        "flops_one_batch": flops,
        "flop_ratio_recompute_over_cache": flops["recompute"] / flops["kv_cache"],
        "time_ratio_recompute_over_cache": median["recompute"] / median["kv_cache"],
        "time_ratios_per_rep": [r / c for r, c in zip(times["recompute"], times["kv_cache"],
                                                      strict=True)],
        "torch_threads": torch.get_num_threads(),
    }
    print(json.dumps({k: v for k, v in report.items() if k != "flops_one_batch"}, indent=1))
    write_report(report, args.out, _plot)
    return 0


def _plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ratios = [report["flop_ratio_recompute_over_cache"],
              report["time_ratio_recompute_over_cache"]]
    bars = ax.bar(["FLOPs", "time (median)"], ratios, color=["tab:blue", "tab:orange"])
    ax.bar_label(bars, fmt="%.1fx")
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set(ylabel="recompute each prefix / KV cache",
           title=f"{report['variant']} greedy decoding, {report['prompts']} prompts, "
                 f"{report['new_tokens']} tokens\nanswers identical: "
                 f"{report['answers_identical']}/{report['answers']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
