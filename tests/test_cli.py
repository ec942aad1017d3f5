"""The launcher's argument parsing, config precedence and one-line errors (exit 2)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import subprocess_env

from meft_ds import cli, methods, options
from meft_ds.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
CPU = str(ROOT / "ds_configs" / "cpu.json")


@pytest.mark.unit
def test_deepspeed_path_flag_and_meft_section_defaults() -> None:
    spec = cli.parse(["--deepspeed", CPU])
    assert spec.train.method == "parallel_adapter"
    assert spec.train.max_steps == 30  # from cpu.json's "meft" section
    assert "meft" not in spec.deepspeed
    assert spec.deepspeed["optimizer"]["type"] == "AdamW"


@pytest.mark.unit
def test_deepspeed_config_alias_and_precedence(tmp_path: Path) -> None:
    extra = tmp_path / "opts.json"
    extra.write_text(json.dumps({"max_steps": 7, "adapter_size": 32}))
    spec = cli.parse(["--deepspeed_config", CPU, "--config", str(extra), "--adapter_size", "48"])
    assert spec.train.max_steps == 7  # config file beats the DeepSpeed JSON's section
    assert spec.method_options.adapter_size == 48  # flags beat the config file


@pytest.mark.unit
def test_24gb_config_has_cpu_overrides(monkeypatch) -> None:
    spec = cli.parse(["--deepspeed", str(ROOT / "ds_configs" / "24gb.json")])
    assert spec.deepspeed["zero_optimization"]["stage"] == 2
    assert spec.deepspeed["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert spec.deepspeed["bf16"]["enabled"] is True
    # the when_no_cuda block shortens the job on a machine without CUDA only
    assert spec.train.max_steps == (1500 if torch.cuda.is_available() else 160)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert cli.parse(["--deepspeed", str(ROOT / "ds_configs" / "24gb.json")]
                     ).train.max_steps == 1500
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.parse(["--deepspeed", str(ROOT / "ds_configs" / "24gb.json")]
                     ).train.max_steps == 160


@pytest.mark.unit
def test_each_method_is_selectable() -> None:
    for name in ("full", "lora", "parallel_adapter"):
        assert cli.parse(["--deepspeed", CPU, "--method", name]).train.method == name


@pytest.mark.unit
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--method", "nope"], "unknown method 'nope'"),
        (["--max_steps", "0"], "max_steps must be > 0"),
        (["--lora_r", "8"], "--lora_r does not apply to method parallel_adapter"),
        (["--method", "lora", "--lora_r", "0"], "lora_r must be > 0"),
        (["--adapter_size", "-1"], "adapter_size must be > 0"),
        (["--method", "sparse", "--sparse_read_r", "-1"], "sparse_read_r must be >= 0"),
        (["--method", "sparse", "--sparse_weight_decay", "-1"],
         "sparse_weight_decay must be >= 0"),
        (["--method", "sparse", "--sparse_lora_weight_decay", "nan"],
         "sparse_lora_weight_decay must be >= 0"),
        (["--method", "sparse", "--sparse_lora_weight_decay", "1", "--sparse_attn_lora_r", "0"],
         "sparse_lora_weight_decay needs the LoRA of sparse_attn_lora_r"),
        (["--warmup_ratio", "1.5"], "warmup_ratio must be in"),
        (["--dataset", "gsm8k", "--data_file", "x.jsonl"], "name two training sources"),
        (["--heldout_fraction", "1"], "heldout_fraction must be in [0, 1)"),
        (["--heldout_split", "train"], "`heldout_split` train is the training split"),
        (["--split", "validation", "--heldout_split", "validation"],
         "`heldout_split` validation is the training split (`split` validation)"),
    ],
)
def test_bad_options_raise_one_line(argv: list[str], message: str) -> None:
    with pytest.raises(UserError, match=re.escape(message)):
        cli.parse(["--deepspeed", CPU, *argv])


@pytest.mark.unit
def test_bad_config_files(tmp_path: Path) -> None:
    broken = tmp_path / "broken.json"
    broken.write_text('{"train_micro_batch_size_per_gpu": 4,\n "x": }')
    with pytest.raises(UserError, match=r"broken\.json:2: invalid JSON"):
        cli.parse(["--deepspeed", str(broken)])
    with pytest.raises(UserError, match="does not exist"):
        cli.parse(["--deepspeed", str(tmp_path / "missing.json")])
    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps({"optimizer": {"type": "AdamW"}, "meft": {"max_stpes": 3}}))
    with pytest.raises(UserError, match=r"unknown.json: 'meft' section: unknown option\(s\) "
                       r"max_stpes \(did you mean max_steps\?\)"):
        cli.parse(["--deepspeed", str(unknown)])
    extra = tmp_path / "opts.json"
    extra.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    with pytest.raises(UserError, match=r"opts.json: unknown option\(s\) zero_optimization "
                       r"\(zero_optimization is a DeepSpeed key: put it in the --deepspeed"):
        cli.parse(["--deepspeed", CPU, "--config", str(extra)])


def _launch(*args: str, **env_extra: str) -> subprocess.CompletedProcess:
    env = {**subprocess_env(), **env_extra}
    return subprocess.run(
        [sys.executable, str(ROOT / "launch" / "train.py"), *args],
        capture_output=True, text=True, env=env, timeout=600, cwd=ROOT,
    )


@pytest.mark.multiprocess
def test_launcher_exits_2_with_one_line_and_no_traceback(tmp_path: Path, capsys) -> None:
    cases = [
        (["--deepspeed", CPU, "--max_steps", "-3"], "max_steps must be > 0"),
        (["--deepspeed", CPU, "--model", str(tmp_path / "nomodel")], "neither a known name"),
        (["--deepspeed", CPU, "--dataset", "gsm8k", "--data_dir", str(tmp_path),
          "--output_dir", str(tmp_path / "out")], "does not exist"),
        (["--deepspeed", CPU, "--max_steps", "abc"], "invalid int value"),
        (["--deepspeed", CPU, "--prompt_format", "xml"], "invalid choice: 'xml'"),
        (["--deepspeed", CPU, "--precision", "fp8"], "invalid choice: 'fp8'"),
        (["--deepspeed", CPU, "--dataset", "no-such-org/no-such-set", "--output_dir",
          str(tmp_path / "data1")], "neither shipped"),
        (["--deepspeed", CPU, "--dataset", "nq_open", "--question_field", "query",
          "--output_dir", str(tmp_path / "data2")], "missing column 'query' for qa records"),
        (["--deepspeed", CPU, "--micro_batch_size", "0"], "micro_batch_size must be > 0"),
        (["--deepspeed", CPU, "--gpu_memory_gib", "0"], "gpu_memory_gib must be > 0"),
        (["--deepspeed", CPU, "--save_final", "maybe"], "expected true/false, got 'maybe'"),
        (["--deepspeed", CPU, "--method", "sparse", "--sparse_cache_rows", "2.5"],
         "whole number of rows"),
        (["--deepspeed", CPU, "--method", "sparse", "--sparse_rank", "64",
          "--sparse_experts", "8", "--sparse_top_k", "8", "--sparse_cache_rows", "1000"],
         "exceeds the 64 rows per layer"),
        (["--deepspeed", CPU, "--method", "sparse", "--sparse_route", "sequence"],
         "invalid choice: 'sequence'"),
        (["--deepspeed", CPU, "--method", "sparse", "--sparse_bias_correction", "global"],
         "invalid choice: 'global'"),
        (["--deepspeed", CPU, "--method", "reversible", "--rev_keep_top", "2",
          "--rev_backward", "autograd"], "rev_keep_top applies to rev_backward reversible"),
        (["--deepspeed", CPU, "--resume", "--output_dir", str(tmp_path / "nothing")],
         "--resume: no checkpoint found"),
    ]
    # Two cases through the real launcher (argparse's refusal, and one from inside the run);
    # the others through its entry point in this process (a launch costs ~8 s of imports).
    launched = {"invalid int value", "--resume: no checkpoint found"}
    for argv, message in cases:
        if message in launched:
            proc = _launch(*argv)
            code, stderr = proc.returncode, proc.stderr
        else:
            code, stderr = _main_in_process(argv, capsys)
        assert code == 2, (argv, stderr[-2000:])
        lines = [ln for ln in stderr.splitlines() if ln.startswith("error:")]
        assert len(lines) == 1 and message in lines[0], stderr[-2000:]
        assert "Traceback" not in stderr


def _main_in_process(argv: list[str], capsys) -> tuple[int, str]:
    """``launch/train.py``'s ``main`` here: its exit status and what it wrote to stderr."""
    capsys.readouterr()
    try:
        code = cli.main(argv)
    except SystemExit as exc:  # argparse's own exits
        code = exc.code
    return code, capsys.readouterr().err


