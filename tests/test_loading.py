"""Real checkpoint directories: weights load in the dtype the run trains in, the RAM
check counts what is loaded, and the random-weight shapes load through the same path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from meft_ds import cli, memory
from meft_ds.models import loader
from meft_ds.models.sizes import count_params
from meft_ds.runner import run

ROOT = Path(__file__).resolve().parents[1]
CPU = str(ROOT / "ds_configs" / "cpu.json")
TINY = dict(model_type="llama", hidden_size=16, intermediate_size=32, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, vocab_size=49152,
            max_position_embeddings=128, tie_word_embeddings=True)


def tiny_checkpoint(path: Path, dtype: torch.dtype = torch.float32) -> Path:
    """A random tiny LLaMA saved in ``dtype`` with SmolLM2's tokenizer (its vocabulary)."""
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM

    values = dict(TINY)
    config = CONFIG_MAPPING[values.pop("model_type")](**values)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).to(dtype).save_pretrained(path)
    loader.load_tokenizer(loader.SMOLLM2).save_pretrained(path)
    return path


class _Stop(Exception):
    """Raised by the patched RAM check: the run stops before anything loads."""


def _ram_needed(monkeypatch, *argv: str) -> int:
    seen = []

    def check(need: int, what: str) -> None:
        seen.append(need)
        raise _Stop

    monkeypatch.setattr(memory, "require_ram", check)
    with pytest.raises(_Stop):
        run(cli.parse(["--deepspeed", CPU, "--progress", "false", *argv]))
    return seen[0]


@pytest.mark.integration
def test_fp32_checkpoint_loads_and_trains_in_bf16(tmp_path: Path, monkeypatch) -> None:
    where = tiny_checkpoint(tmp_path / "model")
    stored = json.loads((where / "config.json").read_text())
    assert stored["dtype"] == "float32"
    loaded = loader.load_model(str(where), dtype=torch.bfloat16).model
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    reference = loader.load_model(str(where)).model
    assert {p.dtype for p in reference.parameters()} == {torch.float32}
    for (name, a), (_, b) in zip(loaded.named_parameters(), reference.named_parameters(),
                                 strict=True):
        assert torch.equal(a, b.to(torch.bfloat16)), name
    # The RAM check counts the weights in the dtype they load in: 2 bytes a parameter
    # under bf16, 4 under fp32 (lora: nothing else before training).
    n = count_params(loader.model_config(str(where)))
    common = ("--model", str(where), "--method", "lora", "--output_dir", str(tmp_path / "r"))
    assert _ram_needed(monkeypatch, *common, "--precision", "bf16") == 2 * n
    assert _ram_needed(monkeypatch, *common, "--precision", "fp32") == 4 * n
    monkeypatch.undo()
    # A real run under --precision bf16 hands the engine bf16 weights loaded as such.
    dtypes = []
    real = loader.load_model

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        dtypes.append({p.dtype for p in out.model.parameters()})
        return out

    monkeypatch.setattr(loader, "load_model", spy)
    run(cli.parse(["--deepspeed", CPU, *common, "--precision", "bf16", "--max_steps", "2",
                   "--train_examples", "4", "--max_seq_len", "32", "--eval_trained", "0",
                   "--eval_heldout", "0", "--progress", "false", "--micro_batch_size", "2",
                   "--save_final", "false", "--lr", "1e-2"]))
    assert dtypes == [{torch.bfloat16}]
    rows = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(r["loss"] > 0 for r in rows)


