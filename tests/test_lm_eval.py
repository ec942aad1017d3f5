"""lm-evaluation-harness on meft_ds models: the shipped ``meft_nq_open`` task asks and
scores as ``launch/evaluate.py`` does, and HFLM's log-likelihoods are the model's own."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import save_tiny_base

from meft_ds import export, methods, options
from meft_ds.config import TrainConfig
from meft_ds.data import load_split
from meft_ds.data.prompts import IGNORE, encode_ids, prompt_text
from meft_ds.eval import first_answer_line
from meft_ds.integrations.lm_eval import TASKS, task_dir, task_manager
from meft_ds.models import loader
from meft_ds.trainer import lm_loss

pytest.importorskip("lm_eval")

N_TRAINED, N_ASKED = 4, 6  # the LoRA learns the first 4 NQ-open questions; 6 are asked


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> Path:
    """A tiny random LLaMA saved as a model directory, with SmolLM2's tokenizer."""
    return save_tiny_base(tmp_path_factory.mktemp("base"))


@pytest.fixture(scope="module")
def lora_export(tiny_base: Path, tmp_path_factory) -> Path:
    """meft_ds's LoRA trained (in process) on the first questions of the shipped nq_open
    train split until it answers them, exported as the launcher exports it."""
    cls = methods.get("lora")
    method = cls(options.build(cls.Options, {"lora_r": 16, "lora_dropout": 0.0}), None)
    loaded = loader.load_model(str(tiny_base))
    module = method.apply(loaded.model)
    vocab = loaded.model.config.vocab_size
    rows = [encode_ids(e, "plain", loaded.tokenizer, 64, vocab)
            for e in load_split("nq_open", "train", limit=N_TRAINED)]
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), loaded.tokenizer.eos_token_id)
    labels = torch.full((len(rows), width), IGNORE)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (row_ids, row_labels) in enumerate(rows):
        ids[i, : len(row_ids)], labels[i, : len(row_ids)] = (torch.tensor(row_ids),
                                                            torch.tensor(row_labels))
        mask[i, : len(row_ids)] = 1
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    torch.manual_seed(0)
    for _ in range(60):
        lm_loss(method.forward(module, ids, mask), labels).backward()
        optimizer.step()
        optimizer.zero_grad()
    out = tmp_path_factory.mktemp("run") / "adapter"
    engine = SimpleNamespace(module=module.eval(), zero_optimization_stage=lambda: 0)
    cfg = TrainConfig(method="lora", model=str(tiny_base), prompt_format="plain")
    export.save_adapter(method, engine, out, cfg, method.options, loaded.tokenizer)
    return out


def _hflm(base: Path, adapter: Path | None = None, batch_size: int = 4):
    """HFLM around a model object: the base, or the export loaded through PEFT."""
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    tokenizer = AutoTokenizer.from_pretrained(base)  # a LoRA export holds no tokenizer
    return HFLM(pretrained=model.eval(), tokenizer=tokenizer, add_bos_token=False,
                batch_size=batch_size), model, tokenizer


@pytest.mark.integration
def test_simple_evaluate_scores_as_meft_ds_evaluate(tiny_base: Path, lora_export: Path):
    from lm_eval import simple_evaluate

    from meft_ds.evaluate_cli import build_parser, run

    ours = run(build_parser().parse_args([
        "--adapter", str(lora_export), "--split", "train", "--limit", str(N_ASKED),
        "--batch_size", "1", "--no_progress"]))  # batch 1 on both sides: no padding, so
    # the two generate with the same shapes and kernels on any CPU (the harness sorts and
    # batches requests its own way; padded batches may round differently)
    assert ours["data"] == "nq_open" and ours["prompt_format"] == "plain" and ours["n"] == N_ASKED
    assert 0 < ours["score"] < 1  # it learnt some questions, not the ones it never saw
    lm, _, tokenizer = _hflm(tiny_base, lora_export, batch_size=1)
    harness = simple_evaluate(lm, tasks=["meft_nq_open"], limit=N_ASKED, log_samples=True,
                              task_manager=task_manager(include_defaults=False))
    assert harness["results"]["meft_nq_open"]["exact_match,none"] == ours["score"]
    samples = sorted(harness["samples"]["meft_nq_open"], key=lambda s: s["doc_id"])
    examples = load_split("nq_open", "train", limit=N_ASKED)
    for sample, example, row in zip(samples, examples, ours["predictions"], strict=True):
        prompt, gen_kwargs = sample["arguments"][0]
        assert prompt == prompt_text(example, "plain", tokenizer)  # the same question asked
        assert gen_kwargs["max_gen_toks"] == 24 and gen_kwargs["do_sample"] is False
        # the same greedy answer (the harness keeps the raw generation; meft_ds its first
        # line) and the same verdict, question by question
        assert first_answer_line(sample["filtered_resps"][0]) == row["prediction"]
        assert sample["exact_match"] == float(row["ok"])


