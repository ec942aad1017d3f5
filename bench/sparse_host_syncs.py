"""Host synchronisation points of the sparse adapter's training step, per layer.

Counts, with :class:`meft_ds.sparse.sync_count.HostSyncCounter` (device-independent:
the same count on a CPU as on a GPU), the points where the compute device would wait
for the host (blocking device->host copies, scalar reads, data-dependent shapes, host
waits on device events) in forward, backward and the optimizer step of the real
SmolLM2-135M under a DeepSpeed engine, at the main job's adapter settings
(``ds_configs/24gb.json``: ``sparse_param_fraction`` 1.0, micro-batch 4, clipping 1.0;
fp32 and ZeRO 0 here: neither changes the adapter's code path), on padded NQ-open
batches. Variants: the GPU default (eager row update on), with ``--sparse_prefetch``,
and the CPU default (eager update off). Reported per step (steps 2 and 3 averaged) and
per adapted layer; "sparse" counts only points in ``meft_ds/sparse/``, "all" every
point (the model's and DeepSpeed's too).

``--mask host`` (default) runs the step as the launcher's trainer does: the runtime gets
the batch's host attention mask first (``Method.before_forward``), so padding is found
without a copy back; ``--mask device`` as a library user's loop (HF ``Trainer``) does: the
mask reaches the adapter only on the device (one wait per micro-batch).

``--label`` stores this checkout's figures under that name (``before`` / ``after`` the
changes of issue 19.6; the GPU kit, ``bench/gpu/checks.sh``, runs it with ``--device
cuda --label cuda`` to check the count is the CPU's), keeping the other labels', in
``bench/results/sparse_host_syncs.json`` (+ ``.png``).
Run: ``nice -n 10 .venv/bin/python bench/sparse_host_syncs.py --label after`` (~2 min).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.report import write_report  # noqa: E402

OUT = ROOT / "bench" / "results" / "sparse_host_syncs"
VARIANTS = {
    "gpu_default": {"sparse_eager_update": True},
    "prefetch": {"sparse_eager_update": True, "sparse_prefetch": True},
    "cpu_default": {"sparse_eager_update": False},
}
PHASES = ("forward", "backward", "step")
KINDS = ("scalar", "dynamic", "d2h", "wait")
GOAL = {"forward": 1.0, "backward": 0.0}


def batches(tokenizer, n: int, steps: int) -> list[tuple[torch.Tensor, ...]]:
    """``steps`` padded micro-batches of ``n`` NQ-open questions with their answers."""
    from meft_ds.data import default_data_dir

    lines = (default_data_dir() / "nq_open" / "NQ-open.dev.jsonl").read_text().splitlines()
    out = []
    for step in range(steps):
        texts = []
        for line in lines[step * n:(step + 1) * n]:
            row = json.loads(line)
            texts.append(f"Question: {row['question']}?\nAnswer: {row['answer'][0]}")
        enc = tokenizer(texts, return_tensors="pt", padding=True)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        out.append((enc["input_ids"], enc["attention_mask"], labels))
    return out


def measure(model, tokenizer, values: dict, device: torch.device, steps: int = 3,
            micro_batch: int = 4, host_mask: bool = True) -> dict:
    """Sync points of ``steps`` training steps of a fresh sparse adapter on ``model``."""
    import copy

    import deepspeed
    import torch.nn.functional as F

    from meft_ds import methods
    from meft_ds import options as opt
    from meft_ds.sparse.sync_count import HostSyncCounter

    cls = methods.get("sparse")
    options = opt.build(cls.Options, {"sparse_param_fraction": 1.0, **values}, context="sparse")
    method = cls(options, model.config)
    module = method.apply(copy.deepcopy(model)).to(device)
    params = [p for p in module.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(
        model=module, model_parameters=params,
        optimizer=torch.optim.AdamW(params, lr=1e-3),
        config={"train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": 1,
                "gradient_clipping": 1.0, "zero_optimization": {"stage": 0}},
    )
    method.attach_engine(engine)
    layers = len(method.adapters)
    per_step = []
    for batch in batches(tokenizer, micro_batch, steps):
        # the host's batch (cloned: on a CPU .to() returns the same tensor, which the
        # counter then marks as the device's)
        host = {"input_ids": batch[0].clone(), "attention_mask": batch[1].clone()}
        input_ids, mask, labels = (t.to(device) for t in batch)  # as the trainer does
        counter = HostSyncCounter().mark_device(engine.module, input_ids, mask, labels)
        with counter:
            if host_mask:
                method.before_forward(host)
            logits = method.forward(engine, input_ids, mask)
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                   labels[:, 1:].reshape(-1), ignore_index=-100)
            method.before_backward()
            engine.backward(loss)
            with counter.phase("step"):
                engine.step()
                method.after_engine_step(1e-3, 1.0)
        per_step.append(counter)
    measured = per_step[1:]  # the first step grows buffers and builds kernels
    result: dict = {"layers": layers, "micro_batches_per_step": 1, "steps": len(measured)}
    for phase in PHASES:
        sparse = Counter()
        every = Counter()
        sites = Counter()
        for counter in measured:
            for kind in KINDS:
                sparse[kind] += counter.total(phase, (kind,), where="meft_ds/sparse/")
                every[kind] += counter.total(phase, (kind,))
            for (p, kind, site), n in counter.sites.items():
                if p == phase:
                    sites[f"{kind} {site}"] += n
        n = len(measured)
        result[phase] = {
            "sparse_per_step": sum(sparse.values()) / n,
            "sparse_per_layer": sum(sparse.values()) / n / layers,
            "sparse_by_kind_per_step": {k: v / n for k, v in sparse.items()},
            "all_per_step": sum(every.values()) / n,
            "all_by_kind_per_step": {k: v / n for k, v in every.items()},
            "async_d2h_per_step": sum(c.total(phase, ("async_d2h",)) for c in measured) / n,
            "sites_per_step": {k: v / n for k, v in sorted(sites.items())},
        }
    return result


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(report["runs"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, phase in zip(axes, ("forward", "backward"), strict=True):
        width = 0.8 / max(1, len(labels))
        for i, label in enumerate(labels):
            variants = report["runs"][label]["variants"]
            ys = [variants[v][phase]["sparse_per_layer"] for v in VARIANTS]
            xs = [j + i * width for j in range(len(VARIANTS))]
            ax.bar(xs, ys, width, label=label)
            for x, y in zip(xs, ys, strict=True):
                ax.text(x, y, f"{y:.2f}", ha="center", va="bottom", fontsize=8)
        ax.axhline(GOAL[phase], color="k", ls="--", lw=1, label=f"goal <= {GOAL[phase]:g}")
        ax.set_xticks([j + width * (len(labels) - 1) / 2 for j in range(len(VARIANTS))],
                      list(VARIANTS))
        ax.set_title(f"{phase}: sparse host sync points per layer per step")
        ax.legend()
    fig.suptitle("SmolLM2-135M, sparse adapter (main job's settings), device-independent count")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", required=True, help="before, after, cuda, ...")
    parser.add_argument("--model", default="smollm2-135m",
                        help="smollm2-135m-shape: random weights (the GPU kit carries none)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--optimizer", default="cpu_adam", choices=("cpu_adam", "torch"),
                        help="the row store's Adam (torch: no op build on a fresh machine)")
    parser.add_argument("--mask", default="host", choices=("host", "device"),
                        help="host: as the launcher's trainer; device: as a library loop")
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args()
    from meft_ds.build_lock import prefer_interpreter_ninja
    from meft_ds.models.loader import load_model
    from meft_ds.runner import free_port

    prefer_interpreter_ninja()  # the venv's ninja: DeepSpeedCPUAdam as built by make setup
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
                       "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(free_port())}.items():
        os.environ.setdefault(key, value)  # one process: DeepSpeed's single-rank group
    torch.manual_seed(0)
    device = torch.device(args.device)
    loaded = load_model(args.model)
    model, tokenizer = loaded.model, loaded.tokenizer
    report = {"runs": {}}
    path = Path(args.out).with_suffix(".json")
    if path.is_file():
        report = json.loads(path.read_text())
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip()
    report["goal_per_layer"] = GOAL
    report["runs"][args.label] = {
        "commit": commit, "model": args.model, "device": str(device), "mask": args.mask,
        "variants": {name: measure(model, tokenizer, {**values, "sparse_optimizer": args.optimizer},
                                   device, host_mask=args.mask == "host")
                     for name, values in VARIANTS.items()},
    }
    write_report(report, args.out, plot)
    for name, result in report["runs"][args.label]["variants"].items():
        print(f"{args.label} {name}: host syncs per layer per step (sparse): " + ", ".join(
            f"{phase} {result[phase]['sparse_per_layer']:.3f}" for phase in PHASES))


if __name__ == "__main__":
    main()
