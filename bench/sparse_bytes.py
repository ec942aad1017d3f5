"""Host<->device traffic of the sparse adapter per training step, over Φ, with and
without the hot-row cache, at the paper's setting and on real SmolLM2 weights.

Φ = adapter parameters = layers x r x 2d. "Elements" count every value that crosses
(rows down, row gradients up, hidden states and expert ids up for the CPU selection,
cache promotions/evictions with both Adam moments, the keys of updated hot rows back
up); the selection's [T, K] int64 column/slot indices are not counted. Bytes are as
moved by this run's dtypes (the 7B shape runs in bf16: rows, gradients and hidden states
2 bytes; cache traffic fp32 master weights and moments, 4 bytes).

- **LLaMA-2-7B shape** (d 4096, random weights), only ``--layers`` (default 2) of its 32
  layers built: a layer's figures do not depend on the others, so the per-layer ratio is
  reported as the 32-layer figure (extrapolated, not measured on 32 layers). r 6144,
  top-K 64, NQ-open text packed into ``--batch`` x ``--seq`` tokens (default 2 x 256),
  ``--steps`` consecutive real training steps (routers trained with AdamW, rows with the
  row-sparse AdamW), so the routing decisions are real ones. SmolLM2-135M: the same on
  its real weights, all 30 layers.
- **Cache sizes** are evaluated by replaying the recorded selections of the run through
  :class:`meft_ds.sparse.cache.LayerCache` (its real policy and split). This is valid
  because training with the cache is exact (``tests/test_sparse_cache.py``; the bench
  uses the ``torch`` row backend, for which cache on/off are bit-identical): the cache
  changes what moves, not which rows are selected. On SmolLM2 one cache size is also
  run for real and its counters are checked against the replay.
- **Curves** against batch size and sequence length: first step only (no cache effect
  possible), from the real counters of a forward pass (row gradients move as many
  elements as rows, counted so).

Writes ``bench/results/sparse_bytes.json`` and ``.png``.
Run: ``nice -n 10 .venv/bin/python bench/sparse_bytes.py`` (~15 min on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))

import torch  # noqa: E402

from bench.report import write_report  # noqa: E402
from bench.sparse_offload import build, lm_loss, machine  # noqa: E402
from meft_ds.data import encode, load_split  # noqa: E402
from meft_ds.models.loader import load_model, load_tokenizer, model_config  # noqa: E402
from meft_ds.sparse.cache import LayerCache, cache_capacity  # noqa: E402
from meft_ds.sparse.store import LayerRows  # noqa: E402

PAPER = {"sparse_adapter_paper": 0.56, "zero_offload": 2.0, "target_with_cache": 0.28}


def packed(tokenizer, vocab: int, batch: int, seq: int, count: int, skip: int = 0):
    """``count`` micro-batches of NQ-open prompt+answer texts packed into ``seq`` tokens."""
    need = batch * seq * count
    ids: list[int] = []
    for example in load_split("nq_open", "train")[skip:]:
        ids += encode(example, tokenizer, 10**6, vocab).input_ids
        if len(ids) >= need:
            break
    flat = torch.tensor(ids[:need]).view(count, batch, seq)
    return [{"input_ids": b, "attention_mask": torch.ones_like(b), "labels": b.clone()}
            for b in flat]


def seven_b(layers: int):
    from transformers import AutoModelForCausalLM

    config = model_config("llama2-7b-shape")
    config.num_hidden_layers = layers
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.config.use_cache = False
    return model, load_tokenizer("llama2-7b-shape")


def train(base, data, values: dict, lr: float) -> tuple[list[dict], list[dict], object]:
    """Real training steps; returns per-step metrics, per-step selections, the method."""
    method, module = build("sparse", base, values)
    routers = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(routers, lr=lr)
    metrics, traces = [], []
    for batch in data:
        logits = method.forward(module, batch["input_ids"], batch["attention_mask"])
        lm_loss(logits, batch["labels"]).backward()
        traces.append({layer: a._cache.selection.rows.clone()
                       for layer, a in method.adapters.items()})
        optimizer.step()
        optimizer.zero_grad()
        method.after_engine_step(lr, 1.0)
        metrics.append(method.step_metrics())
        print(f"  step {len(metrics)}: rows/layer "
              f"{metrics[-1]['sparse_rows_moved'] / len(method.adapters):.0f}", flush=True)
    return metrics, traces, method


def replay(traces: list[dict], rank: int, hidden: int, capacity: int) -> list[dict]:
    """What the cache of ``capacity`` rows per layer changes, step by step: hits, keys
    written back, promotions and evictions (elements), through the real LayerCache."""
    width = 2 * hidden
    dummy = LayerRows(*(torch.zeros(rank, width) for _ in range(3)),
                      steps=torch.zeros(rank, dtype=torch.int64))
    caches = {layer: LayerCache(capacity, rank, width, torch.device("cpu"))
              for layer in traces[0]}
    out = []
    for step in traces:
        rec = {"hits": 0, "misses": 0, "keys_back": 0, "promoted": 0, "evicted": 0,
               "cache_up": 0, "cache_down": 0}
        for layer, rows in step.items():
            cache = caches[layer]
            hot_pos, slots, cold_pos = cache.split(rows)
            cache.note_selected(rows)
            rec["hits"] += hot_pos.numel()
            rec["misses"] += cold_pos.numel()
            rec["keys_back"] += slots.numel() * hidden
            promoted, evicted, up, down = cache.rebalance(dummy)
            rec["promoted"] += promoted
            rec["evicted"] += evicted
            rec["cache_up"] += up.elements
            rec["cache_down"] += down.elements
        out.append(rec)
    return out


def summarise(metrics: list[dict], traces: list[dict], rank: int, hidden: int, layers: int,
              fractions: list[float], warm: int) -> dict:
    """Elements/Φ per step without the cache (measured) and with each cache size."""
    phi = layers * rank * 2 * hidden
    width = 2 * hidden
    base = [m["sparse_h2d_elements"] + m["sparse_d2h_elements"] for m in metrics]
    base_bytes = [m["sparse_h2d_bytes"] + m["sparse_d2h_bytes"] for m in metrics]
    rows = [m["sparse_rows_moved"] for m in metrics]
    hidden_elems = [m["sparse_d2h_elements"] - r * width for m, r in zip(metrics, rows)]
    result = {
        "phi": phi,
        "no_cache": {
            "elements_over_phi_per_step": [b / phi for b in base],
            "bytes_per_step": base_bytes,
            "rows_selected_per_layer_per_step": [r / layers for r in rows],
            "working_set_fraction_per_step": [r / layers / rank for r in rows],
            "rows_down_over_phi": [r * width / phi for r in rows],
            "grads_up_over_phi": [r * width / phi for r in rows],
            "hidden_and_experts_up_over_phi": [h / phi for h in hidden_elems],
        },
        "cache": [],
    }
    element_size = metrics[0]["sparse_h2d_bytes"] / max(metrics[0]["sparse_h2d_elements"], 1)
    for fraction in fractions:
        capacity = cache_capacity(fraction, rank)
        per = replay(traces, rank, hidden, capacity)
        elements, nbytes = [], []
        for b, bb, rec in zip(base, base_bytes, per):
            saved = 2 * width * rec["hits"]
            traffic = rec["keys_back"] + rec["cache_up"] + rec["cache_down"]
            elements.append(b - saved + traffic)
            nbytes.append(bb - saved * element_size + 4 * traffic)
        after = slice(warm, None)
        result["cache"].append({
            "fraction": fraction, "rows_per_layer": capacity,
            "elements_over_phi_per_step": [e / phi for e in elements],
            "bytes_per_step": nbytes,
            "mean_elements_over_phi_after_warmup": _mean([e / phi for e in elements[after]]),
            "hit_rate_per_step": [r["hits"] / max(r["hits"] + r["misses"], 1) for r in per],
            "replay": per,
        })
    result["no_cache"]["mean_elements_over_phi_after_warmup"] = _mean(
        [b / phi for b in base[warm:]])
    return result


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def curve(base, tokenizer, values: dict, points: list[tuple[int, int]], rank: int) -> list:
    """First-step elements/Φ (no cache) for (batch, seq) points, from a forward pass."""
    hidden = base.config.hidden_size
    layers = base.config.num_hidden_layers
    phi = layers * rank * 2 * hidden
    out = []
    for batch, seq in points:
        data = packed(tokenizer, base.config.vocab_size, batch, seq, 1, skip=1000)
        method, module = build("sparse", base, values)
        with torch.no_grad():
            method.forward(module, data[0]["input_ids"], data[0]["attention_mask"])
        method.runtime.step(0.0)  # closes the step's counters (no gradients: no update)
        m = method.step_metrics()
        rows = m["sparse_rows_moved"]
        elements = m["sparse_h2d_elements"] + m["sparse_d2h_elements"] + rows * 2 * hidden
        out.append({"batch": batch, "seq": seq, "tokens": batch * seq,
                    "rows_per_layer": rows / layers, "working_set_fraction": rows / layers / rank,
                    "elements_over_phi": elements / phi})
        print(f"  curve b{batch} s{seq}: {out[-1]}", flush=True)
        del method, module
    return out


def real_cache_check(base, data, values: dict, fraction: float, lr: float,
                     expected: dict, rank: int, hidden: int, layers: int) -> dict:
    """Run the cache for real and compare its counters with the replay's prediction."""
    metrics, _, _ = train(base, data, {**values, "sparse_cache_rows": fraction}, lr)
    phi = layers * rank * 2 * hidden
    real = [(m["sparse_h2d_elements"] + m["sparse_d2h_elements"]) / phi for m in metrics]
    predicted = expected["elements_over_phi_per_step"]
    return {"fraction": fraction, "real_elements_over_phi_per_step": real,
            "replay_elements_over_phi_per_step": predicted,
            "max_abs_difference": max(abs(a - b) for a, b in zip(real, predicted))}


