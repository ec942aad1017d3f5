"""Loading real-format checkpoints: host RAM peak per load, and per rank under ZeRO-3.

(a) A checkpoint on disk as real 7B checkpoints are (bf16 safetensors, the
``llama2-7b-shape`` one that :func:`meft_ds.models.loader.shape_dir` writes, seed 0),
loaded with :func:`meft_ds.models.loader.load_model` in fp32 and in bf16, each load in a
fresh process: the kernel's RSS high-water mark (``VmHWM``: file pages of the mapped
checkpoint included), the anonymous RSS peak (sampled every 10 ms: the process's own
copy of the weights) and the load time, fp32's as a ratio to bf16's in the same run
(absolute times on a CPU are not reported). A 7B fp32 load needs 27 GB, more than this
24 GiB machine has: fp32 and bf16 are compared on the 7B config truncated to 4 layers
(same width; its own checkpoint, written the same way), and bf16 alone at full depth.

(b) Two ranks (``torchrun --nproc_per_node 2``, gloo) under a ZeRO-3 config (bf16) load
the 7B config truncated to 2 and to 4 layers (two whole copies fit in RAM; the growth
with depth is what matters at 32) with partitioned init
(what the runner does: ``load_model(..., zero3=config)``) and without (the whole model on
every rank, partitioned only by ``deepspeed.initialize``), then build the engine: each
rank's RSS peak, anonymous RSS peak, and the device-independent figure, the bytes of
parameters the rank holds after the load and after the engine.

    python bench/model_load.py            # ~6 min here; writes the 4- and 2-layer
                                          # checkpoints first (the 7B one: ~2.5 min)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from meft_ds.models import loader  # noqa: E402
from meft_ds.models.sizes import count_params  # noqa: E402

BASE = "llama2-7b-shape"
ZERO3_LAYERS = (2, 4)  # part (b): how each path's per-rank peak grows with depth
GIB = 1024**3


def shape(layers: int | None) -> str:
    """The shape name of the 7B config at ``layers`` layers (None: full depth), registered
    with the loader so that it writes and loads its checkpoint like the full one."""
    if layers is None:
        return BASE
    name = f"{BASE}-{layers}layers"
    loader.SHAPES[name] = dict(loader.SHAPES[BASE], num_hidden_layers=layers)
    return name


class Peaks:
    """This process's RSS peaks: the kernel's high-water mark, and the anonymous RSS
    sampled every 10 ms by a thread (file-backed pages of a mapped checkpoint are
    counted in RSS but are page cache, not a copy the process made)."""

    def __init__(self) -> None:
        self.anon = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def status() -> dict[str, int]:
        fields = {}
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                fields[key] = int(value.split()[0]) * 1024
        return fields

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            self.anon = max(self.anon, self.status()["RssAnon"])

    def read(self) -> dict[str, int]:
        now = self.status()
        self.anon = max(self.anon, now["RssAnon"])
        return {"peak_rss": now["VmHWM"], "peak_anon_rss": self.anon, "rss": now["VmRSS"],
                "anon_rss": now["RssAnon"]}

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def held_bytes(model: torch.nn.Module) -> int:
    """Bytes of parameters this process holds: a ZeRO-3 partitioned weight's share
    (``ds_tensor``), else the whole tensor."""
    return sum(getattr(p, "ds_tensor", p).numel() * p.element_size()
               for p in model.parameters())


def load_case(layers: int | None, dtype: str) -> dict[str, Any]:
    """One load in this (fresh) process, then one read of every weight (a bf16 load of a
    bf16 checkpoint maps the file: its pages are read when first used)."""
    name = shape(layers)
    peaks = Peaks()
    before = peaks.read()
    start = time.perf_counter()
    model = loader.load_model(name, dtype=getattr(torch, dtype)).model
    loaded = time.perf_counter()
    after_load = peaks.read()
    with torch.no_grad():
        for param in model.parameters():
            param.sum()  # reads every page; no copy (the sum accumulates in fp32 registers)
    read = time.perf_counter()
    after_read = peaks.read()
    peaks.stop()
    return {"layers": model.config.num_hidden_layers, "dtype": dtype,
            "params": sum(p.numel() for p in model.parameters()),
            "param_bytes": held_bytes(model), "rss_before": before["rss"],
            "after_load": {k: after_load[k] for k in ("peak_rss", "peak_anon_rss")},
            "after_reading_every_weight": {k: after_read[k] for k in ("peak_rss",
                                                                      "peak_anon_rss")},
            "seconds": loaded - start, "seconds_with_read": read - start}


def zero3_config() -> dict[str, Any]:
    """ds_configs/cpu.json at ZeRO-3 in bf16 (a 7B-width model's frozen base as the
    multinode config holds it), resolved for 2 ranks."""
    from meft_ds import ds_config

    raw = json.loads((ROOT / "ds_configs" / "cpu.json").read_text())
    raw.pop("meft")
    raw["bf16"] = {"enabled": True}
    raw["zero_optimization"] = {"stage": 3}
    return ds_config.finalize(raw, world_size=2, max_steps=10, warmup_ratio=0.0, lr=1e-4,
                              micro_batch=1, grad_accum=1, cuda=False)


def zero3_rank(layers: int, partitioned: bool, out: Path) -> None:
    """One rank of part (b): load, then build the engine (the final norm trainable)."""
    from meft_ds import ds_config
    from meft_ds.runner import start_process

    name = shape(layers)
    start_process(600)
    rank = int(os.environ["RANK"])
    config = zero3_config()
    peaks = Peaks()
    before = peaks.read()
    model = loader.load_model(name, dtype=torch.bfloat16,
                              zero3=config if partitioned else None).model
    after_load = {**peaks.read(), "param_bytes": held_bytes(model)}
    for param in model.parameters():
        param.requires_grad_(False)
    model.model.norm.weight.requires_grad_(True)
    engine, *_ = ds_config.initialize(model=model, model_parameters=[model.model.norm.weight],
                                      config=config)
    after_engine = {**peaks.read(), "param_bytes": held_bytes(engine.module)}
    peaks.stop()
    record = {"rank": rank, "rss_before": before["rss"], "after_load": after_load,
              "after_engine": after_engine}
    (out / f"rank{rank}.json").write_text(json.dumps(record))


def run_fresh(args: list[str], timeout: int = 900) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, *args], env=env, cwd=ROOT, timeout=timeout,
                          capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{' '.join(args)} failed:\n{proc.stderr[-3000:]}")


def measure() -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="model_load_"))
    me = str(Path(__file__).resolve())
    loads = []
    # the pair in one run, alternating, each file in the page cache before its timed loads
    for layers, dtype in ((4, "bfloat16"), (4, "float32"), (4, "bfloat16"), (4, "float32"),
                          (None, "bfloat16")):
        target = tmp / f"load_{layers}_{dtype}.json"
        run_fresh([me, "--load", str(layers or 0), dtype, str(target)])
        loads.append(json.loads(target.read_text()))
    ratios = {}
    for key in ("seconds", "seconds_with_read"):
        pair = {d: min(x[key] for x in loads if x["layers"] == 4 and x["dtype"] == d)
                for d in ("bfloat16", "float32")}
        ratios[key] = pair["float32"] / pair["bfloat16"]
    for case in loads:
        del case["seconds"], case["seconds_with_read"]  # absolute CPU times: not reported
    from meft_ds.runner import free_port

    zero3: dict[str, list] = {"partitioned_init": [], "whole_then_partitioned": []}
    for layers in ZERO3_LAYERS:
        for partitioned in (True, False):
            where = tmp / f"zero3_{layers}_{partitioned}"
            where.mkdir()
            run_fresh(["-m", "torch.distributed.run", "--nproc_per_node", "2",
                       "--master_addr", "127.0.0.1", "--master_port", str(free_port()), me,
                       "--zero3", str(layers), str(int(partitioned)), str(where)])
            zero3["partitioned_init" if partitioned else "whole_then_partitioned"] += [
                {"layers": layers, **json.loads((where / f"rank{r}.json").read_text())}
                for r in (0, 1)]
    shutil.rmtree(tmp)
    return {"loads": _dedupe(loads),
            "fp32_over_bf16_time_4layers": {"load": ratios["seconds"],
                                            "load_and_read": ratios["seconds_with_read"]},
            "zero3_two_ranks": zero3}


def _dedupe(loads: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (layers, dtype): the larger peaks of its repeats (the repeats differ
    by what the page cache held)."""
    rows: dict[tuple, dict[str, Any]] = {}
    for case in loads:
        key = (case["layers"], case["dtype"])
        if key in rows:
            for when in ("after_load", "after_reading_every_weight"):
                for field in ("peak_rss", "peak_anon_rss"):
                    rows[key][when][field] = max(rows[key][when][field], case[when][field])
        else:
            rows[key] = dict(case)
    return list(rows.values())


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    rows = result["loads"]
    labels = [f"{r['layers']} layers\n{r['dtype']}" for r in rows]
    xs = range(len(rows))
    w = 0.2
    series = [(lambda r: r["after_load"]["peak_rss"], "peak RSS after load"),
              (lambda r: r["after_reading_every_weight"]["peak_rss"],
               "peak RSS after reading every weight"),
              (lambda r: r["after_reading_every_weight"]["peak_anon_rss"],
               "peak anonymous RSS (the process's own copy)"),
              (lambda r: r["param_bytes"], "parameter bytes")]
    for i, (value, label) in enumerate(series):
        left.bar([x + (i - 1.5) * w for x in xs], [value(r) / GIB for r in rows], w,
                 label=label)
    left.set_xticks(list(xs), labels)
    left.set_ylabel("GiB")
    times = result["fp32_over_bf16_time_4layers"]
    left.set_title(f"{BASE} checkpoint (bf16 on disk) loaded: host RAM\n"
                   f"fp32/bf16 time at 4 layers: load {times['load']:.1f}x, "
                   f"load + first read {times['load_and_read']:.1f}x", fontsize=10)
    left.legend(fontsize=8)
    z = result["zero3_two_ranks"]
    cases = [(k, r) for k in ("partitioned_init", "whole_then_partitioned") for r in z[k]]
    xs = range(len(cases))
    right.bar([x - 0.27 for x in xs], [r["after_engine"]["peak_rss"] / GIB for _, r in cases],
              0.27, label="peak RSS")
    right.bar(list(xs), [r["after_engine"]["peak_anon_rss"] / GIB for _, r in cases], 0.27,
              label="peak anonymous RSS")
    right.bar([x + 0.27 for x in xs], [r["after_load"]["param_bytes"] / GIB for _, r in cases],
              0.27, label="parameter bytes held after load")
    right.set_xticks(list(xs), [f"{'partitioned' if k == 'partitioned_init' else 'whole'}\n"
                                f"{r['layers']}L r{r['rank']}" for k, r in cases], fontsize=8)
    right.set_ylabel("GiB")
    right.set_title("ZeRO-3 init, 2 ranks, 7B config at 2 and 4 layers (bf16): per rank")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--load", nargs=3, metavar=("LAYERS", "DTYPE", "OUT"),
                        help="(internal) one load in this process; LAYERS 0: full depth")
    parser.add_argument("--zero3", nargs=3, metavar=("LAYERS", "PARTITIONED", "OUT"),
                        help="(internal) one rank of the ZeRO-3 part")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args()
    if args.load:
        layers, dtype, out = args.load
        Path(out).write_text(json.dumps(load_case(int(layers) or None, dtype)))
        return
    if args.zero3:
        layers, partitioned, out = args.zero3
        zero3_rank(int(layers), partitioned == "1", Path(out))
        return
    out = Path(args.out)
    for layers in (*ZERO3_LAYERS, None):  # the checkpoints, written once (not measured)
        loader.shape_dir(shape(layers))
    result = {
        "bench": "model_load",
        "checkpoint": f"{BASE}: random weights (seed 0) saved as bf16 safetensors by "
                      "loader.shape_dir, loaded as any checkpoint directory",
        "note": "this machine has 24 GiB of RAM: a 7B fp32 load (27 GB) does not fit, so "
                "fp32 and bf16 are compared on the 7B config truncated to 4 layers (same "
                "width), and bf16 alone is loaded at full depth (32 layers). Each load in "
                "a fresh process, then every weight read once (a bf16 load of the bf16 "
                "checkpoint maps the file: pages are read on first use). peak_rss is the "
                "kernel's VmHWM (file pages of the mapped checkpoint included: page cache, "
                "shared by the processes mapping it), peak_anon_rss the anonymous RSS "
                "sampled every 10 ms (the process's own copy). The checkpoint files were "
                "in the page cache (written or read just before). Times only as fp32/bf16 "
                "ratios (CPU). zero3_two_ranks: per rank, 7B config at 2 and 4 layers, "
                "bf16, ZeRO-3; param_bytes = bytes of parameters the rank holds (a "
                "partitioned weight's share).",
        "params": {str(n): count_params(loader.model_config(shape(n)))
                   for n in (*ZERO3_LAYERS, None)},
        **measure(),
        "host": {"cpus": os.cpu_count(), "machine": platform.machine(),
                 "ram_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
                                  / GIB, 1),
                 "torch": torch.__version__},
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "model_load.json").write_text(json.dumps(result, indent=2))
    plot(result, out / "model_load.png")
    print(json.dumps({k: v for k, v in result.items() if k != "zero3_two_ranks"}, indent=1))
    print(json.dumps(result["zero3_two_ranks"], indent=1))


if __name__ == "__main__":
    main()
