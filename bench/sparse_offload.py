"""What the sparse adapter moves and keeps, against a dense adapter of the same width.

Real SmolLM2-135M, real NQ-open micro-batches (prompt + answer, right-padded), every
layer adapted, adapter widths ``r`` swept. Per training step (averaged over ``--steps``
steps after one warm-up step), all device-independent:

- host<->device bytes of the sparse adapter (rows down; hidden states, expert ids and
  row gradients up), against offloading a dense adapter of width ``r`` (all weights
  down, all gradients up, fp32);
- the working set: rows sent per layer and micro-batch, as a fraction of ``r``;
- device-resident adapter bytes: the working sets of one step, against a dense adapter
  of width ``r`` trained on the device (weights, gradients, two Adam moments);
- bytes autograd saves for backward in one training forward (activations only: frozen
  weights excluded, the sparse working sets reported apart), sparse against
  ``--method parallel_adapter`` with ``adapter_size=r``;
- CPU time of the Key-Experts selection as a ratio to scoring every key (``h K^T`` over
  all ``r`` keys, then top-K), same hidden states, interleaved, best of ``--repeats``.

The per-step CPU seconds in the JSON are means over few steps: only indicative on a
shared machine.

Writes ``bench/results/sparse_offload.json`` and ``.png``.
Run: ``.venv/bin/python bench/sparse_offload.py [--ranks 1024 4096 16384 --batch 8]``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.report import write_report  # noqa: E402
from meft_ds import memory, methods, options  # noqa: E402
from meft_ds.data import collate, encode, load_split  # noqa: E402
from meft_ds.models.loader import load_model  # noqa: E402
from meft_ds.sparse.router import select_rows  # noqa: E402

MIB = 1024**2


def batches(tokenizer, vocab: int, batch: int, count: int, max_len: int):
    examples = load_split("nq_open", "train", limit=batch * count)
    encoded = [encode(e, tokenizer, max_len, vocab) for e in examples]
    pad = tokenizer.pad_token_id
    return [collate(encoded[i * batch : (i + 1) * batch], pad) for i in range(count)]


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1),
        ignore_index=-100,
    )


def build(name: str, base: torch.nn.Module, values: dict):
    cls = methods.get(name)
    opts = options.build(cls.Options, values, context=name)
    model = copy.deepcopy(base)
    method = cls(opts, model.config)
    method.check_model(model)
    module = method.apply(model)
    module.train()
    return method, module


def saved_bytes(method, module, batch) -> tuple[int, int]:
    """(activation bytes, working-set bytes) autograd saves in one training forward.

    The sparse adapter's working sets are rows of its weights (freed after backward):
    they are counted apart from the activations, as the frozen weights are left out."""
    meter = memory.SavedTensorMeter().exclude_module(module)
    with meter.record():
        logits = method.forward(module, batch["input_ids"], batch["attention_mask"])
        lm_loss(logits, batch["labels"])
    working = 0
    for adapter in getattr(method, "adapters", {}).values():
        if adapter._cache is not None:
            storage = adapter._cache.working.untyped_storage()
            if storage.data_ptr() in meter._seen:
                working += storage.nbytes()
    return meter.total_bytes - working, working


def selection_ratio(runtime, hidden: torch.Tensor, experts: torch.Tensor, repeats: int) -> dict:
    """Key-Experts selection vs scoring all r keys, interleaved, on the same inputs."""
    sizes = runtime.sizes
    keys = runtime.store.keys(sizes.layers[0])
    sparse_t, dense_t = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        select_rows(keys, hidden, experts, sizes.num_experts, sizes.top_k)
        sparse_t.append(time.perf_counter() - start)
        start = time.perf_counter()
        rows = (hidden @ keys.t()).topk(sizes.top_k, dim=1).indices
        torch.unique(rows, sorted=True, return_inverse=True)
        dense_t.append(time.perf_counter() - start)
    # The minimum is the figure least disturbed by other load on a shared machine.
    return {
        "select_s_min": min(sparse_t), "dense_scoring_s_min": min(dense_t),
        "select_s_median": statistics.median(sparse_t),
        "dense_scoring_s_median": statistics.median(dense_t),
        "ratio": min(sparse_t) / min(dense_t),
    }


def run_rank(base, data, rank: int, args) -> dict:
    hidden = base.config.hidden_size
    n_layers = base.config.num_hidden_layers
    values = {"sparse_rank": rank, "sparse_top_k": args.top_k, "sparse_optimizer": args.optimizer}
    method, module = build("sparse", base, values)
    runtime = method.runtime
    sizes = runtime.sizes
    routers = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(routers, lr=args.lr)
    per_step, working_bytes = [], []
    for step, batch in enumerate(data[: args.steps + 1]):
        logits = method.forward(module, batch["input_ids"], batch["attention_mask"])
        lm_loss(logits, batch["labels"]).backward()
        working_bytes.append(
            sum(a._cache.working.numel() * a._cache.working.element_size()
                for a in method.adapters.values())
        )
        optimizer.step()
        optimizer.zero_grad()
        method.after_engine_step(args.lr, 1.0)
        if step > 0:  # the first step warms up (kernel build, allocator)
            per_step.append(method.step_metrics())
    mean = {k: statistics.fmean(m[k] for m in per_step) for k in per_step[0]}
    adapter_params = n_layers * rank * 2 * hidden
    dense_offload = 2 * adapter_params * 4  # fp32 weights down, fp32 gradients up
    sparse_bytes = mean["sparse_h2d_bytes"] + mean["sparse_d2h_bytes"]
    rows_per_layer = mean["sparse_rows_moved"] / n_layers

    # Hidden states of one real micro-batch at the first adapted layer, for the timing.
    flat_tokens = int(data[0]["attention_mask"].sum())
    probe = torch.randn(flat_tokens, hidden)
    with torch.no_grad():
        experts = method.adapters[0].router(probe).topk(sizes.experts_per_token, dim=-1).indices

    saved_sparse, saved_working = saved_bytes(method, module, data[0])
    dense_method, dense_module = build(
        "parallel_adapter", base, {"adapter_size": rank, "adapter_activation": "relu"}
    )
    saved_dense, _ = saved_bytes(dense_method, dense_module, data[0])
    del dense_method, dense_module
    return {
        "rank": rank,
        "sizes": sizes.as_dict() | {"layers": len(sizes.layers)},
        "adapter_params": adapter_params,
        "cpu_store_bytes": runtime.store.nbytes(),
        "tokens_per_step": mean["sparse_tokens"] / n_layers,
        "rows_moved_per_layer": rows_per_layer,
        "working_set_fraction": rows_per_layer / rank,
        "rows_updated_per_step": mean["sparse_rows_updated"],
        "h2d_bytes": mean["sparse_h2d_bytes"],
        "d2h_bytes": mean["sparse_d2h_bytes"],
        "sparse_transfer_bytes": sparse_bytes,
        "dense_offload_transfer_bytes": dense_offload,
        "transfer_ratio_sparse_to_dense": sparse_bytes / dense_offload,
        "device_working_set_bytes": statistics.fmean(working_bytes[1:]),
        "dense_on_device_bytes": adapter_params * 16,
        "saved_activation_bytes_sparse": saved_sparse,
        "saved_working_set_bytes_sparse": saved_working,
        "saved_activation_bytes_dense": saved_dense,
        "selection": selection_ratio(runtime, probe, experts, args.repeats),
        "cpu_seconds_per_step": {
            k: mean[f"sparse_{k}"] for k in ("select_s", "fetch_s", "grad_s", "optim_s")
        },
    }


def machine() -> dict:
    import deepspeed
    import transformers

    return {
        "platform": platform.platform(), "processor": platform.processor(),
        "cpu_count": os.cpu_count(), "python": platform.python_version(),
        "torch": torch.__version__, "deepspeed": deepspeed.__version__,
        "transformers": transformers.__version__, "threads": torch.get_num_threads(),
    }


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["results"]
    ranks = [r["rank"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    ax.plot(ranks, [r["sparse_transfer_bytes"] / MIB for r in rows], "o-", label="sparse")
    ax.plot(ranks, [r["dense_offload_transfer_bytes"] / MIB for r in rows], "s--",
            label="dense adapter offloaded")
    ax.set(xscale="log", yscale="log", xlabel="adapter width r (rows per layer)",
           ylabel="MiB host<->device per step", title="Transfer per training step")
    ax.legend()
    ax = axes[1]
    ax.plot(ranks, [r["device_working_set_bytes"] / MIB for r in rows], "o-",
            label="sparse: working sets")
    ax.plot(ranks, [r["dense_on_device_bytes"] / MIB for r in rows], "s--",
            label="dense on device (+grads, Adam)")
    ax.set(xscale="log", yscale="log", xlabel="adapter width r", ylabel="MiB",
           title="Device-resident adapter bytes")
    ax.legend()
    ax = axes[2]
    ax.plot(ranks, [r["saved_activation_bytes_sparse"] / MIB for r in rows], "o-",
            label="sparse")
    ax.plot(ranks, [r["saved_activation_bytes_dense"] / MIB for r in rows], "s--",
            label="dense parallel adapter")
    ax.set(xscale="log", xlabel="adapter width r", ylabel="MiB saved for backward",
           title="Saved activations, one forward")
    ax.legend()
    cfg = report["config"]
    fig.suptitle(
        f"SmolLM2-135M, all {rows[0]['sizes']['layers']} layers, NQ-open batch {cfg['batch']}, "
        f"top_k {cfg['top_k']}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--top_k", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max_len", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--optimizer", default="cpu_adam", choices=["cpu_adam", "torch"])
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "sparse_offload"))
    args = parser.parse_args()

    torch.manual_seed(0)
    loaded = load_model("smollm2-135m")
    base = loaded.model
    data = batches(loaded.tokenizer, base.config.vocab_size, args.batch, args.steps + 1,
                   args.max_len)
    results = []
    for rank in args.ranks:
        result = run_rank(base, data, rank, args)
        print(json.dumps({k: v for k, v in result.items() if not isinstance(v, dict)}))
        results.append(result)
    report = {
        "benchmark": "sparse_offload", "model": "smollm2-135m", "machine": machine(),
        "config": vars(args), "results": results,
    }
    write_report(report, args.out, plot)


if __name__ == "__main__":
    main()