@pytest.mark.integration
def test_heldout_task_reads_efficientqa_and_data_dir(tiny_base: Path, tmp_path: Path):
    """``meft_nq_open_heldout`` asks EfficientQA's questions; ``data_dir`` (task metadata,
    as ``--metadata`` on the command line) reads another copy of the files."""
    from lm_eval import simple_evaluate

    from meft_ds.data.sources import SHIPPED_DIR

    assert {p.stem for p in task_dir().glob("*.yaml")} == set(TASKS)
    copy = tmp_path / "nq_open"
    copy.mkdir()
    rows = [{"question": "what is the capital of nowhere", "answer": ["Xyzzy"]}] * 2
    (copy / "NQ-open.dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    heldout = SHIPPED_DIR / "nq_open" / "NQ-open.efficientqa.dev.1.1.jsonl"
    (copy / heldout.name).write_text(heldout.read_text())
    lm, *_ = _hflm(tiny_base)
    got = simple_evaluate(lm, tasks=list(TASKS), limit=2, log_samples=True,
                          task_manager=task_manager(include_defaults=False,
                                                       metadata={"data_dir": str(tmp_path)}))
    asked = {task: [s["arguments"][0][0] for s in got["samples"][task]] for task in TASKS}
    assert asked["meft_nq_open"] == ["Question: what is the capital of nowhere?\nAnswer:"] * 2
    first = json.loads(heldout.read_text().splitlines()[0])["question"]
    assert f"Question: {first}?\nAnswer:" in asked["meft_nq_open_heldout"]


@pytest.mark.unit
def test_hflm_loglikelihood_is_the_models_own(tiny_base: Path):
    """HFLM's log-likelihood of a continuation is the sum of the model's log-softmax over
    its tokens (fp32 logits; tolerance 1e-4 absolute for batching and padding, 0.0 seen)."""
    from lm_eval.api.instance import Instance

    lm, model, tokenizer = _hflm(tiny_base, batch_size=2)
    pairs = [("Question: who wrote the iliad?\nAnswer:", " Homer"),
             ("Question: when was the last time anyone was on the moon?\nAnswer:",
              " 14 December 1972 UTC"),
             ("The capital of France is", " Paris, of course")]
    first = tokenizer(pairs[0][0], add_special_tokens=False)["input_ids"]
    with torch.no_grad():  # and the model's own greedy continuation, which HFLM calls greedy
        top = model(input_ids=torch.tensor([first])).logits[0, -1].argmax()
    pairs.append((pairs[0][0], tokenizer.decode([int(top)])))
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    got = lm.loglikelihood(requests, disable_tqdm=True)
    for (context, continuation), (logprob, greedy) in zip(pairs, got, strict=True):
        ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
        cont = tokenizer(context + continuation, add_special_tokens=False)["input_ids"][len(ctx):]
        assert tokenizer.decode(cont) == continuation  # the split lies between the two
        ids = torch.tensor([ctx + cont])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
        steps = logp[len(ctx) - 1 : -1]
        want = steps.gather(1, torch.tensor(cont)[:, None]).sum().item()
        assert abs(logprob - want) < 1e-4, (context, logprob, want)
        assert greedy == bool((steps.argmax(-1) == torch.tensor(cont)).all())
    assert [greedy for _, greedy in got] == [False, False, False, True]