@pytest.mark.integration
def test_ram_check_counts_one_share_per_rank_under_zero3(tmp_path: Path, monkeypatch) -> None:
    """Two local ranks under ZeRO-3 load partitioned: each needs half the weights plus two
    copies of the largest one (measured: bench/results/model_load.json), not the model."""
    from meft_ds.models.sizes import largest_tensor

    where = tiny_checkpoint(tmp_path / "model")
    config = json.loads(Path(CPU).read_text())
    config["zero_optimization"] = {"stage": 3}
    (tmp_path / "zero3.json").write_text(json.dumps(config))
    n, big = count_params(loader.model_config(str(where))), largest_tensor(
        loader.model_config(str(where)))
    assert big == 49152 * 16  # the tied embedding
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    common = ("--model", str(where), "--method", "lora", "--output_dir", str(tmp_path / "r"),
              "--precision", "fp32")
    assert _ram_needed(monkeypatch, *common) == 2 * 4 * n  # ZeRO-0: a whole copy each
    assert _ram_needed(monkeypatch, *common, "--deepspeed", str(tmp_path / "zero3.json")) \
        == 2 * (4 * n // 2 + 2 * 4 * big)


@pytest.mark.integration
def test_shapes_load_from_a_checkpoint_written_once(tmp_path: Path, monkeypatch) -> None:
    smollm2 = loader.smollm2_dir()  # the converted SmolLM2 stays where it is
    monkeypatch.setattr(loader, "smollm2_dir", lambda: smollm2)
    monkeypatch.setenv("MEFT_DS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(loader.SHAPES, "tiny-shape", dict(TINY))
    torch.manual_seed(7)
    want = torch.rand(4)
    torch.manual_seed(7)
    first = loader.load_model("tiny-shape", dtype=torch.float32)
    # the write drew its weights on a forked RNG: the caller's stream (a run's seed) is
    # where it was, whether the checkpoint was written or found
    assert torch.equal(torch.rand(4), want)
    written = tmp_path / "cache" / "shapes" / "tiny-shape"
    assert first.source == f"random weights, {written}"
    config = written / "config.json"
    assert json.loads(config.read_text())["dtype"] == "bfloat16"  # as real 7B checkpoints
    assert (written / "model.safetensors").is_file() and (written / "tokenizer.json").is_file()
    stamp = config.stat().st_mtime_ns
    second = loader.load_model("tiny-shape", dtype=torch.bfloat16)
    assert config.stat().st_mtime_ns == stamp  # loaded, not written again
    assert {p.dtype for p in first.model.parameters()} == {torch.float32}
    assert {p.dtype for p in second.model.parameters()} == {torch.bfloat16}
    for a, b in zip(first.model.parameters(), second.model.parameters(), strict=True):
        assert torch.equal(a.to(torch.bfloat16), b)


def hub_snapshot(cache: Path, repo_id: str, files: Path) -> Path:
    """Lay ``files`` out as huggingface_hub caches a download of ``repo_id``: blobs named
    by their hash, ``refs/main`` holding the commit, ``snapshots/<commit>/`` linking to
    the blobs. Returns the snapshot directory."""
    import hashlib

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot, blobs = repo / "snapshots" / commit, repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for path in sorted(files.iterdir()):
        data = path.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        (blobs / digest).write_bytes(data)
        (snapshot / path.name).symlink_to(Path("..", "..", "blobs", digest))
    return snapshot


SCRIPT = """
import torch
from meft_ds.errors import UserError
from meft_ds.models import loader
try:
    loader.model_config("no-such-org/no-such-model")
except UserError as exc:
    print("REFUSED", exc)
loaded = loader.load_model("some-org/tiny-model", dtype=torch.bfloat16)
print("SOURCE", loaded.source)
print("DTYPE", next(loaded.model.parameters()).dtype, len(loaded.tokenizer))
"""


@pytest.mark.multiprocess
def test_hub_ids_resolve_through_the_cache_offline(tmp_path: Path) -> None:
    """A Hub id in the HF cache loads offline from its snapshot; one that is not is one
    line naming the cache (a fresh process: huggingface_hub reads its settings once)."""
    import subprocess
    import sys

    from conftest import subprocess_env

    hub = tmp_path / "hf" / "hub"
    snapshot = hub_snapshot(hub, "some-org/tiny-model", tiny_checkpoint(tmp_path / "files"))
    env = {**subprocess_env(), "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "HF_HUB_CACHE": str(hub)}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = {line.split(" ", 1)[0]: line.split(" ", 1)[1] for line in proc.stdout.splitlines()
             if line.split(" ", 1)[0] in ("REFUSED", "SOURCE", "DTYPE")}
    assert lines["REFUSED"] == (
        f"model 'no-such-org/no-such-model' is not a local directory, and as a Hub id it is "
        f"not in the Hugging Face cache ({hub}) and HF_HUB_OFFLINE is set: download it once "
        "online (HF_HUB_OFFLINE=0) or give a local directory")
    assert lines["SOURCE"] == str(snapshot)
    assert lines["DTYPE"] == "torch.bfloat16 49152"


@pytest.mark.integration
def test_bad_checkpoints_are_one_line_before_loading(tmp_path: Path, monkeypatch) -> None:
    """A directory without weights (or with a shard missing) and a tokenizer larger than
    the model's vocabulary are refused before any weight is read; token ids are never
    wrapped into the vocabulary."""
    import shutil

    from meft_ds.data.prompts import encode_ids, in_vocab
    from meft_ds.data.records import QAExample
    from meft_ds.errors import UserError

    where = tiny_checkpoint(tmp_path / "model")
    (where / "model.safetensors").unlink()
    with pytest.raises(UserError, match=r"^model directory .* has no weights \(model"):
        loader.model_config(str(where))
    index = {"metadata": {}, "weight_map": {"lm_head.weight": "model-00001-of-00002.safetensors",
                                            "norm.weight": "model-00002-of-00002.safetensors"}}
    (where / "model.safetensors.index.json").write_text(json.dumps(index))
    (where / "model-00001-of-00002.safetensors").write_bytes(b"")
    with pytest.raises(UserError, match=r"1 of 2 weight shards named in model.safetensors"
                                        r".index.json are missing, e.g. model-00002-of-00002"):
        loader.model_config(str(where))
    small = tmp_path / "small"
    shutil.copytree(tiny_checkpoint(tmp_path / "again"), small)
    config = json.loads((small / "config.json").read_text())
    (small / "config.json").write_text(json.dumps({**config, "vocab_size": 32000}))
    message = (r"^model .*small: its tokenizer has 49152 tokens but the model's vocabulary "
               r"\(config vocab_size\) only 32000")
    with pytest.raises(UserError, match=message):
        loader.load_tokenizer(str(small))

    def loads(*args, **kwargs):
        raise AssertionError("the weights were loaded")

    monkeypatch.setattr(loader, "load_model", loads)
    with pytest.raises(UserError, match=message):
        run(cli.parse(["--deepspeed", CPU, "--model", str(small), "--method", "lora",
                       "--output_dir", str(tmp_path / "run"), "--progress", "false"]))
    tok = loader.load_tokenizer(str(tmp_path / "again"))
    example = QAExample("What is the capital of France", ("Paris",))
    ids, labels = encode_ids(example, "plain", tok, 64, 49152)
    assert max(ids) < 49152 and len(ids) == len(labels)
    with pytest.raises(UserError, match=r"token id \d+ is outside the model's vocabulary of 10:"):
        encode_ids(example, "plain", tok, 64, 10)
    assert in_vocab([1, 2], 3) == [1, 2]


@pytest.mark.unit
def test_attention_option_is_checked_before_anything_loads(capsys, monkeypatch) -> None:
    """``--attn_implementation``: FlashAttention-2 without CUDA (or without the package
    flash_attn) is one line, exit 2, before any model loads; ``auto`` resolves to what
    transformers picks; a kernel outside the choices is the parser's error."""
    from meft_ds.errors import UserError

    def loads(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(loader, "load_model", loads)
    monkeypatch.setattr(loader, "model_config", loads)
    argv = ["--deepspeed", CPU, "--output_dir", "/nonexistent/never-written",
            "--progress", "false", "--attn_implementation"]
    if not torch.cuda.is_available():
        assert cli.main([*argv, "flash_attention_2"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(
            "error: --attn_implementation flash_attention_2 needs CUDA"), err
    with pytest.raises(SystemExit) as stop:
        cli.parse([*argv, "flash_attention_3"])
    assert stop.value.code == 2
    monkeypatch.undo()
    # CUDA present but no flash_attn: the package is named (whatever this machine has)
    monkeypatch.setattr(loader.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match=r"^`attn_implementation` flash_attention_2 needs "
                                        r"the package flash_attn, not found here; use sdpa"):
        loader.check_attention("flash_attention_2", cuda=True)
    monkeypatch.undo()
    from transformers import CONFIG_MAPPING

    values = dict(TINY)
    config = CONFIG_MAPPING[values.pop("model_type")](**values)
    assert [loader.attention_for(config, name) for name in ("auto", "sdpa", "eager")] == \
        ["sdpa", "sdpa", "eager"]


@pytest.mark.integration
def test_attention_is_recorded_and_a_resume_must_keep_it(tmp_path: Path) -> None:
    """A run with ``--attn_implementation eager`` trains with eager attention, records it
    in its checkpoints' run.json and its export (which loads back with it); resuming with
    another kernel is refused, as another precision is."""
    from meft_ds.errors import UserError
    from meft_ds.inference import load_adapted

    where = tiny_checkpoint(tmp_path / "model")
    out = tmp_path / "run"
    seen = []
    real = loader.load_model

    def spy(*args, **kwargs):
        loaded = real(*args, **kwargs)
        seen.append(loaded.model.config._attn_implementation)
        return loaded

    argv = ["--deepspeed", CPU, "--model", str(where), "--method", "lora", "--lora_r", "2",
            "--output_dir", str(out), "--train_examples", "4", "--max_seq_len", "32",
            "--eval_trained", "0", "--eval_heldout", "0", "--progress", "false",
            "--micro_batch_size", "2", "--lr", "1e-2"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loader, "load_model", spy)
        run(cli.parse([*argv, "--max_steps", "1", "--attn_implementation", "eager"]))
    assert seen == ["eager"]
    identity = json.loads((out / "checkpoints" / "step_0000001" / "run.json").read_text())
    assert identity["attn_implementation"] == "eager"
    meta = json.loads((out / "adapter" / "meft_ds.json").read_text())
    assert meta["attn_implementation"] == "eager"
    adapted = load_adapted(out / "adapter")
    assert adapted.module.config._attn_implementation == "eager"
    for other in ("sdpa", "auto"):  # auto is sdpa for LLaMA: another kernel too
        with pytest.raises(UserError, match=r"attn_implementation 'eager' -> 'sdpa'"):
            run(cli.parse([*argv, "--max_steps", "2", "--resume", "--attn_implementation",
                           other]))