@pytest.mark.multiprocess
@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for runs without CUDA")
def test_gpu_memory_cap_without_cuda_is_refused(tmp_path: Path) -> None:
    proc = _launch("--deepspeed", CPU, "--gpu_memory_gib", "24", "--output_dir", str(tmp_path))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "error: --gpu_memory_gib needs a CUDA device" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.multiprocess
def test_ram_check_refuses_before_allocating(monkeypatch) -> None:
    from meft_ds import memory
    from meft_ds.models import loader
    from meft_ds.models.sizes import count_params, estimate_host_bytes

    # 24 GiB whatever the host has (a large GPU host would otherwise start a real 7B run)
    ram = {memory.RAM_ENV: "24"}
    monkeypatch.setenv(memory.RAM_ENV, "24")
    cfg = loader.model_config("llama2-7b-shape")
    # LLaMA-2-7B has 6.74B parameters; the shape has SmolLM2's 49152-token vocabulary: 6.88B
    assert count_params(cfg) == 6_738_415_616 + 2 * (49152 - 32000) * 4096
    need = estimate_host_bytes(cfg, "full", torch.float32, cuda=False)
    assert need > memory.available_ram() == 24 * memory.GIB
    with pytest.raises(UserError, match=r"needs .* GiB of RAM .*\(set by MEFT_DS_RAM_GIB\)"):
        memory.require_ram(need, "llama2-7b-shape full")
    proc = _launch("--deepspeed", CPU, "--model", "llama2-7b-shape", "--method", "full", **ram)
    assert proc.returncode == 2 and "GiB of RAM" in proc.stderr
    # The sparse row store counts: a 7B model with a store as large as itself (rows, two
    # Adam moments) needs ~88 GiB of host RAM, refused before the weights load.
    sparse = methods.get("sparse")
    method = sparse(options.build(sparse.Options, {"sparse_param_fraction": 1.0}), cfg)
    assert method.host_bytes(cfg) > 12 * count_params(cfg)
    proc = _launch("--deepspeed", str(ROOT / "ds_configs" / "24gb.json"),
                   "--model", "llama2-7b-shape", **ram)
    assert proc.returncode == 2 and "with method sparse needs" in proc.stderr, proc.stderr[-2000:]
    # Every rank of a node loads the weights at once: 64 local ranks of SmolLM2 (fp32,
    # 0.5 GB each) need more RAM than this machine has; the launchers say how many.
    from meft_ds import dist as mdist

    assert mdist.local_world_size({"LOCAL_SIZE": "8"}) == 8  # the deepspeed launcher
    assert mdist.local_world_size({"LOCAL_WORLD_SIZE": "4"}) == 4  # torchrun
    assert mdist.local_world_size({}) == 1
    many = int(2 * memory.available_ram() / (4 * count_params(loader.model_config(
        "smollm2-135m")))) + 1
    proc = subprocess.run(
        [sys.executable, str(ROOT / "launch" / "train.py"), "--deepspeed", CPU,
         "--method", "lora"], capture_output=True, text=True, timeout=600, cwd=ROOT,
        env={**subprocess_env(), "LOCAL_WORLD_SIZE": str(many)})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"on {many} ranks of this node needs" in proc.stderr, proc.stderr[-2000:]


