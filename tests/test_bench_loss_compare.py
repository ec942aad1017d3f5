"""bench/loss_compare.py: paired window means of two runs' training losses."""

from __future__ import annotations

import json
import math

import pytest

from bench import loss_compare


def _run(tmp_path, name: str, losses: list[float], tokens: list[int]):
    run = tmp_path / name
    run.mkdir()
    rows = [{"step": i + 1, "loss": x, "tokens": t} for i, (x, t) in enumerate(zip(losses, tokens))]
    # a resumed run logs the steps after its checkpoint again: the later entry counts
    rows.insert(0, {"step": 1, "loss": 99.0, "tokens": tokens[0]})
    rows.insert(0, {"eval": "before"})
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return run


@pytest.mark.unit
def test_the_paired_error_removes_the_batches_shared_noise(tmp_path):
    noise = [0.0, 2.0, -1.0, 3.0, -2.0, 1.0]  # which facts a batch holds: shared by both runs
    tokens = [10, 12, 11, 9, 10, 13]
    ref = _run(tmp_path, "ref", [1.0 + n for n in noise], tokens)
    other = _run(tmp_path, "other", [0.8 + n + (0.01 if i % 2 else -0.01)
                                     for i, n in enumerate(noise)], tokens)
    curves = {"ref": loss_compare.losses(ref), "other": loss_compare.losses(other)}
    assert curves["ref"][0][0] == 1.0  # the re-logged step 1 replaced the stale one
    window = loss_compare.compare(curves, "ref", [(2, 5)])["windows"][0]
    row = window["runs"]["other"]
    assert row["minus_reference"] == pytest.approx(-0.2)
    assert row["paired_se"] == pytest.approx(0.01 / math.sqrt(4))
    # the unpaired error of one run's mean is dominated by the shared noise
    assert row["se"] == pytest.approx(window["runs"]["ref"]["se"], rel=0.05) and row["se"] > 0.5
    assert "paired_se" not in window["runs"]["ref"]


@pytest.mark.unit
def test_runs_that_saw_other_batches_or_too_few_steps_are_refused(tmp_path):
    ref = loss_compare.losses(_run(tmp_path, "ref", [1.0, 2.0, 3.0], [5, 6, 7]))
    other = loss_compare.losses(_run(tmp_path, "other", [1.0, 2.0, 3.0], [5, 8, 7]))
    with pytest.raises(SystemExit, match="other micro-batches"):
        loss_compare.compare({"ref": ref, "other": other}, "ref", [(1, 3)])
    loss_compare.compare({"ref": ref, "other": other}, "ref", [(3, 3)])  # same batch there
    with pytest.raises(SystemExit, match="has 3 steps"):
        loss_compare.compare({"ref": ref}, "ref", [(2, 4)])


def _scored(tmp_path, name: str, ok: list[bool]):
    run = tmp_path / name
    run.mkdir(exist_ok=True)
    predictions = [{"question": f"q{i}", "prediction": "", "answers": [], "ok": x}
                   for i, x in enumerate(ok)]
    (run / "predictions.json").write_text(json.dumps(
        {"trained": {"metric": "exact_match", "predictions": predictions}}))
    return loss_compare.answers(run)


@pytest.mark.unit
def test_exact_match_is_paired_question_by_question(tmp_path):
    ref = _scored(tmp_path, "ref", [True] * 8 + [False] * 2)
    # q8 and q9 only the other run answers, q7 only the reference does
    other = _scored(tmp_path, "other", [True] * 7 + [False, True, True])
    report = loss_compare.compare_answers({"ref": ref, "other": other}, "ref")
    row = report["runs"]["other"]
    assert report["runs"]["ref"]["exact_match"] == 0.8 and row["exact_match"] == 0.9
    assert (row["only_run"], row["only_reference"]) == (2, 1)
    # exact: P(X <= 1) for X ~ Bin(3, 1/2) is 4/8, two-sided 1.0; (10, 0) is 2 / 1024
    assert row["mcnemar_p"] == 1.0 and loss_compare.mcnemar_p(10, 0) == pytest.approx(2 / 1024)
    assert loss_compare.answers(tmp_path) is None  # no predictions.json
    with pytest.raises(SystemExit, match="other questions"):
        loss_compare.compare_answers({"ref": ref, "x": [("q0", True)]}, "ref")
    with pytest.raises(SystemExit, match="other questions"):  # same questions, other order
        loss_compare.compare_answers({"ref": ref, "x": ref[::-1]}, "ref")
    # a question asked twice counts twice
    twice = loss_compare.compare_answers({"r": ref + ref[:1], "o": other + other[:1]}, "r")
    assert twice["n"] == 11 and twice["runs"]["o"]["exact_match"] == 10 / 11
