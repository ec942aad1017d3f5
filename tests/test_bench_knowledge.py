"""The knowledge-injection study (bench/knowledge.py): its scoring and its resume, on a
tiny random model trained through the real launcher."""

from __future__ import annotations

import json
import subprocess
import time

import pytest
from conftest import DIST_VARS

from bench import damage_parts, knowledge, knowledge_tradeoff


@pytest.fixture(autouse=True)
def _fresh_process_env(monkeypatch):
    """The bench starts each run as from a shell: no rank or port inherited from this test
    process, whose own process group (an earlier test's) may still hold MASTER_PORT."""
    for key in DIST_VARS:
        monkeypatch.delenv(key, raising=False)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A 2-layer, 64-wide random LLaMA with SmolLM2's tokenizer, saved like a checkpoint."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from meft_ds.models import loader

    tokenizer = loader.load_tokenizer("smollm2-135m")
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2,
                         vocab_size=len(tokenizer), max_position_embeddings=256,
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.unit
def test_best_lr_prefers_em_then_lower_loss():
    points = {1e-3: {"trained_em": 0.5, "loss_last_pass": 0.3},
              3e-3: {"trained_em": 0.5, "loss_last_pass": 0.2},
              1e-2: {"trained_em": 0.25, "loss_last_pass": 0.01}}
    assert knowledge.best_lr(points) == 3e-3


@pytest.mark.unit
def test_steps_cover_the_passes_over_the_facts():
    study = knowledge.Study(epochs=6)
    assert knowledge.steps_for(256, study) == 384  # 6 * 256 / micro-batch 4
    assert knowledge.steps_for(6, knowledge.Study(epochs=1)) == 2  # rounded up


@pytest.mark.unit
def test_the_decay_configs_name_todays_defaults_and_each_flag_once():
    """``sparse_1.0_top4_wd3`` is ``--method sparse`` with no tuning flag, and the ledger's
    ``sparse_1.0_top4_lora_all`` is the same but for the rows' decay pinned off, and the
    ``lorawd`` configurations but for the LoRA's decay, ``lorar4`` but for its rank."""
    from meft_ds import cli

    def options(flags: list[str]) -> dict:
        spec = cli.parse(flags)
        return {**vars(spec.train), **vars(spec.method_options)}

    today = options(["--method", "sparse"])
    assert options(knowledge.CONFIGS["sparse_1.0_top4_wd3"]) == today
    before = options(knowledge.CONFIGS["sparse_1.0_top4_lora_all"])
    assert {k for k in today if today[k] != before[k]} == {"sparse_weight_decay"}
    for decay in knowledge.LORA_WEIGHT_DECAYS:  # today's defaults, the LoRA decayed
        lora_decayed = options(knowledge.CONFIGS[f"sparse_1.0_top4_lorawd{decay}"])
        assert {k for k in today if today[k] != lora_decayed[k]} == {"sparse_lora_weight_decay"}
        assert lora_decayed["sparse_lora_weight_decay"] == float(decay)
    rank4 = options(knowledge.CONFIGS["sparse_1.0_top4_lorar4"])
    assert {k for k in today if today[k] != rank4[k]} == {"sparse_attn_lora_r"}
    lora, no_dropout = (options(knowledge.CONFIGS[n]) for n in ("lora_r16", "lora_r16_nodrop"))
    assert {k for k in lora if lora[k] != no_dropout[k]} == {"lora_dropout"}
    for name, flags in knowledge.CONFIGS.items():
        given = [f for f in flags if f.startswith("--")]
        assert len(given) == len(set(given)), name


@pytest.mark.unit
def test_markdown_tables_show_every_point_and_mark_the_chosen_rate():
    def point(em, damage, lr, proxy=2**20):
        return {"trained_em": em, "damage": damage, "lr": lr, "heldout_em": 0.03,
                "memory_proxy_bytes": proxy}
    report = {"points": {"lora_r8": {"64": point(1.0, 1.1, 3e-3), "1024": point(0.953, 2.03, 3e-3,
                                                                           268 * 2**20)},
                         "full": {"256": point(0.992, 0.79, 1e-4)}},
              "sweep": {"lora_r8": {"chosen": 3e-3, "tried": {"0.001": point(0.926, 0.91, 1e-3),
                                                             "0.003": point(0.996, 1.27, 3e-3)}}}}
    text = knowledge.markdown(report).splitlines()
    assert text[0] == ("| config | lr | N = 64 | N = 256 | N = 1024 | held-out (largest N) "
                       "| memory proxy |")
    assert text[2] == "| lora_r8 | 0.003 | 100.0%, +1.10 |  | 95.3%, +2.03 | 3.0% | 268 MiB |"
    assert text[3] == "| full | 0.0001 |  | 99.2%, +0.79 |  | 3.0% | 1 MiB |"
    assert text[5] == "| sweep at N = 256 | lr 0.001 | lr 0.003 |"
    assert text[7] == "| lora_r8 | 92.6%, +0.91 | **99.6%, +1.27** |"


