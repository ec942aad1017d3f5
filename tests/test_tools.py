"""launch/generate.py, --report_to and launch/plot.py: on a real tiny run's output and on
hand-written inputs."""

from __future__ import annotations

import importlib.machinery
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from conftest import subprocess_env

from meft_ds import generate_cli, plot, reporting
from meft_ds.config import TrainConfig
from meft_ds.errors import UserError, cli_message

ROOT = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"


def _events(directory: Path) -> dict[str, list[tuple[int, float]]]:
    """The scalars TensorBoard reads from ``directory``: tag -> [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(directory))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)]
            for tag in acc.Tags()["scalars"]}


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory) -> Path:
    """A two-step LoRA run through launch/train.py, logged to TensorBoard, with a
    periodic evaluation each step."""
    out = tmp_path_factory.mktemp("run")
    proc = subprocess.run(
        [sys.executable, "launch/train.py", "--deepspeed", "ds_configs/cpu.json",
         "--model", "smollm2-135m", "--method", "lora", "--lora_r", "4", "--max_steps", "2",
         "--train_examples", "8", "--micro_batch_size", "2", "--max_seq_len", "48",
         "--eval_trained", "0", "--eval_heldout", "0", "--eval_steps", "1",
         "--eval_periodic", "2", "--max_new_tokens", "4", "--save_final", "false",
         "--progress", "false", "--report_to", "tensorboard", "--output_dir", str(out)],
        capture_output=True, text=True, env=subprocess_env(), timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return out


def _generate(*argv: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "launch/generate.py", *argv], input=stdin,
                          capture_output=True, text=True, env=subprocess_env(), timeout=600,
                          cwd=ROOT)


@pytest.mark.multiprocess
@pytest.mark.xdist_group("lora_run")
def test_generate_answers_prompts_from_arguments_a_file_and_stdin(lora_run: Path,
                                                                 tmp_path: Path) -> None:
    adapter = str(lora_run / "adapter")
    prompts = ["who wrote the iliad", "what is the capital of france"]
    given = _generate("--adapter", adapter, *prompts, "--max_new_tokens", "6", "--jsonl")
    assert given.returncode == 0, given.stderr[-3000:]
    rows = [json.loads(line) for line in given.stdout.splitlines()]
    assert [r["prompt"] for r in rows] == prompts
    assert all(isinstance(r["answer"], str) for r in rows) and any(r["answer"] for r in rows)
    # the same prompts from a file: the same greedy answers, printed under each prompt
    listed = tmp_path / "prompts.txt"
    listed.write_text(f"{prompts[0]}\n\n{prompts[1]}\n")
    from_file = _generate("--adapter", adapter, "--prompts_file", str(listed),
                          "--max_new_tokens", "6")
    assert from_file.returncode == 0, from_file.stderr[-3000:]
    assert from_file.stdout == "".join(f"> {r['prompt']}\n{r['answer']}\n\n" for r in rows)
    # stdin, one prompt a line (blank lines skipped), sampled in the chat format
    piped = _generate("--adapter", adapter, "--max_new_tokens", "6", "--do_sample",
                      "--temperature", "0.7", "--top_p", "0.9", "--prompt_format", "chat",
                      "--jsonl", stdin=f"{prompts[0]}\n\n{prompts[1]}\n")
    assert piped.returncode == 0, piped.stderr[-3000:]
    assert [json.loads(line)["prompt"] for line in piped.stdout.splitlines()] == prompts
    assert piped.stderr == ""  # no library warnings for the user


@pytest.mark.unit
def test_generate_refuses_bad_paths_and_options(tmp_path: Path, capsys) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    adapter = ["--adapter", str(tmp_path)]
    cases = {
        "is not an exported adapter": [*adapter, "q"],
        "--top_p applies to sampling: add --do_sample": [*adapter, "--top_p", "0.5", "q"],
        "--temperature must be > 0": [*adapter, "--do_sample", "--temperature", "0", "q"],
        "--top_p must be in (0, 1]": [*adapter, "--do_sample", "--top_p", "1.5", "q"],
        "--max_new_tokens must be > 0": [*adapter, "--max_new_tokens", "0", "q"],
        "cannot read it (No such file or directory)": [*adapter, "--prompts_file",
                                                       str(tmp_path / "none.txt")],
        "has no prompts": [*adapter, "--prompts_file", str(empty)],
        "not both": [*adapter, "--prompts_file", str(empty), "q"],
        "invalid choice: 'markdown'": [*adapter, "--prompt_format", "markdown", "q"],
    }
    for message, argv in cases.items():
        try:
            code = generate_cli.main(argv)
        except SystemExit as exc:  # argparse's own errors
            code = exc.code
        err = capsys.readouterr().err
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (message,
                                                                                     err)


@pytest.mark.unit
def test_sampling_keeps_the_top_p_mass_and_feeds_greedy_decoding() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(4000, 1)
    torch.manual_seed(0)
    drawn = generate_cli.sample_token(logits, 1.0, 0.8)  # 0.5 + 0.3 reach 0.8
    assert set(drawn.tolist()) == {0, 1}
    assert abs((drawn == 0).float().mean().item() - 0.5 / 0.8) < 0.03
    assert set(generate_cli.sample_token(logits, 1.0, 0.1).tolist()) == {0}  # the top one
    assert set(generate_cli.sample_token(logits, 1e-3, 1.0).tolist()) == {0}  # cold: greedy
    # for methods with their own forward: the sampled token is the one greedy decoding takes
    fn = generate_cli._sampled(lambda ids, mask: logits[:3, None, :].expand(3, 5, 4), 1.0, 1.0)
    torch.manual_seed(1)
    want = generate_cli.sample_token(logits[:3], 1.0, 1.0)
    torch.manual_seed(1)
    got = fn(torch.zeros(3, 5, dtype=torch.long), None)
    assert got.shape == (3, 1, 4) and torch.equal(got[:, -1].argmax(-1), want)


@pytest.mark.multiprocess
@pytest.mark.xdist_group("lora_run")
def test_tensorboard_logs_every_step_of_a_run(lora_run: Path) -> None:
    records = [json.loads(x) for x in (lora_run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    events = _events(lora_run / reporting.TENSORBOARD_DIR)
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "saved_activation_bytes", "rss_gib"):
        assert [s for s, _ in events[f"train/{key}"]] == [1, 2], key
        assert [v for _, v in events[f"train/{key}"]] == pytest.approx(
            [r[key] for r in steps], rel=1e-6), key
    assert [s for s, _ in events["train/periodic_eval"]] == [1, 2]


@pytest.mark.multiprocess
@pytest.mark.xdist_group("lora_run")
def test_plot_of_a_real_run(lora_run: Path, capsys) -> None:
    assert plot.main([str(lora_run)]) == 0
    png = lora_run / "curves.png"
    assert png.read_bytes().startswith(PNG) and png.stat().st_size > 10_000
    assert f"wrote {png}" in capsys.readouterr().out


@pytest.mark.unit
def test_tensorboard_reporter_keeps_numbers_and_hides_a_restart_s_old_steps(
        tmp_path: Path) -> None:
    record = {"step": 1, "loss": 2.5, "tokens": 40, "sparse_rows_per_layer": [3, 4],
              "note": "text", "flag": True, "grad_norm": float("nan")}
    assert set(reporting.scalars(record)) == {"loss", "tokens", "grad_norm"}
    first = reporting.start("tensorboard", tmp_path, 0, {})
    for step in (1, 2, 3):
        first.log({"step": step, "loss": float(step)})
    first.close()  # a crash after step 3; the resumed run starts after step 1
    again = reporting.start("tensorboard", tmp_path, 1, {})
    for step in (2, 3):
        again.log({"step": step, "loss": 10.0 * step})
    again.close()
    assert _events(tmp_path / reporting.TENSORBOARD_DIR)["train/loss"] == [
        (1, 1.0), (2, 20.0), (3, 30.0)]


@pytest.mark.unit
def test_wandb_reporter_and_its_missing_package(tmp_path: Path, monkeypatch) -> None:
    from meft_ds import cli

    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed
    with pytest.raises(UserError, match=r"^`report_to` wandb needs the wandb package: "
                       r"pip install wandb$") as error:
        TrainConfig(report_to="wandb").validate()
    assert cli_message(error.value).startswith("--report_to wandb needs")  # the CLI's words
    with pytest.raises(SystemExit) as info:
        cli.parse(["--report_to", "mlflow"])
    assert info.value.code == 2
    logged: list = []
    fake = types.ModuleType("wandb")
    fake.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    run = types.SimpleNamespace(log=lambda values, step: logged.append((step, values)),
                                finish=lambda: logged.append("finished"))
    fake.init = lambda **kwargs: logged.append(kwargs) or run
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setenv("WANDB_PROJECT", "proj")
    reporter = reporting.start("wandb", tmp_path, 0, {"train": {"lr": 1e-3}})
    reporter.log({"step": 4, "loss": 1.5, "sparse_rows_per_layer": [1]})
    reporter.close()
    assert logged == [{"project": "proj", "dir": str(tmp_path), "config": {"train": {"lr": 1e-3}}},
                      (4, {"train/loss": 1.5}), "finished"]


@pytest.mark.unit
def test_plot_draws_what_the_metrics_hold_and_refuses_a_directory_without(
        tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    run.mkdir()
    lines = [{"step": s, "loss": 3.0 / s, "lr": 1e-3, "grad_norm": 2.0, "tokens_per_s": 90.0,
              "saved_activation_bytes": 2**20 * s, "sparse_rows_moved": 1000 - s,
              "sparse_rows_per_layer": [1, 2]} for s in range(1, 6)]
    lines.insert(3, {"step": 3, "periodic_eval": 0.25})
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines)
                                       + '{"step": 6, "lo')  # cut short by a crash
    (run / "results.json").write_text(json.dumps({
        "method": "sparse", "model": "smollm2-135m", "steps": 5, "precision": "bf16",
        "after": {"trained": {"score": 1.0, "n": 8, "metric": "exact_match"}},
        "before": {"trained": {"score": 0.0, "n": 8, "metric": "exact_match"}}}))
    assert plot.read_metrics(run)[-1]["step"] == 5
    assert "trained exact_match 0.0% -> 100.0%" in plot._title(run, plot.read_results(run))
    out = tmp_path / "figs" / "curves.png"
    assert plot.main([str(run), "--out", str(out)]) == 0
    assert out.read_bytes().startswith(PNG) and out.stat().st_size > 10_000
    (run / "metrics.jsonl").write_text("")
    cases = {str(run): "holds no metrics", str(tmp_path): "has no metrics.jsonl",
             str(tmp_path / "nope"): "is not a directory"}
    capsys.readouterr()
    for where, message in cases.items():
        assert plot.main([where]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
