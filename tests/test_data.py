"""Data sources, record shapes, prompt formats, loss masks and the deterministic batch order."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from meft_ds.data import (
    IGNORE,
    BatchSchedule,
    DataSpec,
    Encoded,
    check_answers_kept,
    check_format,
    encode,
    load_split,
    open_split,
    prompt_text,
    tokenize,
)
from meft_ds.data.records import QAExample
from meft_ds.data.sources import SHIPPED_DIR
from meft_ds.errors import UserError, cli_message
from meft_ds.trainer import lm_loss

pytestmark = pytest.mark.unit
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "data"
SUMS = [(f"what is {a} plus {b}", str(a + b)) for a, b in ((1, 2), (3, 4), (5, 6), (7, 8),
                                                           (9, 10), (11, 12))]


def test_shipped_datasets_load_without_any_data_directory(monkeypatch) -> None:
    """nq_open and gsm8k come from the package itself: no data directory beside the
    repository, no $MEFT_DS_DATA."""
    monkeypatch.delenv("MEFT_DS_DATA", raising=False)
    examples = load_split("nq_open", "train", limit=5)
    assert examples[0].question == "when was the last time anyone was on the moon"
    assert examples[0].answers == ("14 December 1972 UTC", "December 1972")
    heldout = load_split("nq_open", "heldout", limit=3)
    assert heldout[0].question != examples[0].question
    gsm = load_split("gsm8k", "train", limit=1)[0]
    assert "####" in gsm.answers[0] and DataSpec(dataset="gsm8k").metric == "gsm8k_accuracy"
    assert (SHIPPED_DIR / "nq_open" / "LICENSE").is_file()
    assert (SHIPPED_DIR / "gsm8k" / "LICENSE").is_file()


def test_data_dir_overrides_the_shipped_copy(tmp_path: Path) -> None:
    (tmp_path / "nq_open").mkdir()
    for name in ("NQ-open.dev.jsonl", "NQ-open.efficientqa.dev.1.1.jsonl"):
        (tmp_path / "nq_open" / name).write_text(
            json.dumps({"question": f"from {name}", "answer": ["x"]}) + "\n")
    assert load_split("nq_open", "train", tmp_path)[0].question == "from NQ-open.dev.jsonl"
    with pytest.raises(UserError, match="gsm8k/train.jsonl of dataset gsm8k does not exist"):
        load_split("gsm8k", "train", tmp_path)


@pytest.mark.parametrize("name", ["qa.jsonl", "qa.json", "qa.csv", "qa.parquet", "qa.arrow"])
def test_every_local_file_format_gives_the_same_examples(name: str) -> None:
    spec = DataSpec(dataset=str(FIXTURES / name), column_map="question=q,answer=a",
                    heldout_fraction=0.5)
    both = open_split(spec, "train", None).examples + open_split(spec, "heldout", None).examples
    assert sorted((e.question, e.answers[0]) for e in both) == sorted(SUMS)
    if name != "qa.csv":  # a CSV cell holds one answer, the others keep the list
        assert all(len(e.answers) == 2 for e in both)


def test_save_to_disk_directory_with_named_splits() -> None:
    spec = DataSpec(dataset=str(FIXTURES / "qa_saved"), question_field="q", answer_field="a")
    train = open_split(spec, "train", None).examples
    heldout = open_split(spec, "heldout", None).examples  # its "validation" split by default
    assert [e.question for e in train] == [q for q, _ in SUMS[:4]]
    assert [e.question for e in heldout] == [q for q, _ in SUMS[4:]]
    swapped = DataSpec(dataset=spec.dataset, split="validation", heldout_split="train",
                       question_field="q", answer_field="a")
    assert len(open_split(swapped, "train", None).examples) == 2
    with pytest.raises(UserError, match="has no split 'test' .splits: train, validation"):
        open_split(DataSpec(dataset=spec.dataset, split="test", question_field="q",
                            answer_field="a"), "train", None)


def test_heldout_fraction_is_disjoint_seeded_and_limits_apply() -> None:
    spec = DataSpec(dataset=str(FIXTURES / "qa.jsonl"), column_map="question=q,answer=a",
                    heldout_fraction=1 / 3, seed=7)
    train = [e.question for e in open_split(spec, "train", None).examples]
    held = [e.question for e in open_split(spec, "heldout", None).examples]
    assert len(train) == 4 and len(held) == 2 and not set(train) & set(held)
    assert held == [e.question for e in open_split(spec, "heldout", None).examples]
    assert len(open_split(spec, "train", 3).examples) == 3
    with pytest.raises(UserError, match="has no held-out split"):
        open_split(DataSpec(dataset=spec.dataset, column_map=spec.column_map), "heldout", None)


def test_record_shapes_alpaca_and_chat() -> None:
    alpaca = open_split(DataSpec(dataset=str(FIXTURES / "alpaca.jsonl")), "train", None)
    assert alpaca.reader.shape == "alpaca"
    assert alpaca.examples[0].question == "Name the capital of the country.\n\nFrance"
    assert alpaca.examples[1].question == "Who wrote Hamlet?"  # an empty input is left out
    assert alpaca.examples[0].answers == ("Paris",)
    chat = open_split(DataSpec(dataset=str(FIXTURES / "chat.jsonl")), "train", None)
    assert chat.reader.shape == "chat"
    first, second = chat.examples
    assert (first.question, first.answers, first.context) == (
        "who painted the mona lisa", ("Leonardo da Vinci",), (("system", "Answer briefly."),))
    assert second.question == "and of spain?" and second.answers == ("Madrid",)
    assert second.context == (("user", "capital of italy?"), ("assistant", "Rome"))


def _write(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_bad_data_is_one_line(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cases = {
        "not a local file or directory": DataSpec(dataset=str(tmp_path / "nope.jsonl")),
        "unknown data file type": DataSpec(dataset=_write(tmp_path / "x.txt", [{}])),
        "missing column 'query' for qa records": DataSpec(
            dataset=str(FIXTURES / "qa.jsonl"), record_format="qa", question_field="query"),
        "no known record shape in columns q, a": DataSpec(dataset=str(FIXTURES / "qa.jsonl")),
        "row 1: a chat record without an assistant turn": DataSpec(dataset=_write(
            tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                 {"role": "assistant", "content": "yo"}]},
                                   {"messages": [{"role": "user", "content": "hi"}]}])),
        "row 0: empty question or answer": DataSpec(dataset=_write(
            tmp_path / "e.jsonl", [{"question": "q", "answer": ""}])),
    }
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"question": "q1", "answer": ["a"]}\n{"question": "q2", "answer": \n')
    cases["could not be loaded"] = DataSpec(dataset=str(bad_json))
    cases["is empty"] = DataSpec(dataset=str(FIXTURES / "qa_saved"), question_field="q",
                                 answer_field="a", split="validation", heldout_fraction=0.5)
    for message, spec in cases.items():
        with pytest.raises(UserError, match=message) as info:
            open_split(spec, "train", 0 if message == "is empty" else None)
        assert "\n" not in str(info.value), message


def test_hub_id_offline_and_not_cached_is_one_line(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("datasets.config.HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    with pytest.raises(UserError, match="HF_HUB_OFFLINE is set and 'no-such-org/no-such-set' is "
                       "neither shipped") as info:
        open_split(DataSpec(dataset="no-such-org/no-such-set"), "train", None)
    assert "\n" not in str(info.value)


def test_hub_id_read_from_the_cache_an_earlier_online_load_left(tmp_path: Path) -> None:
    """``--dataset someorg/somedata`` offline, from the HF cache alone, with the real
    ``datasets`` library.

    datasets 5.2.0 in offline mode does not ask huggingface_hub (it raises
    OfflineModeIsEnabled before any hub download; the hub snapshot layout
    ``datasets--org--name/snapshots/<sha>`` is not read): it falls back to
    ``CachedDatasetModuleFactory``, the prepared dataset an online ``load_dataset`` wrote
    in ``HF_DATASETS_CACHE``: ``org___name/<config>/<version>/<commit>/`` with
    ``dataset_info.json`` and ``name-<split>.arrow``. That directory is written here by
    the same builder an online load runs (data files from the Hub must live in the repo,
    so it is built under the bare name and moved to the namespaced path the Hub load
    uses). datasets reads its cache paths from the environment at import: the check
    runs in a subprocess with HF_HOME / HF_HUB_CACHE / HF_DATASETS_CACHE in ``tmp_path``.
    """
    import shutil
    import subprocess
    import sys

    from conftest import subprocess_env
    from datasets.packaged_modules.json.json import Json

    rows = [{"question": f"what is {a} plus {b}", "answer": [str(a + b)]}
            for a, b in ((1, 2), (3, 4), (5, 6), (7, 8))]
    files = {"train": _write(tmp_path / "train.jsonl", rows[:3]),
             "validation": _write(tmp_path / "validation.jsonl", rows[3:])}
    commit = "0123456789abcdef0123456789abcdef01234567"
    builder = Json(cache_dir=str(tmp_path / "build"), dataset_name="somedata",
                   config_name="default", config_id="default", hash=commit, data_files=files)
    builder.download_and_prepare()
    cache = tmp_path / "hf" / "datasets"
    cache.mkdir(parents=True)
    shutil.move(str(tmp_path / "build" / "somedata"), str(cache / "someorg___somedata"))
    assert (cache / "someorg___somedata" / "default" / "0.0.0" / commit /
            "somedata-train.arrow").is_file()

    env = {**subprocess_env(), "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "HF_HUB_CACHE": str(tmp_path / "hf" / "hub"), "HF_DATASETS_CACHE": str(cache)}
    check = (
        "import json\n"
        "from meft_ds.data import DataSpec, open_split\n"
        "from meft_ds.errors import UserError\n"
        "spec = DataSpec(dataset='someorg/somedata')\n"
        "out = {w: [[e.question, *e.answers] for e in open_split(spec, w, None).examples]\n"
        "       for w in ('train', 'heldout')}\n"
        "try:\n"
        "    open_split(DataSpec(dataset='someorg/otherdata'), 'train', None)\n"
        "except UserError as exc:\n"
        "    out['other'] = str(exc)\n"
        "print(json.dumps(out))\n"
    )
    proc = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True,
                          env=env, cwd=Path(__file__).resolve().parents[1], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["train"] == [[r["question"], *r["answer"]] for r in rows[:3]]
    assert out["heldout"] == [[r["question"], *r["answer"]] for r in rows[3:]]  # validation
    assert "neither shipped" in out["other"] and "\n" not in out["other"]


def test_column_map_names_the_shape_auto_detection_reads(tmp_path: Path) -> None:
    """Detection reads the mapped names: columns prompt/response with
    question=prompt,answer=response are question/answer records, also when other columns
    would fit another shape; a mapped column that is missing is refused, not skipped."""
    turn = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    plain = _write(tmp_path / "pr.jsonl", [{"prompt": "what is 1 plus 2", "response": "3"}])
    mixed = _write(tmp_path / "mixed.jsonl", [
        {"prompt": "what is 1 plus 2", "response": "3", "messages": turn,
         "instruction": "say hi", "output": "hi"}])
    for path in (plain, mixed):
        for mapping in ({"column_map": "question=prompt,answer=response"},
                        {"question_field": "prompt", "answer_field": "response"}):
            split = open_split(DataSpec(dataset=path, **mapping), "train", None)
            assert split.reader.shape == "qa", (path, mapping)
            assert split.examples[0] == QAExample("what is 1 plus 2", ("3",))
    # without a map the same file is a chat file (messages first)
    assert open_split(DataSpec(dataset=mixed), "train", None).reader.shape == "chat"
    with pytest.raises(UserError, match="missing column 'respnse' for qa records"):
        open_split(DataSpec(dataset=mixed, column_map="question=prompt,answer=respnse"),
                   "train", None)
    alpaca = open_split(DataSpec(dataset=mixed, column_map="input=prompt"), "train", None)
    assert alpaca.reader.shape == "alpaca"
    assert alpaca.examples[0].question == "say hi\n\nwhat is 1 plus 2"


def test_squad_answers_are_read_and_other_dict_answers_refused(tmp_path: Path) -> None:
    squad = _write(tmp_path / "squad.jsonl", [
        {"question": "Which team won Super Bowl 50?",
         "answers": {"text": ["Denver Broncos", "Broncos"], "answer_start": [177, 184]}},
        {"question": "Where was it played?",
         "answers": {"text": ["Levi's Stadium"], "answer_start": [403]}}])
    examples = open_split(DataSpec(dataset=squad, answer_field="answers"), "train", None).examples
    assert [e.answers for e in examples] == [("Denver Broncos", "Broncos"), ("Levi's Stadium",)]
    cases = {
        # row 0 is SQuAD's shape; Arrow gives row 1 a "text" key too (None)
        "row 1: answer column 'answer' holds a dict (keys: value, score)": [
            {"question": "q", "answer": {"text": ["a"]}},
            {"question": "q", "answer": {"value": "b", "score": 2}}],
        "row 0: answer column 'answer' holds a dict (keys: text)": [
            {"question": "q", "answer": [{"text": "a"}]}],
    }
    for message, rows in cases.items():
        spec = DataSpec(dataset=_write(tmp_path / "bad.jsonl", rows))
        with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")
                           ) as info:
            open_split(spec, "train", None)
        assert "\n" not in str(info.value) and "bad.jsonl' (train) row" in str(info.value)


def test_chat_format_trains_only_the_assistant_turn(smollm2) -> None:
    """The labels cover exactly what the template adds for the assistant's answer; the
    evaluation prompt is the training prompt, token for token."""
    tok = smollm2.tokenizer
    split = open_split(DataSpec(dataset=str(FIXTURES / "chat.jsonl")), "train", None)
    for example, enc in zip(split.examples, tokenize(split, "chat", tok, 512, len(tok),
                                                     progress=False)):
        trained = [i for i, t in enumerate(enc.labels) if t != IGNORE]
        assert trained == list(range(trained[0], len(enc.labels)))
        assert tok.decode(enc.input_ids[trained[0]:]) == f"{example.answers[0]}<|im_end|>\n"
        prompt = prompt_text(example, "chat", tok)
        assert prompt.endswith("<|im_start|>assistant\n") and example.question in prompt
        assert enc.input_ids[: trained[0]] == tok(prompt, add_special_tokens=False)["input_ids"]
    assert "Rome" in prompt and "capital of italy?" in prompt  # earlier turns are context
    plain = tokenize(split, "plain", tok, 512, len(tok), progress=False)[0]
    assert tok.decode([t for t in plain.labels if t != IGNORE]) == " Leonardo da Vinci<|im_end|>"


def test_a_tokenizer_without_a_chat_template_is_refused(smollm2) -> None:
    import copy

    tok = copy.deepcopy(smollm2.tokenizer)
    tok.chat_template = None
    check_format("plain", tok)
    with pytest.raises(UserError, match="^`prompt_format` chat: this tokenizer has no chat"):
        check_format("chat", tok)


def test_tokenize_uses_the_datasets_cache(smollm2, tmp_path: Path, monkeypatch) -> None:
    """A second tokenization of the same file-backed split reads datasets' cache file."""
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    tok = smollm2.tokenizer
    split = open_split(DataSpec(dataset=str(FIXTURES / "qa.jsonl"),
                                column_map="question=q,answer=a"), "train", None)
    first = tokenize(split, "plain", tok, 64, len(tok), progress=False)
    cached = sorted(p.name for p in (tmp_path / "cache").rglob("cache-*.arrow"))
    again = tokenize(split, "plain", tok, 64, len(tok), progress=False)
    assert cached and sorted(p.name for p in (tmp_path / "cache").rglob("cache-*.arrow")) == cached
    assert [e.input_ids for e in again] == [e.input_ids for e in first]
    assert [e.labels for e in first] == [encode(x, tok, 64, len(tok)).labels
                                         for x in split.examples]
    assert os.environ["HF_DATASETS_CACHE"] == str(tmp_path / "cache")