@pytest.mark.unit
def test_pareto_front_within_lora_r64s_memory(tmp_path):
    """A point is on the front unless another within r64's memory has at least its EM with
    at most its damage; a point over that memory is never on it and dominates nothing. The
    ledger reader keeps only points of the study's settings."""
    def point(config, em, damage, proxy=200.0):
        return {"config": config, "n": 256, "lr": 1e-3, "em": em, "damage": damage,
                "proxy_mib": proxy}

    marked = knowledge_tradeoff.pareto([
        point("a", 0.98, 0.8), point("b", 0.99, 1.1), point("c", 0.97, 0.9),  # c: under a
        point("lora_r64", 0.98, 1.6, proxy=530), point("full", 0.995, 0.5, proxy=2000),
        point("d", 0.98, 0.8)])  # d ties a: neither dominates
    assert {p["config"]: p["front"] for p in marked} == {
        "a": True, "b": True, "c": False, "lora_r64": False, "full": False, "d": True}
    assert [p["config"] for p in marked if p["over_budget"]] == ["full"]
    study = knowledge.Study()
    for name, settings in (("kept", knowledge.study_settings(study)), ("other", {"epochs": 1})):
        (tmp_path / name).mkdir()
        entry = {"study": settings, "commit": None, "point": {
            "trained_em": 0.5, "damage": 1.0, "memory_proxy_bytes": 2**20}}
        (tmp_path / name / "n256_lr0.001.json").write_text(json.dumps(entry))
    assert knowledge_tradeoff.ledger_points(tmp_path, study) == [
        {"config": "kept", "n": 256, "lr": 1e-3, "em": 0.5, "damage": 1.0, "proxy_mib": 1.0}]


@pytest.mark.integration
def test_study_scores_and_resumes(tiny_model_dir, tmp_path, monkeypatch):
    study = knowledge.Study(epochs=1, eval_trained=8, eval_heldout=4, damage_examples=4,
                            model=str(tiny_model_dir))
    work = tmp_path / "work"
    work.mkdir()
    ledger = knowledge.Ledger(tmp_path / "points")
    report = knowledge.run_study(["lora_r8", "sparse_0.1"], [8], study, work, sweep=False,
                                 lrs={"lora_r8": 1e-3}, ledger=ledger)
    lora, sparse = report["points"]["lora_r8"]["8"], report["points"]["sparse_0.1"]["8"]
    for point in (lora, sparse):
        assert point["steps"] == 2 and point["trained_n"] == 8
        assert 0.0 <= point["trained_em"] <= 1.0 and 0.0 <= point["heldout_em"] <= 1.0
        assert point["damage"] == pytest.approx(point["nll_after"] - point["nll_before"])
        assert point["nll_before"] > 0 and point["saved_activation_bytes"] > 0
        assert point["memory_proxy_bytes"] == pytest.approx(
            16 * point["trainable_parameters"] + point["saved_activation_bytes"])
    # both start as the base model: one base NLL; the trained models moved away from it
    assert lora["nll_before"] == sparse["nll_before"]
    assert lora["nll_after"] != lora["nll_before"] and sparse["nll_after"] != lora["nll_before"]
    assert lora["lr"] == 1e-3 and sparse["lr"] == knowledge.SWEEP_LRS["sparse_0.1"][0]
    # the sparse store stays on the host: only its routers count as device state
    assert sparse["store_bytes"] > 0 and lora["store_bytes"] == 0
    assert sparse["trainable_parameters"] < sparse["store_bytes"] / 12

    # resume: finished runs are neither trained nor scored again ...
    def no_runs(*args, **kwargs):
        raise AssertionError("a finished run was started again")

    monkeypatch.setattr(subprocess, "run", no_runs)
    again = knowledge.run_study(["lora_r8", "sparse_0.1"], [8], study, work, sweep=False,
                                lrs={"lora_r8": 1e-3})
    assert again["points"] == report["points"]
    # ... and --only_finished scores what exists and lists what does not, training nothing
    partial = knowledge.run_study(["lora_r8", "lora_r64"], [8], study, work, sweep=False,
                                  lrs={"lora_r8": 1e-3}, only_finished=True)
    assert partial["points"] == {"lora_r8": report["points"]["lora_r8"]}
    assert partial["missing"] == ["lora_r64 n=8 lr=0.0003"]
    # ... and a run trained but not yet scored is scored without training
    run = knowledge.run_dir(work, "lora_r8", 8, 1e-3)
    (run / "point.json").unlink()
    rescored = knowledge.run_study(["lora_r8"], [8], study, work, sweep=False,
                                   lrs={"lora_r8": 1e-3})
    assert rescored["points"]["lora_r8"]["8"] == lora
    assert json.loads((run / "point.json").read_text())["trained_em"] == lora["trained_em"]
    # ... and the ledger alone (run directories gone: another machine, a later session)
    # gives the same points, for the same study settings only
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    from_ledger = knowledge.run_study(["lora_r8", "sparse_0.1"], [8], study, elsewhere,
                                      sweep=False, lrs={"lora_r8": 1e-3}, ledger=ledger)
    assert from_ledger["points"] == report["points"] and "missing" not in from_ledger
    other = knowledge.Study(**{**study.__dict__, "epochs": 2})
    assert knowledge.run_study(["lora_r8"], [8], other, elsewhere, sweep=False,
                               lrs={"lora_r8": 1e-3}, only_finished=True,
                               ledger=ledger)["missing"] == ["lora_r8 n=8 lr=0.001"]
    # ... and a sweep waits for its points before choosing: none are made up
    swept = knowledge.run_study(["lora_r8"], [8], study, elsewhere, sweep=True, lrs={},
                                only_finished=True, ledger=ledger)
    assert swept["points"] == {} and swept["missing"] == ["lora_r8 n=256 lr=0.001",
                                                         "lora_r8 n=256 lr=0.003"]

    # bench/damage_parts.py on the trained sparse run: as trained it gives the point's
    # damage; each part switched off changes it; both off give the base model back
    sparse_run = knowledge.run_dir(work, "sparse_0.1", 8, sparse["lr"])
    examples = knowledge.damage_examples(study)
    parts = damage_parts.score_run(sparse_run, examples, sparse["nll_before"])
    assert parts["as_trained"] == pytest.approx(sparse["damage"], abs=1e-6)
    assert parts["no_store"] != parts["as_trained"] != parts["no_lora"]
    assert parts["no_ffn_lora"] == pytest.approx(parts["as_trained"])  # attention LoRA only
    from meft_ds.inference import load_adapted

    edits = damage_parts.variants()
    no_store = damage_parts.edited_copy(sparse_run / "adapter", edits["no_store"],
                                        tmp_path / "no_store")
    neither = damage_parts.edited_copy(no_store, edits["no_lora"], tmp_path / "neither")
    assert knowledge.answer_nll(load_adapted(neither), examples) == \
        pytest.approx(sparse["nll_before"], abs=1e-6)
    # ... and its profile over the answer tokens adds up to the point's damage
    base = damage_parts.token_nll(load_adapted(sparse_run / "adapter", weights=False), examples)
    after = damage_parts.token_nll(load_adapted(sparse_run / "adapter"), examples)
    prof = damage_parts.profile(base, after)
    assert prof["damage"] == pytest.approx(sparse["damage"], abs=1e-5)
    positions = prof["by_position"].values()
    assert sum(p["share_of_damage"] for p in positions) == pytest.approx(prof["damage"])
    assert sum(p["tokens"] for p in positions) == sum(len(x) for x in base[0])
    assert 0.0 < prof["end_probability"] < 1.0
    assert damage_parts.profile(base, base)["damage_without_end"] == 0.0
    lora_run = knowledge.run_dir(work, "lora_r8", 8, 1e-3)  # parts are the sparse runs'
    assert damage_parts.score_run(lora_run, examples, sparse["nll_before"]) == {}


