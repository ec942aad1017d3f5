"""Two data-parallel processes (torchrun, gloo) match one process with the same global batch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import subprocess_env

from meft_ds.runner import free_port

ROOT = Path(__file__).resolve().parents[1]
COMMON = [
    str(ROOT / "launch" / "train.py"), "--deepspeed", str(ROOT / "ds_configs" / "cpu.json"),
    "--method", "parallel_adapter", "--max_steps", "4", "--train_examples", "16",
    "--micro_batch_size", "2", "--max_seq_len", "40", "--eval_trained", "0",
    "--eval_heldout", "0", "--progress", "false", "--lr", "3e-3",
]


def _losses(out: Path) -> list[float]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def test_two_ranks_equal_one_rank_with_accumulation(tmp_path: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    single = subprocess.run(
        [sys.executable, *COMMON, "--grad_accum", "2", "--output_dir", str(one)],
        capture_output=True, text=True, env=subprocess_env(), timeout=900, cwd=ROOT,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    double = subprocess.run(
        [*torchrun, *COMMON, "--grad_accum", "1", "--output_dir", str(two)],
        capture_output=True, text=True, env=subprocess_env(), timeout=900, cwd=ROOT,
    )
    assert double.returncode == 0, double.stderr[-3000:]
    a, b = _losses(one), _losses(two)
    assert len(a) == len(b) == 4
    for x, y in zip(a, b):
        assert abs(x - y) <= 1e-5 * max(1.0, abs(x)), (a, b)
    assert a[0] != a[-1]
