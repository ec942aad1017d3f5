"""READ against LoRA and the dense parallel adapter on SmolLM2-135M.

Measures, in one process and side by side:

- bytes autograd saves for backward in one training forward (+ the loss), split into
  activations and frozen parameters autograd keeps a reference to (device-independent);
- step time (forward + backward + AdamW) as a ratio to LoRA, the methods interleaved
  round by round so machine noise hits all of them alike;
- optionally (``--em_steps N``), NQ-open knowledge injection through the real launcher:
  exact match on the trained and held-out questions after the same N steps for each
  method.

Writes ``bench/results/read.json`` and ``bench/results/read.png``.
Run: ``.venv/bin/python bench/bench_read.py [--with_full] [--em_steps 160]``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from meft_ds import methods, options  # noqa: E402
from meft_ds.data import default_data_dir  # noqa: E402
from meft_ds.models.loader import load_model  # noqa: E402

MIB = 1024**2


class SavedBytes:
    """Bytes autograd saves inside a ``with`` block; storages counted once, parameters apart."""

    def __init__(self, params: list[torch.Tensor]) -> None:
        self.param_keys = {p.untyped_storage().data_ptr() for p in params}
        self.seen: set[int] = set()
        self.activation_bytes = 0
        self.param_bytes = 0

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        key = storage.data_ptr() or id(storage)
        if key not in self.seen:
            self.seen.add(key)
            if key in self.param_keys:
                self.param_bytes += storage.nbytes()
            else:
                self.activation_bytes += storage.nbytes()
        return tensor

    def __enter__(self) -> SavedBytes:
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._ctx.__exit__(*exc)


def text_batch(tokenizer, seq: int, batch: int) -> torch.Tensor:
    """``[batch, seq]`` token ids of real text (NQ-open questions run together)."""
    path = default_data_dir() / "nq_open" / "NQ-open.dev.jsonl"
    ids: list[int] = []
    with path.open() as handle:
        for line in handle:
            ids += tokenizer(json.loads(line)["question"] + "? ")["input_ids"]
            if len(ids) >= seq * batch:
                break
    return torch.tensor(ids[: seq * batch]).view(batch, seq)


def loss_of(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy over every position, in fp32 (as the trainer computes it)."""
    return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten())


def method_options(name: str, read_hidden: int) -> dict[str, object]:
    return {"read_hidden": read_hidden} if name == "read" else {}


def prepare(name: str, base: torch.nn.Module, read_hidden: int):
    """(method, module, optimizer) for ``name`` on a private copy of ``base``."""
    cls = methods.get(name)
    method = cls(options.build(cls.Options, method_options(name, read_hidden)), base.config)
    module = method.apply(copy.deepcopy(base))
    module.train()
    trainable = [p for p in module.parameters() if p.requires_grad]
    return method, module, torch.optim.AdamW(trainable, lr=1e-5)


def saved_bytes(method, module, ids, mask) -> dict[str, float]:
    """Saved bytes of one forward and of the loss on its logits."""
    params = list(module.parameters())
    with SavedBytes(params) as fwd:
        logits = method.forward(module, ids, mask)
    with SavedBytes(params) as head:
        loss = loss_of(logits, ids)
    del loss, logits
    return {
        "forward_activation_mib": fwd.activation_bytes / MIB,
        "forward_param_refs_mib": fwd.param_bytes / MIB,
        "loss_activation_mib": head.activation_bytes / MIB,
        "total_activation_mib": (fwd.activation_bytes + head.activation_bytes) / MIB,
    }