@pytest.mark.integration
def test_a_run_stopped_part_way_continues_from_its_checkpoint(tiny_model_dir, tmp_path,
                                                              monkeypatch):
    """A run killed after a checkpoint (a session's end) is continued, not restarted, and
    trains as the uninterrupted run: the same loss at every step."""
    from conftest import run_losses

    study = knowledge.Study(epochs=4, eval_trained=4, eval_heldout=0, model=str(tiny_model_dir))
    monkeypatch.setattr(knowledge, "CHECKPOINT_STEPS", 1)
    whole = knowledge.train("lora_r8", 8, 1e-3, study, tmp_path / "whole")
    stopped = knowledge.run_dir(tmp_path / "part", "lora_r8", 8, 1e-3)
    real = subprocess.run

    def killed_after_a_checkpoint(cmd, **kwargs):
        proc = subprocess.Popen(cmd, **kwargs)
        while knowledge.checkpoint_step(stopped) is None and proc.poll() is None:
            time.sleep(0.02)
        proc.kill()
        return subprocess.CompletedProcess(cmd, proc.wait())

    monkeypatch.setattr(subprocess, "run", killed_after_a_checkpoint)
    with pytest.raises(SystemExit, match="failed"):
        knowledge.train("lora_r8", 8, 1e-3, study, tmp_path / "part")
    at = knowledge.checkpoint_step(stopped)
    assert at is not None and 1 <= at < 8
    monkeypatch.setattr(subprocess, "run", real)
    assert knowledge.train("lora_r8", 8, 1e-3, study, tmp_path / "part") == stopped
    assert int((stopped / "resumed_from.txt").read_text()) == at
    assert run_losses(stopped) == run_losses(whole) and len(run_losses(whole)) == 8
    assert not (stopped / "checkpoints").exists()  # no longer needed once it finished