@pytest.mark.unit
def test_smollm2_shape_has_the_real_architecture(smollm2) -> None:
    from meft_ds.models import loader

    shape, real = loader.model_config("smollm2-135m-shape"), smollm2.model.config
    for key in ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "vocab_size",
                "max_position_embeddings", "tie_word_embeddings", "rope_parameters"):
        assert getattr(shape, key) == getattr(real, key), key
    assert abs(shape.rms_norm_eps - real.rms_norm_eps) < 1e-9


@pytest.mark.unit
def test_help_lists_methods_and_marks_shared_options(capsys) -> None:
    from meft_ds import methods

    with pytest.raises(SystemExit) as info:
        cli.parse(["--help"])
    assert info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "fine-tuning method: " + ", ".join(methods.available()) in text
    assert "[methods: parallel_adapter, sparse]" in text  # --layer_start, --layer_end


@pytest.mark.unit
def test_empty_layer_range_says_so() -> None:
    from conftest import tiny_llama

    from meft_ds.models import arch

    model = tiny_llama(3)
    with pytest.raises(UserError, match=r"layer range \[2, 1\) is empty"):
        arch.check_layer_range(model, 2, 1, "adapter")
    with pytest.raises(UserError, match=r"\[1, 5\) is outside the model's 0..3"):
        arch.check_layer_range(model, 1, 5, "adapter")
    assert arch.check_layer_range(model, 1, None, "adapter") == range(1, 3)