def train_step(method, module, optimizer, ids, mask) -> float:
    """Seconds for forward + backward + optimizer step."""
    start = time.perf_counter()
    loss = loss_of(method.forward(module, ids, mask), ids)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def knowledge_injection(
    name: str, args: argparse.Namespace, lr: float | None = None, hidden: int | None = None,
) -> dict[str, object]:
    """Train ``name`` through the launcher on NQ-open and return its results.json."""
    out = ROOT / "runs" / "bench_read" / Path(args.out).name / name  # run dirs: not committed
    extra = ["--read_hidden", str(hidden or args.read_hidden)] if name == "read" else []
    if lr:
        extra += ["--lr", str(lr)]
    cmd = [
        sys.executable, str(ROOT / "launch" / "train.py"), "--deepspeed", "ds_configs/cpu.json",
        "--method", name, "--max_steps", str(args.em_steps),
        "--train_examples", str(args.em_examples), "--eval_trained", str(args.em_examples),
        "--eval_heldout", str(args.em_heldout), "--progress", "false",
        "--output_dir", str(out), *extra,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{name} launcher run failed:\n{done.stderr[-2000:]}")
    result = json.loads((out / "results.json").read_text())
    result["wall_s"] = time.perf_counter() - start
    return result


def injection_rows(rows: dict[str, dict], args: argparse.Namespace) -> None:
    """NQ-open runs of LoRA and READ (and READ at ``--read_lr``), added to ``rows``."""
    for name in ("lora", "read"):
        rows.setdefault(name, {})["em"] = knowledge_injection(name, args)
        print(name, "EM", json.dumps(rows[name]["em"]["after"]), flush=True)
    if args.read_lr:
        tagged = argparse.Namespace(**{**vars(args), "out": str(Path(args.out) / "lr")})
        rows[f"read_lr{args.read_lr:g}"] = {"em": knowledge_injection("read", tagged, args.read_lr)}
    if args.read_wide:
        tagged = argparse.Namespace(**{**vars(args), "out": str(Path(args.out) / "wide")})
        rows[f"read_h{args.read_wide}_lr{args.read_lr or 1e-3:g}"] = {
            "em": knowledge_injection("read", tagged, args.read_lr, args.read_wide)
        }


def add_knowledge_injection(args: argparse.Namespace) -> None:
    """``--em_only``: run the NQ-open comparison and add it to an existing read.json."""
    path = Path(args.out) / "read.json"
    report = json.loads(path.read_text())
    injection_rows(report["methods"], args)
    for key in ("em_steps", "em_examples", "em_heldout", "read_lr", "read_wide"):
        report["config"][key] = getattr(args, key)
    path.write_text(json.dumps(report, indent=2))
    plot(report, path.with_suffix(".png"))
    print(f"updated {path}")


def machine() -> dict[str, object]:
    import deepspeed
    import peft
    import transformers

    return {
        "platform": platform.platform(), "processor": platform.processor(),
        "cpu_count": os.cpu_count(), "python": platform.python_version(),
        "torch": torch.__version__, "transformers": transformers.__version__,
        "deepspeed": deepspeed.__version__, "peft": peft.__version__,
    }


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["methods"]
    names = [n for n in rows if "saved" in rows[n]]
    has_em = any("em" in rows[n] for n in names)
    fig, axes = plt.subplots(1, 3 if has_em else 2, figsize=(13 if has_em else 9, 4))
    fwd = [rows[n]["saved"]["forward_activation_mib"] for n in names]
    head = [rows[n]["saved"]["loss_activation_mib"] for n in names]
    axes[0].bar(names, fwd, label="forward")
    axes[0].bar(names, head, bottom=fwd, label="loss (logits)")
    axes[0].set_ylabel("MiB saved for backward")
    cfg = report["config"]
    axes[0].set_title(f"saved activations, seq {cfg['seq']} x batch {cfg['batch']}")
    axes[0].legend()
    timed = [n for n in names if "step_time_vs_lora" in rows[n]]
    axes[1].bar(timed, [rows[n]["step_time_vs_lora"] for n in timed], color="tab:orange")
    axes[1].axhline(1.0, color="grey", lw=0.8)
    axes[1].set_ylabel("step time / LoRA step time")
    axes[1].set_title("step time (same process, interleaved)")
    if has_em:
        em_names = [n for n in rows if "em" in rows[n]]
        width = 0.38
        xs = range(len(em_names))
        for shift, split in ((-width / 2, "trained"), (width / 2, "heldout")):
            values = [100 * rows[n]["em"]["after"].get(split, {}).get("score", 0.0)
                      for n in em_names]
            axes[2].bar([x + shift for x in xs], values, width, label=split)
        axes[2].set_xticks(list(xs), em_names)
        axes[2].set_ylabel("exact match (%)")
        axes[2].set_title(f"NQ-open after {cfg['em_steps']} steps")
        axes[2].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per method")
    parser.add_argument("--time_batch", type=int, default=1,
                        help="batch of the timed steps (the first rows of the measured batch; "
                        "a shared 2-core/23 GB machine cannot hold LoRA's batch-4 step)")
    parser.add_argument("--read_hidden", type=int, default=128)
    parser.add_argument("--with_full", action="store_true", help="also full fine-tuning")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--em_steps", type=int, default=0, help="0 = skip the NQ-open runs")
    parser.add_argument("--em_examples", type=int, default=64)
    parser.add_argument("--em_heldout", type=int, default=32)
    parser.add_argument("--read_lr", type=float, default=None,
                        help="extra NQ run of READ with this learning rate")
    parser.add_argument("--read_wide", type=int, default=0,
                        help="extra NQ run of READ with this hidden size (at --read_lr)")
    parser.add_argument("--em_only", action="store_true",
                        help="only the NQ-open runs, added to the existing read.json")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args()
    if args.em_only:
        add_knowledge_injection(args)
        return
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    names = ["lora", "parallel_adapter", "read"] + (["full"] if args.with_full else [])
    loaded = load_model("smollm2-135m")
    ids = text_batch(loaded.tokenizer, args.seq, args.batch)
    mask = torch.ones_like(ids)
    rows: dict[str, dict] = {}
    prepared = {}
    timed = ["lora", "parallel_adapter", "read"]  # full: saved bytes only (RAM, time)
    for name in names:
        method, module, optimizer = prepare(name, loaded.model, args.read_hidden)
        rows[name] = {
            "trainable_params": sum(p.numel() for p in module.parameters() if p.requires_grad),
            "saved": saved_bytes(method, module, ids, mask),
        }
        print(name, json.dumps(rows[name]), flush=True)
        if name in timed:
            prepared[name] = (method, module, optimizer)
        del method, module, optimizer

    times: dict[str, list[float]] = {n: [] for n in timed}
    for round_ in range(args.steps + 1):  # round 0 warms up
        for name in timed:
            seconds = train_step(*prepared[name], ids[: args.time_batch],
                                 mask[: args.time_batch])
            if round_:
                times[name].append(seconds)
            print(f"round {round_} {name}: {seconds:.2f}s", flush=True)
    lora_time = statistics.median(times["lora"])
    for name in timed:
        rows[name]["step_times_s"] = times[name]
        rows[name]["step_time_vs_lora"] = statistics.median(times[name]) / lora_time
    del prepared

    if args.em_steps:
        injection_rows(rows, args)

    base = rows["lora"]["saved"]["total_activation_mib"]
    for name in names:
        rows[name]["saved_vs_lora"] = rows[name]["saved"]["total_activation_mib"] / base
    if "full" in rows:
        full = rows["full"]["saved"]["total_activation_mib"]
        rows["read"]["saved_reduction_vs_full"] = 1 - rows["read"]["saved"][
            "total_activation_mib"] / full
    report = {
        "benchmark": "read",
        "machine": machine(),
        "config": {**vars(args), "model": "smollm2-135m", "dtype": "float32", "timed": timed,
                   "optimizer": "torch AdamW (time ratios)", "data": "NQ-open questions"},
        "methods": rows,
        "notes": [
            "saved bytes: torch.autograd.graph.saved_tensors_hooks, storages counted once; "
            "frozen parameters autograd keeps a reference to are listed apart "
            "(forward_param_refs_mib) and not counted as activations",
            "loss_activation_mib is the fp32 cross-entropy over the vocabulary: the same for "
            "every method",
            "step times only as ratios to LoRA, measured interleaved in one process",
        ],
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "read.json").write_text(json.dumps(report, indent=2))
    plot(report, out / "read.png")
    print(f"wrote {out / 'read.json'} and {out / 'read.png'}")


if __name__ == "__main__":
    main()