def test_loss_only_on_answer_tokens(smollm2) -> None:
    tok = smollm2.tokenizer
    ex = load_split("nq_open", "train", limit=1)[0]
    enc = encode(ex, tok, 128, len(tok))
    answer_positions = [i for i, t in enumerate(enc.labels) if t != IGNORE]
    assert answer_positions == list(range(answer_positions[0], len(enc.labels)))
    decoded = tok.decode([enc.input_ids[i] for i in answer_positions], skip_special_tokens=True)
    assert decoded.strip() == ex.answers[0].strip()
    assert enc.labels[-1] == tok.eos_token_id
    assert len(encode(ex, tok, 5, len(tok)).input_ids) == 5


def test_truncated_answers_are_counted_and_all_truncated_is_refused(smollm2) -> None:
    tok = smollm2.tokenizer
    examples = load_split("nq_open", "train", limit=3)
    full = [encode(e, tok, 128, len(tok)) for e in examples]
    assert check_answers_kept(full, 128) == 0
    cut = [encode(e, tok, 4, len(tok)) for e in examples]  # inside every prompt
    with pytest.raises(UserError, match="^`max_seq_len` 4 truncates the answer of every"):
        check_answers_kept(cut, 4)
    assert check_answers_kept([full[0], cut[1], cut[2]], 4) == 2


