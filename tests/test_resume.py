"""Crash after step k, resume, and get exactly the losses of an uninterrupted run."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import subprocess_env

ROOT = Path(__file__).resolve().parents[1]


# lora with dropout (RNG state must resume); sparse: the CPU row store, its Adam moments
# and per-row step counts must resume (a small store on the top layers keeps it quick).
METHODS = {
    "lora": ("--method", "lora", "--lora_dropout", "0.1"),
    # reversible: dropout masks recomputed in backward from the resumed RNG state
    "reversible": ("--method", "reversible", "--rev_layers", "3", "--rev_adapter_dropout", "0.1"),
    "sparse": (
        "--method", "sparse", "--layer_start", "24", "--sparse_rank", "256",
        "--sparse_experts", "16", "--sparse_top_k", "8",
    ),
}


# One method option changed: a resume with it must be refused before anything loads.
OTHER = {"lora": ("--lora_r", "4"), "reversible": ("--rev_adapter_size", "32"),
         "sparse": ("--sparse_top_k", "4")}
EVAL = ("--eval_trained", "2", "--max_new_tokens", "4")


def _args(out: Path, method: str, *extra: str, config: str = "cpu.json") -> list[str]:
    return [
        "--deepspeed", str(ROOT / "ds_configs" / config),
        *METHODS.get(method, ("--method", method)),
        "--max_steps", "6", "--train_examples", "10", "--micro_batch_size", "2",
        "--grad_accum", "2", "--max_seq_len", "40", "--eval_trained", "0",
        "--eval_heldout", "0", "--progress", "false", "--lr", "2e-3",
        "--output_dir", str(out), *extra,
    ]


def _train(out: Path, method: str, *extra: str, code: int = 0,
           config: str = "cpu.json") -> subprocess.CompletedProcess:
    argv = [sys.executable, str(ROOT / "launch" / "train.py"),
            *_args(out, method, *extra, config=config)]
    env = subprocess_env()
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=900, cwd=ROOT)
    assert proc.returncode == code, proc.stderr[-3000:]
    return proc


def _refused(out: Path, method: str, *extra: str, config: str = "cpu.json") -> str:
    """A start that must be refused before anything loads: run in this process (a
    subprocess would spend seconds importing to print one line); its one error line."""
    from meft_ds import cli

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert cli.main(_args(out, method, *extra, config=config)) == 2
    lines = err.getvalue().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def _losses(out: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "loss" in r]
    assert len(steps) == len(set(steps)), f"a step logged twice: {steps}"
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.mark.multiprocess
@pytest.mark.parametrize("method", sorted(METHODS))
def test_resume_reproduces_uninterrupted_losses(tmp_path: Path, method: str) -> None:
    full, split = tmp_path / "full", tmp_path / "split"
    _train(full, method, *EVAL)
    # crash after step 4: step 4's metrics were logged after the last checkpoint (3)
    _train(split, method, *EVAL, "--save_steps", "3", "--stop_after", "4")
    assert sorted(_losses(split)) == [1, 2, 3, 4]
    assert (split / "checkpoints" / "latest").read_text() == "step_0000003"
    assert not list((split / "checkpoints").glob("*.partial"))
    # Frozen weights stay out of checkpoints, the tied lm_head (= embeddings, 113 MB) too:
    # what remains is the adapter with its Adam moments (lora: 59 MB, sparse: < 1 MB).
    saved = sum(f.stat().st_size for f in (split / "checkpoints").rglob("*model_states.pt"))
    assert 0 < saved < 100 * 2**20, saved
    assert "was written by another configuration" in _refused(split, method, *OTHER[method],
                                                              "--resume")
    # a fresh run into it would mix two runs
    assert "already holds a run" in _refused(split, method)
    proc = _train(split, method, *EVAL, "--resume")
    assert "resumed from step 3" in proc.stdout
    want, got = _losses(full), _losses(split)
    assert sorted(got) == list(range(1, 7))
    for step in range(1, 7):
        assert got[step] == want[step], (step, got[step], want[step])
    # the scores before training, measured by the first start, are still reported
    before = json.loads((split / "results.json").read_text())["before"]
    assert before is not None
    assert before == json.loads((full / "results.json").read_text())["before"]


@pytest.mark.multiprocess
def test_resume_under_the_main_config_is_exact(tmp_path: Path) -> None:
    """ds_configs/24gb.json: ZeRO-2 with DeepSpeedCPUAdam offload and bf16. A fresh C++
    optimizer would start step 3 from pow(0.999, 3), one float32 bit off the product an
    uninterrupted run holds, and bf16 magnifies it (meft_ds.cpu_adam_state). With
    --deterministic, so that on a GPU attention's backward is as repeatable as on a CPU."""
    full, split = tmp_path / "full", tmp_path / "split"
    args = ("--adapter_size", "16", "--max_steps", "4", "--deterministic", "true")
    _train(full, "parallel_adapter", *args, config="24gb.json")
    _train(split, "parallel_adapter", *args, "--save_steps", "2", "--stop_after", "3",
           config="24gb.json")
    _train(split, "parallel_adapter", *args, "--save_steps", "2", "--resume", config="24gb.json")
    want, got = _losses(full), _losses(split)
    assert sorted(got) == [1, 2, 3, 4]
    assert all(got[s] == want[s] for s in got), (got, want)
    # Resuming the finished run reports over all its steps, not only the ones it ran.
    _train(split, "parallel_adapter", *args, "--resume", config="24gb.json")
    results = json.loads((split / "results.json").read_text())
    assert results["final_loss"] == want[4] and results["steps"] == 4
    assert results["peak_rss_gib"] > 0 and results["mean_tokens_per_s"] > 0
    # a shorter run than the checkpoint is refused; a longer one notes the new schedule
    assert "past --max_steps 3" in _refused(split, "parallel_adapter", "--adapter_size", "16",
                                            "--max_steps", "3", "--resume", config="24gb.json")
    longer = _train(split, "parallel_adapter", "--adapter_size", "16", "--max_steps", "5",
                    "--resume", config="24gb.json")
    assert "--max_steps 4 -> 5" in longer.stdout and "steps 5 on follow" in longer.stdout
    rates = {r["step"]: r["lr"] for r in map(json.loads, (split / "metrics.jsonl").open())
             if "loss" in r}
    assert sorted(rates) == [1, 2, 3, 4, 5]
    # step 5 runs at the 5-step schedule's rate, not the 4-step one's (0 at its end)
    assert rates[5] == pytest.approx(_scheduled_rate(5, 5)) and _scheduled_rate(4, 5) == 0
    assert rates[5] > 0


