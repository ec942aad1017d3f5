"""``--sparse_prefetch`` against the default ordering: selection agreement, loss, time.

Prefetch routes a layer from its attention input (through the FFN norm) instead of its
FFN input, so the rows can be selected and fetched while attention runs. This measures
what that costs and hides, on the real SmolLM2-135M (CPU), NQ-open, through the launcher
(``ds_configs/cpu.json``, DeepSpeed, ``--method sparse``):

1. *Selection agreement* (device-independent): for held-out NQ prompts, per adapted
   layer, the fraction of each token's top-K keys chosen from the attention input that
   the exact FFN-input routing also chooses (key recall), and the Jaccard index of the
   two working sets; at initialisation and after training with prefetch.
2. *Loss*: the same training run (same seed and data) with prefetch off and on,
   interleaved ``--repeats`` times: loss curves and the mean of the last 10 steps.
3. *Time* (ratios only, side by side): step time on / off, and the share of the
   selection + fetch seconds the adapters still waited for (``prefetch_wait_s`` over
   ``select_s + fetch_s``). On the CPU the "device" is the CPU itself: the worker
   overlaps the CPU's key scoring and row gather with attention on the other core; the
   GPU case (copy under attention kernels) is not measured here.

Writes ``bench/results/sparse_prefetch.json`` and ``.png``.
Run: ``nice -n 10 .venv/bin/python bench/sparse_prefetch.py`` (~15 min on 2 cores).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.bench_baselines import run_one  # noqa: E402
from bench.report import write_report  # noqa: E402
from bench.sparse_offload import machine  # noqa: E402


def layer_agreement(adapted, prompts: list[str]) -> list[dict]:
    """Per adapted layer: key recall and working-set Jaccard of attention-input routing
    against FFN-input routing, over ``prompts`` (padding excluded)."""
    from meft_ds.models import arch

    method, module, tokenizer = adapted.method, adapted.module, adapted.tokenizer
    runtime = method.runtime
    layers = arch.layers(module)
    seen: dict[int, dict[str, torch.Tensor]] = {i: {} for i in method.adapters}
    handles = []
    for index in method.adapters:
        layer = layers[index]
        handles.append(layer.input_layernorm.register_forward_pre_hook(
            lambda m, args, i=index: seen[i].__setitem__("attn", args[0].detach())))
        handles.append(layer.post_attention_layernorm.register_forward_hook(
            lambda m, args, out, i=index: seen[i].__setitem__("ffn", out.detach())))
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        method.forward(module, enc["input_ids"], enc["attention_mask"])
    for handle in handles:
        handle.remove()
    real = enc["attention_mask"].reshape(-1).bool()
    k = runtime.sizes.experts_per_token
    out = []
    for index, adapter in method.adapters.items():
        picks = {}
        with torch.no_grad():
            for name, hidden in (("exact", seen[index]["ffn"]),
                                 ("prefetch", layers[index].post_attention_layernorm(
                                     seen[index]["attn"]))):
                x = hidden.reshape(-1, runtime.sizes.hidden)[real]
                experts = adapter.router(x).topk(k, dim=-1).indices
                sel = runtime.store.select(index, x.float(), experts)
                picks[name] = (sel.rows[sel.local], set(sel.rows.tolist()))
        (exact_keys, exact_set), (pre_keys, pre_set) = picks["exact"], picks["prefetch"]
        recall = statistics.fmean(
            len(set(a.tolist()) & set(b.tolist())) / len(a) for a, b in zip(exact_keys, pre_keys)
        )
        out.append({"layer": index, "key_recall": recall,
                    "working_set_jaccard": len(exact_set & pre_set) / len(exact_set | pre_set),
                    "rows_exact": len(exact_set), "rows_prefetch": len(pre_set)})
    return out


def heldout_prompts(n: int) -> list[str]:
    from meft_ds.data import format_prompt, load_split  # the launcher's own reader

    return [format_prompt(e.question) for e in load_split("nq_open", "heldout", limit=n)]


def summarise(records: list[dict]) -> dict:
    timed = records[1:] or records
    mean = lambda key: statistics.fmean(r.get(key, 0.0) for r in timed)  # noqa: E731
    return {"loss": [r["loss"] for r in records], "loss_last10": statistics.fmean(
        r["loss"] for r in records[-10:]), "step_s": mean("step_s"),
        "select_s": mean("sparse_select_s"), "fetch_s": mean("sparse_fetch_s"),
        "prefetch_wait_s": mean("sparse_prefetch_wait_s"),
        "rows_moved": mean("sparse_rows_moved")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rank", type=int, default=2048)
    parser.add_argument("--top_k", type=int, default=64)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "sparse_prefetch"))
    parser.add_argument("--work", default=str(ROOT / "runs" / "bench_sparse_prefetch"))
    args = parser.parse_args()
    from meft_ds.inference import load_adapted

    common = ("--dataset", "nq_open", "--lr", "3e-3", "--seed", "0", "--sparse_rank",
              str(args.rank), "--sparse_top_k", str(args.top_k))
    runs: dict[str, list[dict]] = {"off": [], "on": []}
    for rep in range(args.repeats):
        for mode in ("off", "on"):
            print(f"rep {rep}: prefetch {mode} ...", flush=True)
            flag = ("--sparse_prefetch", "true" if mode == "on" else "false")
            records = run_one("sparse", False, args, Path(args.work) / f"{mode}_{rep}",
                              common + flag)
            runs[mode].append(summarise(records))
    prompts = heldout_prompts(args.prompts)
    adapter_dir = Path(args.work) / "on_0" / "adapter"
    after = layer_agreement(load_adapted(adapter_dir), prompts)
    before = layer_agreement(load_adapted(adapter_dir, weights=False), prompts)
    pairs = [on["step_s"] / off["step_s"] for on, off in zip(runs["on"], runs["off"])]
    hidden = [1.0 - on["prefetch_wait_s"] / max(on["select_s"] + on["fetch_s"], 1e-12)
              for on in runs["on"]]
    report = {
        "benchmark": "sparse_prefetch", "model": "smollm2-135m", "machine": machine(),
        "config": vars(args), "ds_config": "ds_configs/cpu.json", "runs": runs,
        "agreement_init": before, "agreement_trained": after,
        "summary": {
            "key_recall_mean_init": statistics.fmean(x["key_recall"] for x in before),
            "key_recall_mean_trained": statistics.fmean(x["key_recall"] for x in after),
            "jaccard_mean_init": statistics.fmean(x["working_set_jaccard"] for x in before),
            "jaccard_mean_trained": statistics.fmean(x["working_set_jaccard"] for x in after),
            "loss_last10_off": [r["loss_last10"] for r in runs["off"]],
            "loss_last10_on": [r["loss_last10"] for r in runs["on"]],
            "step_time_ratio_on_over_off": pairs,
            "select_fetch_share_hidden": hidden,
        },
        "note": "CPU only, shared 2-core machine: time ratios are side by side and noisy; "
                "agreement and loss are device-independent",
    }
    write_report(report, args.out, plot)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for key, style in (("agreement_init", "--"), ("agreement_trained", "-")):
        rows = report[key]
        label = key.split("_")[1]
        left.plot([r["layer"] for r in rows], [r["key_recall"] for r in rows], style,
                  color="tab:blue", label=f"key recall ({label})")
        left.plot([r["layer"] for r in rows], [r["working_set_jaccard"] for r in rows], style,
                  color="tab:orange", label=f"working-set Jaccard ({label})")
    left.set(xlabel="layer", ylabel="agreement with FFN-input routing", ylim=(0, 1.02),
             title="routing from the attention input")
    left.legend(fontsize=8)
    for mode, color in (("off", "tab:grey"), ("on", "tab:green")):
        for i, run in enumerate(report["runs"][mode]):
            right.plot(run["loss"], color=color, alpha=0.8,
                       label=f"prefetch {mode}" if i == 0 else None)
    right.set(xlabel="step", ylabel="training loss", title="SmolLM2 NQ-open, sparse adapter")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
