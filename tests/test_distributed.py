"""Two data-parallel processes (torchrun, gloo) match one process with the same global batch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_losses, subprocess_env

from meft_ds.runner import free_port

ROOT = Path(__file__).resolve().parents[1]
COMMON = [
    str(ROOT / "launch" / "train.py"), "--deepspeed", str(ROOT / "ds_configs" / "cpu.json"),
    "--method", "parallel_adapter", "--max_steps", "4", "--train_examples", "16",
    "--micro_batch_size", "2", "--max_seq_len", "40", "--eval_trained", "0",
    "--eval_heldout", "0", "--progress", "false", "--lr", "3e-3",
]


def _torchrun() -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
            "--master_addr", "127.0.0.1", "--master_port", str(free_port())]


def _run(argv: list[str], code: int = 0) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, capture_output=True, text=True, env=subprocess_env(),
                          timeout=900, cwd=ROOT)
    assert proc.returncode == code, proc.stderr[-3000:]
    return proc


@pytest.mark.multiprocess
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
    a, b = run_losses(one), run_losses(two)
    assert len(a) == len(b) == 4
    for x, y in zip(a, b):
        assert abs(x - y) <= 1e-5 * max(1.0, abs(x)), (a, b)
    assert a[0] != a[-1]
    # Tokens per step: both ranks' summed, as one process counts its two micro-batches.
    assert _tokens(one) == _tokens(two)


def _tokens(out: Path) -> list[int]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["tokens"] for r in rows if "loss" in r]


@pytest.mark.multiprocess
def test_two_rank_resume_restores_each_ranks_dropout(tmp_path: Path) -> None:
    """Each rank draws its own dropout masks: a resume restores every rank's RNG, so the
    losses equal an uninterrupted two-rank run's."""
    full, split = tmp_path / "full", tmp_path / "split"
    lora = [*COMMON, "--method", "lora", "--lora_r", "4", "--lora_dropout", "0.1"]
    _run([*_torchrun(), *lora, "--output_dir", str(full)])
    _run([*_torchrun(), *lora, "--save_steps", "2", "--stop_after", "3",
          "--output_dir", str(split)])
    _run([*_torchrun(), *lora, "--save_steps", "2", "--resume", "--output_dir", str(split)])
    assert run_losses(split) == run_losses(full) and len(run_losses(full)) == 4
    assert len(list((split / "checkpoints" / "step_0000002").glob("rng_rank*.pt"))) == 2
    # One rank would halve the global batch and shift every later example: refused.
    refused = _run([sys.executable, *lora, "--resume", "--output_dir", str(split)], code=2)
    assert "global batches of 4 examples" in refused.stderr