@pytest.mark.unit
def test_config_file_options_of_another_method_are_refused(tmp_path: Path) -> None:
    extra = tmp_path / "opts.json"
    extra.write_text(json.dumps({"max_steps": True}))
    with pytest.raises(UserError, match="max_steps=True is not a valid int"):
        cli.parse(["--deepspeed", CPU, "--config", str(extra)])
    extra.write_text(json.dumps({"method": "sparse", "lora_r": 8}))
    with pytest.raises(UserError, match=r"opts.json: lora_r does not apply to method sparse"):
        cli.parse(["--deepspeed", CPU, "--config", str(extra)])


@pytest.mark.unit
@pytest.mark.parametrize(("meft", "where"), [
    (5, "'meft'"), ("sparse", "'meft'"), ([], "'meft'"), ({"when_no_cuda": 5}, "meft.when_no_cuda"),
    ({"when_no_cuda": {"deepspeed": 5}}, "meft.when_no_cuda.deepspeed"),
])
def test_meft_section_of_the_wrong_type_is_one_line(tmp_path: Path, meft, where: str) -> None:
    config = json.loads(Path(CPU).read_text())
    config["meft"] = meft
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(config))
    with pytest.raises(UserError, match=f"config key {where} must be a JSON object") as info:
        cli.parse(["--deepspeed", str(path)])
    assert "\n" not in str(info.value)


@pytest.mark.unit
def test_gradient_clipping_must_be_a_number(tmp_path: Path) -> None:
    from meft_ds import ds_config

    for bad in ("1.0", -1, True):
        with pytest.raises(UserError, match="gradient_clipping must be a number >= 0"):
            ds_config.finalize({"train_micro_batch_size_per_gpu": 1, "gradient_clipping": bad},
                               world_size=1, max_steps=2, warmup_ratio=0.0, lr=None,
                               micro_batch=None, grad_accum=None, cuda=False)


@pytest.mark.unit
def test_evaluator_data_flags_are_training_s_and_checked_like_training(capsys) -> None:
    """evaluate.py's data flags come from TrainConfig's fields (help and choices defined
    once); the data options are refused as training refuses them, before a model loads;
    --split names a split of the dataset too."""
    import argparse
    import dataclasses

    from meft_ds.config import TrainConfig
    from meft_ds.data import open_split
    from meft_ds.evaluate_cli import DATA_FLAGS, _data_spec, build_parser
    from meft_ds.evaluate_cli import main as evaluate_main

    actions = build_parser()._option_string_actions
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    for name in (*DATA_FLAGS, "prompt_format"):
        action, field = actions[f"--{name}"], fields[name]
        assert action.help == field.metadata["help"], name
        assert action.choices == field.metadata.get("choices"), name
        assert action.default is None, name  # unset: the adapter's record
    saved = str(ROOT / "tests" / "fixtures" / "data" / "qa_saved")
    refused = {
        "heldout_fraction must be in [0, 1), got 1.5": ["--heldout_fraction", "1.5"],
        "heldout_fraction must be in [0, 1), got -0.1": ["--heldout_fraction", "-0.1"],
        "--heldout_split train is the training split": ["--heldout_split", "train"],
        "--heldout_split validation is the training split (--split validation)": [
            "--dataset", saved, "--split", "validation", "--heldout_split", "validation"],
        "name two training sources": ["--dataset", "gsm8k", "--data_file", "x.jsonl"],
    }
    for message, argv in refused.items():
        assert evaluate_main(["--model", "smollm2-135m", *argv, "--no_progress"]) == 2, argv
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, (message, err)
    with pytest.raises(SystemExit) as info:  # the choices are training's
        evaluate_main(["--model", "smollm2-135m", "--record_format", "nope"])
    assert info.value.code == 2 and "invalid choice: 'nope'" in capsys.readouterr().err
    # --split NAME scores that split of the dataset (training's --split NAME)
    args = build_parser().parse_args(["--model", "m", "--dataset", saved, "--split",
                                      "validation", "--question_field", "q",
                                      "--answer_field", "a"])
    spec = _data_spec(args, {})
    assert spec.split == "validation"
    assert len(open_split(spec, "train", None).examples) == 2  # qa_saved: 4 train, 2 validation
    # --split train: the training split the adapter recorded
    flags = argparse.Namespace(**dict.fromkeys(DATA_FLAGS), split="train")
    assert _data_spec(flags, {"data": {"dataset": saved, "split": "validation"}}).split == \
        "validation"


@pytest.mark.unit
def test_ram_override_is_read_and_checked(monkeypatch) -> None:
    from meft_ds import memory

    monkeypatch.setenv(memory.RAM_ENV, "1.5")
    assert memory.available_ram() == int(1.5 * memory.GIB)
    monkeypatch.setenv(memory.RAM_ENV, "lots")
    with pytest.raises(UserError, match="MEFT_DS_RAM_GIB='lots' is not a number"):
        memory.available_ram()