def _scheduled_rate(max_steps: int, step: int) -> float:
    """The rate DeepSpeed's scheduler of 24gb.json, filled for ``max_steps`` and _train's
    --lr, gives step ``step`` (step k runs at iteration k: ds_config.start_schedule)."""
    from deepspeed.runtime.lr_schedules import WarmupDecayLR

    from meft_ds import ds_config
    from meft_ds.config import TrainConfig

    raw = json.loads((ROOT / "ds_configs" / "24gb.json").read_text())
    ds = ds_config.finalize(raw, world_size=1, max_steps=max_steps,
                            warmup_ratio=TrainConfig.warmup_ratio, lr=2e-3, micro_batch=2,
                            grad_accum=2, cuda=False)
    params = {k: v for k, v in ds["scheduler"]["params"].items() if k != "warmup_type"}
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = WarmupDecayLR(optimizer, warmup_type=ds["scheduler"]["params"]["warmup_type"],
                          **params)
    sched.step(step)
    return optimizer.param_groups[0]["lr"]


@pytest.mark.multiprocess
def test_ctrl_c_stops_with_one_line_and_keeps_the_checkpoint(tmp_path: Path) -> None:
    import signal

    argv = [sys.executable, str(ROOT / "launch" / "train.py"), "--deepspeed",
            str(ROOT / "ds_configs" / "cpu.json"), "--max_steps", "500", "--train_examples", "8",
            "--micro_batch_size", "2", "--max_seq_len", "32", "--eval_trained", "0",
            "--eval_heldout", "0", "--progress", "false", "--save_steps", "1",
            "--output_dir", str(tmp_path)]
    # SIGINT as a terminal delivers it, whatever this process inherited: a test run started
    # as a background job of a non-interactive shell ignores SIGINT, and children inherit that
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=subprocess_env(), cwd=ROOT,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("step 2/500"):
            break
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "interrupted" in err.strip().splitlines()[-1]
    assert (tmp_path / "checkpoints" / "latest").read_text().startswith("step_")