def run_model(name: str, base, tokenizer, args, rank: int) -> dict:
    hidden = base.config.hidden_size
    layers = base.config.num_hidden_layers
    values = {"sparse_rank": rank, "sparse_top_k": args.top_k, "sparse_optimizer": "torch",
              "sparse_eager_update": False}
    data = packed(tokenizer, base.config.vocab_size, args.batch, args.seq, args.steps)
    print(f"{name}: r {rank}, {layers} layers, {args.steps} steps", flush=True)
    metrics, traces, method = train(base, data, values, args.lr)
    result = {"model": name, "layers_built": layers, "rank": rank, "hidden": hidden,
              "sizes": method.runtime.sizes.as_dict() | {"layers": layers},
              **summarise(metrics, traces, rank, hidden, layers, args.cache, args.warm)}
    del method
    gc.collect()
    if name == "smollm2-135m" and args.check_fraction:
        match = next(c for c in result["cache"] if c["fraction"] == args.check_fraction)
        result["real_cache_check"] = real_cache_check(
            base, data, values, args.check_fraction, args.lr, match, rank, hidden, layers)
    return result


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.4))
    ax = axes[0]
    for res in report["results"]:
        label = f"{res['model']} r{res['rank']}"
        ax.plot(res["no_cache"]["elements_over_phi_per_step"], "o-", label=f"{label}, no cache")
        for c in res["cache"]:
            ax.plot(c["elements_over_phi_per_step"], ".--",
                    label=f"{label}, cache {c['fraction']:g}r")
    for key, value in PAPER.items():
        ax.axhline(value, color="grey", lw=0.8, ls=":")
        ax.text(0, value, key, fontsize=7, va="bottom")
    ax.set(xlabel="training step", ylabel="elements moved / Φ", yscale="log",
           title="Traffic per step over Φ")
    ax.legend(fontsize=6)
    for ax, key, xlabel in ((axes[1], "batch_curve", "batch (seq fixed)"),
                            (axes[2], "seq_curve", "sequence length (batch fixed)")):
        points = report["curves"][key]
        x = [p["batch"] if key == "batch_curve" else p["seq"] for p in points]
        ax.plot(x, [p["elements_over_phi"] for p in points], "o-", label="elements / Φ")
        ax.plot(x, [p["working_set_fraction"] for p in points], "s--",
                label="rows selected / r (per layer)")
        ax.axhline(0.56, color="grey", lw=0.8, ls=":")
        ax.set(xlabel=xlabel, xscale="log", title="LLaMA-7B shape, first step, no cache")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=2, help="7B-shape layers built")
    parser.add_argument("--rank", type=int, default=6144)
    parser.add_argument("--smol_ranks", type=int, nargs="*", default=[6144])
    parser.add_argument("--top_k", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warm", type=int, default=3, help="steps left out of the means")
    parser.add_argument("--cache", type=float, nargs="*", default=[0.125, 0.25, 0.5])
    parser.add_argument("--check_fraction", type=float, default=0.25)
    parser.add_argument("--batches", type=int, nargs="*", default=[1, 2, 4, 8])
    parser.add_argument("--seqs", type=int, nargs="*", default=[64, 128, 256, 512])
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "sparse_bytes"))
    args = parser.parse_args()

    results = []
    model, tokenizer = seven_b(args.layers)
    results.append(run_model("llama2-7b-shape", model, tokenizer, args, args.rank))
    values = {"sparse_rank": args.rank, "sparse_top_k": args.top_k, "sparse_optimizer": "torch"}
    curves = {
        "batch_curve": curve(model, tokenizer, values,
                             [(b, args.seq) for b in args.batches], args.rank),
        "seq_curve": curve(model, tokenizer, values,
                           [(args.batch, s) for s in args.seqs], args.rank),
    }
    del model
    smol = load_model("smollm2-135m")
    for rank in args.smol_ranks:
        results.append(run_model("smollm2-135m", copy.deepcopy(smol.model), smol.tokenizer,
                                 args, rank))
    report = {
        "benchmark": "sparse_bytes", "machine": machine(), "config": vars(args),
        "paper": PAPER,
        "note": (
            "7B shape: only the built layers are measured; per-layer ratios are the "
            "32-layer figures by extrapolation (layers are independent). Cache sizes are "
            "replays of the recorded selections through the real LayerCache (exact because "
            "training with the cache is exact); SmolLM2 checks one size against a real run."
        ),
        "results": results, "curves": curves,
    }
    write_report(report, args.out, plot)
    for res in results:
        line = f"{res['model']} r{res['rank']}: no cache " \
               f"{res['no_cache']['mean_elements_over_phi_after_warmup']:.3f} Φ"
        for c in res["cache"]:
            line += f", cache {c['fraction']:g}r {c['mean_elements_over_phi_after_warmup']:.3f} Φ"
        print(line)


if __name__ == "__main__":
    main()