def test_loss_of_a_batch_without_answer_tokens_is_zero_not_nan() -> None:
    logits = torch.randn(2, 5, 7, requires_grad=True)
    labels = torch.full((2, 5), IGNORE)
    loss = lm_loss(logits, labels)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(logits.grad, torch.zeros_like(logits))
    labels[0, 3] = 2
    labels[1, 4] = 5
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 7),
                                                 labels[:, 1:].reshape(-1), ignore_index=IGNORE)
    torch.testing.assert_close(lm_loss(logits, labels), expected)


def test_schedule_same_global_batch_for_accumulation_and_ranks() -> None:
    items = [Encoded([i, i + 1], [IGNORE, i + 1]) for i in range(40)]
    sched = BatchSchedule(items, micro_batch=2, seed=3, pad_id=0)

    def step_rows(step: int, accum: int, world: int) -> list[list[int]]:
        rows = []
        for a in range(accum):
            for r in range(world):
                idx = BatchSchedule.index(step, a, accum, r, world)
                rows += sched.batch(idx)["input_ids"].tolist()
        return sorted(rows)

    for step in range(12):  # crosses epoch boundaries (20 micro-batches per epoch)
        assert step_rows(step, 2, 1) == step_rows(step, 1, 2)
    first_epoch = [sched.batch(i)["input_ids"][:, 0].tolist() for i in range(20)]
    assert sorted(sum(first_epoch, [])) == list(range(40))
    with pytest.raises(UserError, match="fewer than one micro-batch"):
        BatchSchedule(items[:1], micro_batch=2, seed=0, pad_id=0)


