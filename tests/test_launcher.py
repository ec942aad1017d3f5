"""The `deepspeed` launcher with the main config, and export -> evaluate round trips."""

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

from meft_ds import cli
from meft_ds.evaluate_cli import main as evaluate_main
from meft_ds.runner import run

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.multiprocess
def test_deepspeed_launcher_runs_24gb_config(tmp_path: Path) -> None:
    """The main job's config: ``--method sparse`` (rows + Adam in the CPU store) with the
    routers under ZeRO-2 + DeepSpeedCPUAdam offload, started like ``make train``, in the
    precision ``make train`` picks on this machine (bf16 where the CPU computes it natively,
    else fp32 with a note); evaluate.py then reproduces the run's own answers."""
    from meft_ds.precision import cpu_native_bf16

    launcher = Path(sys.executable).parent / "deepspeed"
    env = subprocess_env()
    env["PATH"] = f"{launcher.parent}:{env['PATH']}"
    proc = subprocess.run(
        [str(launcher), "--master_port", "29731", "launch/train.py", "--deepspeed",
         "ds_configs/24gb.json", "--max_steps", "3", "--train_examples", "8",
         "--eval_trained", "4", "--eval_heldout", "4", "--max_new_tokens", "6",
         "--progress", "false", "--output_dir", str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=1200, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    bf16 = torch.cuda.is_available() or cpu_native_bf16()
    assert (f"engine: ZeRO stage 2, bf16={bf16}, gradient clipping 1.0, optimizer "
            "DeepSpeedCPUAdam" in proc.stdout)
    assert ("precision: fp32, not the config's bf16" in proc.stdout) == (not bf16)
    assert "in the CPU row store)" in proc.stdout  # the rows are counted too
    assert "step 3/3 loss" in proc.stdout  # --progress false: plain lines instead of bars
    assert "Attempting to get learning rate" not in proc.stdout + proc.stderr
    assert "evaluation" in proc.stdout and "trained exact_match (n=4)" in proc.stdout
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    # the rate each step applied: 2 warm-up steps (DeepSpeed's minimum), then linear decay
    # to total_num_steps 4; step 1 already trains
    peak = json.loads((ROOT / "ds_configs" / "24gb.json").read_text())["optimizer"]["params"]
    assert [r["lr"] for r in records] == pytest.approx(
        [0.5 * peak["lr"], peak["lr"], 0.5 * peak["lr"]])
    assert records[-1]["grad_norm"] > 0
    assert '"method": "sparse"' in proc.stdout
    assert all(r["sparse_rows_updated"] > 0 for r in records)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["after"]["heldout"]["n"] == 4
    assert results["precision"] == ("bf16" if bf16 else "fp32")
    # evaluate.py rebuilds the adapted model in the dtype it trained in and reproduces the
    # run's own answers: same dtype, batch shape and thread count (a process like the run's)
    dtype = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["dtype"]
    assert dtype == results["precision"]
    report_path = tmp_path / "again.json"
    again = subprocess.run(
        [sys.executable, "launch/evaluate.py", "--adapter", str(tmp_path / "adapter"),
         "--split", "train", "--limit", "4", "--max_new_tokens", "6", "--no_progress",
         "--output", str(report_path)],
        capture_output=True, text=True, env=env, timeout=600, cwd=ROOT,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    report = json.loads(report_path.read_text())
    trained = json.loads((tmp_path / "predictions.json").read_text())["trained"]
    assert report["dtype"] == dtype
    assert [r["prediction"] for r in report["predictions"]] == [
        r["prediction"] for r in trained["predictions"]]


@pytest.mark.multiprocess
def test_exported_adapter_evaluates_like_the_trained_model(tmp_path: Path) -> None:
    spec = cli.parse([
        "--deepspeed", str(ROOT / "ds_configs" / "cpu.json"), "--output_dir", str(tmp_path),
        "--train_examples", "6", "--max_steps", "12", "--lr", "3e-3", "--eval_trained", "6",
        "--eval_heldout", "0", "--eval_before", "false", "--progress", "false",
        "--micro_batch_size", "3", "--max_new_tokens", "8", "--eval_steps", "6",
        "--eval_periodic", "3",
    ])
    run(spec)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    periodic = [r for r in lines if "periodic_eval" in r]
    assert [r["step"] for r in periodic] == [6, 12]
    assert all(0.0 <= r["periodic_eval"] <= 1.0 for r in periodic)
    trained = json.loads((tmp_path / "predictions.json").read_text())["trained"]
    report_path = tmp_path / "reports" / "new" / "report.json"  # parents are created
    code = evaluate_main([
        "--adapter", str(tmp_path / "adapter"), "--split", "train", "--limit", "6",
        "--max_new_tokens", "8", "--no_progress", "--output", str(report_path),
    ])
    assert code == 0
    report = json.loads(report_path.read_text())
    assert [r["prediction"] for r in report["predictions"]] == [
        r["prediction"] for r in trained["predictions"]
    ]
    assert report["score"] == trained["score"]
    _damaged_adapters_are_refused(tmp_path / "adapter", tmp_path / "damaged")


def _damaged_adapters_are_refused(adapter: Path, work: Path) -> None:
    """Each damaged copy of a real exported adapter: exit 2 and one line, no traceback."""
    import shutil

    from safetensors.torch import load_file, save_file

    tensors = load_file(str(adapter / "adapter.safetensors"))
    config = json.loads((adapter / "adapter_config.json").read_text())
    wider = {**config, "options": {**config["options"], "adapter_size": 2 * config["options"][
        "adapter_size"]}}
    cases = {
        "lacks": lambda d: save_file(dict(list(tensors.items())[::2]),
                                     str(d / "adapter.safetensors")),
        "cannot be read": lambda d: (d / "adapter.safetensors").write_bytes(b"\xff" * 64),
        "not valid JSON": lambda d: (d / "adapter_config.json").write_text('{"method": '),
        "has shape": lambda d: (d / "adapter_config.json").write_text(json.dumps(wider)),
    }
    for message, damage in cases.items():
        copy = work / message.replace(" ", "_")
        shutil.copytree(adapter, copy)
        damage(copy)
        # in process: each is refused before a model loads (a subprocess per case spent
        # seconds importing to print one line)
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = evaluate_main(["--adapter", str(copy), "--split", "train", "--limit", "1",
                                  "--no_progress"])
        assert code == 2 and message in err.getvalue(), (message, err.getvalue()[-2000:])
        assert len(err.getvalue().strip().splitlines()) == 1, err.getvalue()
    # the run directory instead of its adapter/; fields without a data file
    for argv, message in (
        (["--adapter", str(adapter.parent)], f"a training run's adapter is in {adapter}"),
        (["--adapter", str(adapter), "--question_field", "q", "--dataset", "nq_open"],
         "missing column 'q' for qa records (columns: question, answer)"),
    ):
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            assert evaluate_main([*argv, "--no_progress"]) == 2
        assert message in err.getvalue(), err.getvalue()


@pytest.mark.unit
def test_evaluate_rejects_bad_input(tmp_path: Path, capsys) -> None:
    assert evaluate_main(["--adapter", str(tmp_path)]) == 2
    assert "is not an exported adapter" in capsys.readouterr().err
    assert evaluate_main(["--model", "smollm2-135m", "--limit", "0"]) == 2
    capsys.readouterr()
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    for output, message in ((tmp_path, "is a directory"),
                            (blocker / "r.json", "cannot create")):
        assert evaluate_main(["--model", "smollm2-135m", "--output", str(output)]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.multiprocess
def test_evaluate_scores_the_custom_data_the_adapter_trained_on(tmp_path: Path) -> None:
    """An adapter trained on --data_file records it: evaluate.py without data flags scores
    those questions (not nq_open), with the run's field names."""
    data = tmp_path / "sums.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"What is {a} plus {b}?", "golds": [str(a + b)]})
                            + "\n" for a, b in [(1, 2), (3, 4), (2, 5), (4, 4)]))
    out = tmp_path / "run"
    run(cli.parse([
        "--deepspeed", str(ROOT / "ds_configs" / "cpu.json"), "--output_dir", str(out),
        "--data_file", str(data), "--heldout_file", str(data), "--question_field", "prompt",
        "--answer_field", "golds", "--train_examples", "4", "--max_steps", "2",
        "--eval_trained", "4", "--eval_heldout", "0", "--eval_before", "false",
        "--progress", "false", "--micro_batch_size", "2", "--max_new_tokens", "4",
        "--adapter_size", "8",
    ]))
    trained = json.loads((out / "predictions.json").read_text())["trained"]
    report_path = tmp_path / "report.json"
    assert evaluate_main(["--adapter", str(out / "adapter"), "--split", "train", "--limit", "4",
                          "--max_new_tokens", "4", "--no_progress",
                          "--output", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    assert report["data"] == str(data.resolve()) and report["n"] == 4
    assert [r["prediction"] for r in report["predictions"]] == [
        r["prediction"] for r in trained["predictions"]]
