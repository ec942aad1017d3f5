"""The output directory: no mixed runs, starting over, consistent resumes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from meft_ds import cli, run_dir
from meft_ds.errors import UserError
from meft_ds.runner import run

ROOT = Path(__file__).resolve().parents[1]
CPU = str(ROOT / "ds_configs" / "cpu.json")


def _earlier_run(out: Path) -> None:
    (out / "checkpoints" / "step_0000002").mkdir(parents=True)
    (out / "adapter").mkdir()
    (out / "adapter" / "weights.pt").write_text("x")
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    (out / "notes.txt").write_text("mine")


@pytest.mark.unit
def test_check_fresh_and_clear(tmp_path: Path) -> None:
    assert run_dir.check_fresh(tmp_path / "new", resume=False, overwrite=False) is None
    _earlier_run(tmp_path)
    problem = run_dir.check_fresh(tmp_path, resume=False, overwrite=False)
    assert "already holds a run (metrics.jsonl, checkpoints, adapter)" in problem
    assert "--resume" in problem and "--overwrite_output_dir" in problem
    assert run_dir.check_fresh(tmp_path, resume=True, overwrite=False) is None
    assert run_dir.check_fresh(tmp_path, resume=False, overwrite=True) is None
    run_dir.clear(tmp_path)
    assert run_dir.earlier_run(tmp_path) == []
    assert (tmp_path / "notes.txt").read_text() == "mine", "other files stay"


@pytest.mark.unit
def test_truncate_metrics_drops_records_after_the_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    records = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.5},
               {"step": 2, "periodic_eval": 0.5}, {"step": 3, "loss": 2.0}]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert run_dir.truncate_metrics(path, 2) == 1
    assert [json.loads(x) for x in path.read_text().splitlines()] == records[:3]
    assert run_dir.truncate_metrics(path, 2) == 0
    assert run_dir.truncate_metrics(tmp_path / "missing.jsonl", 2) == 0
    assert run_dir.logged_steps(path, 1) == records[:1]
    assert run_dir.logged_steps(path, 2) == records[:2]  # training steps only
    # A line torn by a crash mid-write is dropped, not a traceback on --resume.
    with path.open("a") as handle:
        handle.write('{"step": 3, "loss": 4.2, "lr": 0.00')
    assert run_dir.logged_steps(path, 9) == records[:2]
    assert run_dir.truncate_metrics(path, 2) == 1
    assert [json.loads(x) for x in path.read_text().splitlines()] == records[:3]


@pytest.mark.unit
def test_identity_mismatch_names_the_differences(tmp_path: Path) -> None:
    identity = {"model": "smollm2-135m", "method": "sparse",
                "options": {"sparse_rank": 400, "sparse_top_k": 8}}
    run_dir.write_identity(tmp_path, identity)
    run_dir.check_identity(tmp_path, identity)
    run_dir.check_identity(tmp_path / "old", identity)  # no run.json: not checked
    other = {**identity, "options": {"sparse_rank": 200, "sparse_top_k": 8}}
    with pytest.raises(UserError, match=r"options.sparse_rank 400 -> 200"):
        run_dir.check_identity(tmp_path, other)
    with pytest.raises(UserError, match=r"method 'sparse' -> 'lora'"):
        run_dir.check_identity(tmp_path, {"model": "smollm2-135m", "method": "lora",
                                          "options": {}})


@pytest.mark.unit
def test_before_scores_round_trip(tmp_path: Path) -> None:
    assert run_dir.load_before(tmp_path) is None
    scores = {"trained": {"score": 0.25, "n": 4, "metric": "exact_match"}}
    run_dir.save_before(tmp_path, scores)
    assert run_dir.load_before(tmp_path) == scores


@pytest.mark.unit
def test_run_refuses_an_output_dir_with_an_earlier_run(tmp_path: Path, capsys) -> None:
    """Refused before the model is loaded; the option pair is refused at parse time."""
    _earlier_run(tmp_path)
    spec = cli.parse(["--deepspeed", CPU, "--output_dir", str(tmp_path), "--progress", "false"])
    with pytest.raises(UserError, match="already holds a run"):
        run(spec)
    with pytest.raises(UserError, match="exclude each other"):
        cli.parse(["--deepspeed", CPU, "--output_dir", str(tmp_path), "--resume",
                   "--overwrite_output_dir", "true"])
    with pytest.raises(UserError, match="is a file"):
        cli.parse(["--deepspeed", CPU, "--output_dir", str(tmp_path / "notes.txt")])
    with pytest.raises(SystemExit) as info:
        cli.parse(["--deepspeed", CPU, "--overwrite_output_dir", "sure"])
    assert info.value.code == 2
    assert "expected true/false, got 'sure'" in capsys.readouterr().err


@pytest.mark.unit
def test_resume_free_options_exist() -> None:
    """Every option a resume may change is a real option of its method."""
    import dataclasses

    from meft_ds import methods

    for name in methods.available():
        cls = methods.get(name)
        fields = {f.name for f in dataclasses.fields(cls.Options)}
        assert cls.resume_free <= fields, (name, sorted(cls.resume_free - fields))


@pytest.mark.unit
def test_bad_data_fails_before_overwrite_removes_anything(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    _earlier_run(out)
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    fixtures = Path(__file__).resolve().parent / "fixtures" / "data"
    cases = {
        "does not exist": ["--dataset", "gsm8k", "--data_dir", str(tmp_path / "nodata")],
        "neither shipped": ["--dataset", "no-such-org/no-such-set"],
        "missing column 'query'": ["--dataset", str(fixtures / "alpaca.jsonl"),
                                   "--record_format", "qa", "--question_field", "query"],
        "without an assistant turn": ["--dataset", str(chat), "--heldout_file",
                                      str(fixtures / "chat.jsonl")],
    }
    for message, argv in cases.items():
        spec = cli.parse(["--deepspeed", CPU, "--output_dir", str(out), "--progress", "false",
                          "--overwrite_output_dir", "true", *argv])
        with pytest.raises(UserError, match=message):
            run(spec)
        assert run_dir.earlier_run(out) == ["metrics.jsonl", "checkpoints", "adapter"], message


@pytest.mark.unit
def test_resume_with_another_prompt_format_or_precision_is_refused(tmp_path: Path) -> None:
    """Prompt format, precision and attention kernel are in the run identity a resume
    compares (before anything loads); a checkpoint written before they were recorded is
    not refused for lacking them."""
    from meft_ds.runner import _run_identity, _start_problem

    argv = ["--deepspeed", CPU, "--output_dir", str(tmp_path), "--progress", "false"]
    first = cli.parse(argv)  # cpu.json: fp32, plain prompts
    tag = tmp_path / "checkpoints" / "step_0000002"
    tag.mkdir(parents=True)
    (tmp_path / "checkpoints" / "latest").write_text(tag.name)
    run_dir.write_identity(tag, _run_identity(first, bf16=False, attention="sdpa"))
    saved = json.loads((tag / run_dir.IDENTITY_FILE).read_text())
    assert (saved["prompt_format"], saved["precision"], saved["attn_implementation"]) == (
        "plain", "fp32", "sdpa")
    resume = cli.parse([*argv, "--resume"])
    assert _start_problem(tmp_path, resume.train,
                          _run_identity(resume, bf16=False, attention="sdpa")) is None
    for extra, change in ((["--prompt_format", "chat"], "prompt_format 'plain' -> 'chat'"),
                          (["--precision", "bf16"], "precision 'fp32' -> 'bf16'"),
                          (["--attn_implementation", "eager"],
                           "attn_implementation 'sdpa' -> 'eager'")):
        with pytest.raises(UserError, match=re.escape(change)) as info:
            run(cli.parse([*argv, "--resume", *extra]))
        assert "was written by another configuration" in str(info.value)
        assert "\n" not in str(info.value)
    # an older run.json (model, method, options only) resumes as before
    old = {k: v for k, v in saved.items()
           if k not in ("prompt_format", "precision", "attn_implementation")}
    run_dir.write_identity(tag, old)
    chat = cli.parse([*argv, "--resume", "--prompt_format", "chat"])
    assert _start_problem(tmp_path, chat.train,
                          _run_identity(chat, bf16=True, attention="eager")) is None


@pytest.mark.unit
def test_the_runner_loads_the_tokenizer_once(tmp_path: Path, monkeypatch) -> None:
    """The tokenizer that checked the prompt format and tokenized the data goes to
    load_model (which would otherwise load it again)."""
    from meft_ds.models import loader

    loaded = []
    real = loader.load_tokenizer

    def counting(spec: str):
        loaded.append(real(spec))
        return loaded[-1]

    class Stop(Exception):
        pass

    def stop_at_model(*args, tokenizer=None, **kwargs):
        raise Stop(tokenizer)

    monkeypatch.setattr(loader, "load_tokenizer", counting)
    monkeypatch.setattr(loader, "load_model", stop_at_model)
    spec = cli.parse(["--deepspeed", CPU, "--output_dir", str(tmp_path / "out"),
                      "--progress", "false", "--train_examples", "4", "--eval_trained", "1",
                      "--eval_heldout", "0"])
    with pytest.raises(Stop) as info:
        run(spec)
    assert len(loaded) == 1 and info.value.args[0] is loaded[0]
