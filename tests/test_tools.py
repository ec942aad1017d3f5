"""launch/generate.py: on a real tiny run's export and on hand-written inputs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import subprocess_env

from meft_ds import generate_cli

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory) -> Path:
    """A two-step LoRA run through launch/train.py, with a periodic evaluation each step."""
    out = tmp_path_factory.mktemp("run")
    proc = subprocess.run(
        [sys.executable, "launch/train.py", "--deepspeed", "ds_configs/cpu.json",
         "--model", "smollm2-135m", "--method", "lora", "--lora_r", "4", "--max_steps", "2",
         "--train_examples", "8", "--micro_batch_size", "2", "--max_seq_len", "48",
         "--eval_trained", "0", "--eval_heldout", "0", "--eval_steps", "1",
         "--eval_periodic", "2", "--max_new_tokens", "4", "--save_final", "false",
         "--progress", "false", "--output_dir", str(out)],
        capture_output=True, text=True, env=subprocess_env(), timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return out


def _generate(*argv: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "launch/generate.py", *argv], input=stdin,
                          capture_output=True, text=True, env=subprocess_env(), timeout=600,
                          cwd=ROOT)


@pytest.mark.multiprocess
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