def test_a_heldout_fraction_too_small_for_the_split_is_one_line() -> None:
    spec = DataSpec(dataset=str(FIXTURES / "alpaca.jsonl"), heldout_fraction=0.9)
    with pytest.raises(UserError, match="^`heldout_fraction` 0.9: ") as info:
        open_split(spec, "heldout", None)
    assert "\n" not in str(info.value)
    assert cli_message(info.value).startswith("--heldout_fraction 0.9: ")


def test_adapter_data_records_round_trip_and_old_adapters_still_say_their_data(
        tmp_path: Path, monkeypatch) -> None:
    """A shipped name stays a name even beside a folder of that name; adapters exported
    before the "data" record (top-level keys) are scored on their own data."""
    import argparse

    from meft_ds.config import TrainConfig
    from meft_ds.evaluate_cli import DATA_FLAGS, _data_spec
    from meft_ds.export import data_record

    monkeypatch.chdir(tmp_path)
    (tmp_path / "gsm8k").mkdir()
    record = data_record(TrainConfig(dataset="gsm8k"))
    assert record["dataset"] == "gsm8k"
    flags = argparse.Namespace(**dict.fromkeys(DATA_FLAGS))
    assert _data_spec(flags, {"data": record}) == DataSpec(**record)
    old = _data_spec(flags, {"dataset": "gsm8k", "data_file": None, "question_field": None})
    assert old.dataset == "gsm8k" and old.metric == "gsm8k_accuracy"
