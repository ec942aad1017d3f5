"""Saved-activation bytes of one training forward: baselines vs reversible MEFT1/2/3.

Device-independent: bytes autograd saves for backward, counted with
``saved_tensors_hooks`` (:class:`meft_ds.memory.SavedTensorMeter`), the frozen weights
that autograd keeps for input gradients excluded (as in the trainer's accounting). For
7B shapes on a CPU, ``--layers 1,2`` builds models with only 1 and 2 layers (random
weights, from the config) and extrapolates linearly to the real depth (stated in the
JSON). MEFT rows come with small dense adapters and, ``+sparse``, with the sparse adapter
beside each FFN (``--method sparse --reversible``); its rows at the parameter fraction
0.1 of the full-depth model. The sparse adapter's working set kept for the backward
replay is held outside autograd and not counted (it is the rows moved per step).
``meft1_keepK`` keeps the top K layers' activations (``--rev_keep_top K``: less recompute
for more memory; skipped when extrapolating from too few layers).

    python bench/rev_memory.py                       # SmolLM2, seq 512, batch 4
    for label in parallel_adapter parallel_adapter+ckpt full full+ckpt lora lora+ckpt \
            meft1 meft2 meft3 sparse meft1+sparse meft2+sparse meft3+sparse; do
        python bench/rev_memory.py --model llama2-7b-shape --seq 2048 --batch 1 \
            --layers 1,2 --dtype bf16 --only $label   # one process each: ~6 GiB peak RSS
    done
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import math  # noqa: E402

import torch  # noqa: E402

from meft_ds import methods, options  # noqa: E402
from meft_ds.memory import SavedTensorMeter, rss_bytes  # noqa: E402
from meft_ds.models import loader  # noqa: E402
from meft_ds.models.sizes import count_params  # noqa: E402

BASELINES = ["full", "lora", "parallel_adapter"]
VARIANTS = ["meft1", "meft2", "meft3"]
KEEP_TOP = [1, 2, 4]  # rev_keep_top: top layers that store activations instead of recomputing


def measure(model: torch.nn.Module, name: str, extra: dict, ckpt: bool, ids: torch.Tensor) -> int:
    """Saved bytes of one forward of ``name`` applied to a copy of ``model``."""
    model = copy.deepcopy(model)
    cls = methods.get(name)
    method = cls(options.build(cls.Options, extra), model.config)
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # Adapters in the weights' dtype, as the DeepSpeed engine casts them in bf16 mode.
    module = method.apply(model).to(next(model.parameters()).dtype).train()
    meter = SavedTensorMeter().exclude_module(module)
    with meter.record():
        logits = method.forward(module, ids, torch.ones_like(ids))
    del logits
    return meter.total_bytes


def sparse_sizes(config) -> dict:
    """Sparse adapter sizes at the parameter fraction 0.1 of the full-depth model (so a
    few-layer model gets the full model's rows per layer)."""
    rank = 0.1 * count_params(config) / (2 * config.hidden_size * config.num_hidden_layers)
    experts = max(1, round(math.sqrt(rank)))
    return {"sparse_rank": math.ceil(rank / experts) * experts, "sparse_experts": experts,
            "sparse_optimizer": "torch"}


def configs(sparse: dict) -> list[tuple[str, str, dict, bool]]:
    """(label, method, options, gradient checkpointing)."""
    rows = [(f"{b}{'+ckpt' if c else ''}", b, {}, c) for b in BASELINES for c in (False, True)]
    rows += [(v, "reversible", {"rev_variant": v}, False) for v in VARIANTS]
    rows += [(f"meft1_keep{k}", "reversible", {"rev_variant": "meft1", "rev_keep_top": k}, False)
             for k in KEEP_TOP]
    rows.append(("sparse", "sparse", sparse, False))
    rows += [(f"{v}+sparse", "sparse", {**sparse, "reversible": True, "rev_variant": v}, False)
             for v in VARIANTS]
    return rows


def build(spec: str, layers: int | None, dtype: torch.dtype) -> torch.nn.Module:
    """The model, or a random-weight copy of its architecture with only ``layers`` layers."""
    if layers is None:
        return loader.load_model(spec, dtype=dtype).model
    from transformers import AutoModelForCausalLM

    config = loader.model_config(spec)
    config.num_hidden_layers = layers
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=dtype)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--layers", default="", help="e.g. 1,2: measure and extrapolate")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--only", default="",
                        help="comma-separated labels to measure; the others are kept from "
                             "this setting's existing JSON (one process per label at 7B shape)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    full_config = loader.model_config(args.model)
    depth = full_config.num_hidden_layers
    few = [int(x) for x in args.layers.split(",")] if args.layers else []
    models = {n: build(args.model, n, dtype) for n in few} if few else {
        None: build(args.model, None, dtype)}
    torch.manual_seed(0)
    ids = torch.randint(0, full_config.vocab_size, (args.batch, args.seq))
    sparse = sparse_sizes(full_config)
    out = Path(args.out)
    stem = f"rev_memory_{args.model}_s{args.seq}_b{args.batch}"
    if args.dtype != "fp32":
        stem += f"_{args.dtype}"
    previous = out / f"{stem}.json"
    results: dict[str, float] = {}
    if args.only and previous.exists():
        results = json.loads(previous.read_text())["bytes"]
    for label, name, extra, ckpt in configs(sparse):
        if args.only and label not in args.only.split(","):
            continue
        if few and extra.get("rev_keep_top", 0) >= min(few):
            print(f"{label}: skipped (rev_keep_top needs more than {min(few)} layers)")
            continue
        got = [measure(model, name, extra, ckpt, ids) for model in models.values()]
        if few:
            print(f"{label}: {[round(g / 2**20, 1) for g in got]} MiB at {few} layers")
            per_layer = (got[-1] - got[0]) / (few[-1] - few[0])
            results[label] = got[0] + per_layer * (depth - few[0])
        else:
            results[label] = got[0]
        rss = rss_bytes() / 2**30
        print(f"{label:24s} {results[label] / 2**20:10.1f} MiB  (RSS {rss:.1f} GiB)", flush=True)
    ref = results.get("parallel_adapter", math.nan)
    ckpt_ref = results.get("parallel_adapter+ckpt", math.nan)
    order = [label for label, *_ in configs(sparse)]
    results = {k: results[k] for k in order if k in results}
    report = {
        "benchmark": "saved_activation_bytes",
        "machine": platform.machine(), "python": platform.python_version(),
        "torch": torch.__version__,
        "config": {"model": args.model, "seq": args.seq, "batch": args.batch, "depth": depth,
                   "extrapolated_from_layers": args.layers or None,
                   "weights_dtype": args.dtype, "sparse": sparse,
                   "reversible": "fp64 exact streams, adapters of width 64, all layers",
                   "counted": "tensors saved for backward, frozen weights excluded"},
        "bytes": results,
        "fraction_of_parallel_adapter": {k: v / ref for k, v in results.items()},
        "targets": {v: {"<=10% of parallel_adapter": results[v] <= 0.1 * ref,
                        "< parallel_adapter+ckpt": results[v] < ckpt_ref}
                    for v in results if v.startswith("meft")},
    }
    out.mkdir(parents=True, exist_ok=True)
    previous.write_text(json.dumps(report, indent=2))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    labels = list(results)
    ax.barh(labels, [results[k] / 2**20 for k in labels],
            color=["tab:red" if k.startswith("meft") else "tab:gray" for k in labels])
    ax.set_xscale("log")
    ax.set_xlabel("saved activations (MiB, log scale)")
    ax.set_title(f"{args.model}, seq {args.seq}, batch {args.batch}")
    fig.tight_layout()
    fig.savefig(out / f"{stem}.png", dpi=120)
    print(json.dumps(report["targets"], indent=1))


if __name__ == "__main__":
    main()
