"""Classifiers and regressors on labelled text: metrics, bad input, learning, two stages, predict, HTTP."""

from __future__ import annotations

import csv
import json
import random

import numpy as np
import pytest

from tunesmith.atomic import write_jsonl
from tunesmith.classify import Classifier, finetune_classifier, predict_file
from tunesmith.errors import TunesmithError
from tunesmith.labelled import read_labelled, split
from tunesmith.rundir import Run
from tunesmith.scores import accuracy, confusion, macro_f1, mse, pearson, ranks, spearman

# ---------------------------------------------------------------------------------------------
# Metrics, against values worked out by hand


def test_classification_metrics_by_hand():
    y_true, y_pred = [0, 0, 1, 1, 2, 2], [0, 1, 1, 1, 2, 0]
    assert confusion(y_true, y_pred, 3).tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert accuracy(y_true, y_pred) == pytest.approx(4 / 6)
    # per class 2TP/(2TP+FP+FN): 2/4, 4/5, 2/3
    assert macro_f1(y_true, y_pred, 3) == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    # a class never seen nor predicted does not count; one always missed counts as 0
    assert macro_f1([0, 0, 1], [0, 0, 0], 3) == pytest.approx((0.8 + 0.0) / 2)


def test_regression_metrics_by_hand():
    assert pearson([1, 2, 3, 4], [2, 4, 5, 9]) == pytest.approx(11 / np.sqrt(130))
    assert ranks([1, 2, 2, 3]).tolist() == [1, 2.5, 2.5, 4]
    assert spearman([1, 2, 2, 3], [10, 20, 30, 40]) == pytest.approx(4.5 / np.sqrt(22.5))
    assert spearman([1, 5, 9], [0.1, 0.2, 100]) == pytest.approx(1.0)  # monotone, not linear
    assert pearson([1, 1, 1], [1, 2, 3]) is None  # undefined for a constant
    assert mse([1, 2], [2, 4]) == pytest.approx(2.5)


# ---------------------------------------------------------------------------------------------
# Reading labelled data; bad input is a clear error and writes nothing


def _csv(path, header, rows):
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def test_columns_are_inferred_and_joined(tmp_path):
    path = _csv(tmp_path / "d.csv", ["id", "review", "rating"], [[i, f"text {i}", i * 0.5] for i in range(30)])
    data = read_labelled(path)
    assert data.task == "regress" and data.label_col == "rating" and data.text_cols == ["review"]
    assert any("rating" in note for note in data.inferred)
    pairs = _csv(tmp_path / "p.csv", ["anchor", "target", "context", "score"], [["a b", "c", "x", "1"], ["d", "e", "y", "0"]])
    data = read_labelled(pairs, task="classify", text_cols=["anchor", "target", "context"])
    assert data.rows[0]["text"] == "anchor: a b ; target: c ; context: x"
    data = read_labelled(pairs, task="classify", text_cols=["anchor", "target"], template="{anchor} vs {target}")
    assert data.rows[1]["text"] == "d vs e"


def test_stratified_split_keeps_class_shares(tmp_path):
    rows = [{"text": f"t{i}", "label": "a" if i < 80 else "b"} for i in range(100)]
    write_jsonl(tmp_path / "d.jsonl", rows)
    train, valid = split(read_labelled(tmp_path / "d.jsonl", task="classify"), 0.2, seed=0)
    assert sorted(r["label"] for r in valid) == ["a"] * 16 + ["b"] * 4
    assert len(train) == 80 and not {r["text"] for r in train} & {r["text"] for r in valid}


BAD = [
    ("missing label column", ["text", "stars"], [["good", "1"], ["bad", "0"]], {}, None,
     ["no label column", "text, stars"]),
    ("empty text", ["text", "label"], [["good", "1"], ["bad", "0"], ["  ", "1"]], {}, 4, ["empty text", "'text'"]),
    ("one class", ["text", "label"], [["good", "1"], ["bad", "1"]], {"task": "classify"}, None,
     ["same label", "'label'"]),
    ("NaN target", ["text", "score"], [["good", "1.5"], ["bad", "nan"]], {"task": "regress"}, 3, ["nan", "'score'"]),
    ("non-numeric target", ["text", "score"], [["good", "1.5"], ["bad", "high"]], {"task": "regress"}, 3,
     ["'high' is not a number"]),
    ("empty target", ["text", "score"], [["good", "1.5"], ["fine", "0.5"], ["bad", ""]], {"task": "regress"}, 4,
     ["empty target", "'score'"]),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_labelled_data_names_file_line_and_column(tmp_path, case):
    _, header, rows, options, line, words = case
    path = _csv(tmp_path / "bad.csv", header, rows)
    out = tmp_path / "run"
    with pytest.raises(TunesmithError) as info:
        finetune_classifier(path, out=out, base="tiny-llama", progress=False, **options)
    message = str(info.value)
    assert str(path) in message
    if line is not None:
        assert f"line {line}" in message
    for word in words:
        assert word in message
    assert not out.exists()


def test_ragged_csv_is_an_error(tmp_path):
    path = tmp_path / "ragged.csv"
    path.write_text("text,label\ngood,1\nbad,0,extra\n")
    with pytest.raises(TunesmithError) as info:
        finetune_classifier(path, out=tmp_path / "run", base="tiny-llama", progress=False)
    assert "line 3" in str(info.value) and "3 cells" in str(info.value) and "2 columns" in str(info.value)
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------
# Real learning on data a bag of words cannot solve

POS = ["good", "great", "wonderful", "lovely", "excellent"]
NEG = ["bad", "dreadful", "awful", "boring", "terrible"]
NEGATORS = ["not", "hardly", "never"]
AMPLIFIERS = ["truly", "really", "very"]
SUBJECTS = ["the film", "the book", "the meal", "the show", "the trip", "the song", "the play", "the game"]


def negation_sentences(n: int, seed: int) -> list[dict]:
    """Positive iff the adjective's polarity is flipped an even number of times: every word occurs
    about equally often in both classes, so word counts alone say nothing about the label."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        positive, negated = rng.random() < 0.5, rng.random() < 0.5
        adjective = rng.choice(POS if positive else NEG)
        modifier = rng.choice(NEGATORS if negated else AMPLIFIERS)
        rows.append({"text": f"{rng.choice(SUBJECTS)} was {modifier} {adjective}",
                     "label": "positive" if positive != negated else "negative"})
    return rows


STRENGTH = {"good": 1, "great": 2, "wonderful": 3, "bad": -1, "awful": -2, "dreadful": -3}


def graded_sentences(n: int, seed: int) -> list[dict]:
    """The score is the adjective's strength (-3..3), its sign flipped by a negator: a word's
    count says nothing about the sign of the score, only the two words together do."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        adjective, negated = rng.choice(list(STRENGTH)), rng.random() < 0.5
        modifier = rng.choice(NEGATORS if negated else AMPLIFIERS)
        rows.append({"subject": rng.choice(SUBJECTS), "phrase": f"was {modifier} {adjective}",
                     "score": -STRENGTH[adjective] if negated else STRENGTH[adjective]})
    return rows


def test_classifier_learns_negation(tmp_path, tiny_model_dir):
    write_jsonl(tmp_path / "train.jsonl", negation_sentences(400, seed=0))
    run = finetune_classifier(tmp_path / "train.jsonl", out=tmp_path / "run", base="tiny-llama", task="classify",
                              method="full", epochs=2, lr=3e-3, batch_size=16, dtype="fp32", progress=False)
    assert run.status == "succeeded" and run.config["task"] == "classify"
    assert {"config.json", "metrics.jsonl", "model", "tokenizer", "data", "confusion.png"} <= {
        p.name for p in run.path.iterdir()}
    epochs = [r for r in run.metrics() if "validation_accuracy" in r]
    assert [r["epoch"] for r in epochs] == [0.0, 1.0, 2.0]
    assert all({"validation_macro_f1", "validation_confusion", "validation_baseline_accuracy"} <= set(r) for r in epochs)

    # held-out sentences, never seen in training
    held = negation_sentences(200, seed=99)
    classifier = Classifier.load(run.path)
    predicted = [p["label"] for p in classifier.predict([r["text"] for r in held])]
    truth = [r["label"] for r in held]
    majority = max(set(truth), key=truth.count)
    acc, baseline = accuracy(truth, predicted), accuracy(truth, [majority] * len(truth))
    assert acc >= baseline + 0.25, (acc, baseline)


def test_regressor_learns_negated_strength(tmp_path, tiny_model_dir):
    write_jsonl(tmp_path / "graded.jsonl", graded_sentences(400, seed=0))
    run = finetune_classifier(tmp_path / "graded.jsonl", out=tmp_path / "run", base="tiny-llama", task="regress",
                              text_cols=["subject", "phrase"], template="{subject} {phrase}", method="full",
                              epochs=3, lr=3e-3, batch_size=16, dtype="fp32", progress=False)
    assert (run.path / "scatter.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    epochs = [r for r in run.metrics() if "validation_pearson" in r]
    assert all({"validation_spearman", "validation_mse", "validation_baseline_mse"} <= set(r) for r in epochs)
    held = graded_sentences(200, seed=99)
    classifier = Classifier.load(run.path)
    assert classifier.format(held[0]) == f"{held[0]['subject']} {held[0]['phrase']}"
    scores = np.array([p["score"] for p in classifier.predict([classifier.format(r) for r in held])])
    truth = np.array([r["score"] for r in held], dtype=float)
    train_mean = np.mean([r["score"] for r in graded_sentences(400, seed=0)])
    assert abs(scores.std() - truth.std()) < 0.5  # reported in the original units, not standardised
    assert mse(truth, scores) < 0.3 * mse(truth, np.full(len(truth), train_mean))
    assert pearson(truth, scores) > 0.8


# ---------------------------------------------------------------------------------------------
# Two stages, predict, the CLI and the HTTP route, on one small classifier


@pytest.fixture(scope="module")
def two_stage_run(tmp_path_factory, tiny_model_dir):
    """A language-model run on raw text, then a classifier trained from it (LoRA + head)."""
    from tunesmith.train import finetune

    root = tmp_path_factory.mktemp("two-stage")
    rows = negation_sentences(120, seed=1)
    (root / "reviews.txt").write_text("\n\n".join(r["text"] + "." for r in rows) + "\n")
    stage1 = finetune(root / "reviews.txt", out=root / "lm", base="tiny-llama", epochs=1, block_size=64,
                      batch_size=4, max_steps=2, dtype="fp32", progress=False, samples=False)
    write_jsonl(root / "labelled.jsonl", rows)
    stage2 = finetune_classifier(root / "labelled.jsonl", out=root / "cls", base=str(stage1.path), task="classify",
                                 epochs=1, max_steps=3, batch_size=8, dtype="fp32", progress=False)
    return stage1, stage2


def test_two_stage_merges_stage_one_then_trains_a_head(two_stage_run):
    stage1, stage2 = two_stage_run
    assert stage2.config["base"] == str(stage1.path.resolve()) and stage2.config["base_is_run"]
    assert (stage2.path / "adapter" / "adapter_config.json").exists()
    results = Classifier.load(stage2.path).predict(["the film was not good", "the song was very lovely"])
    for result in results:
        assert result["label"] in ("negative", "positive")
        assert sum(result["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    # the head starts from stage 1's merged weights: the same text gives the same answer when loaded again
    again = Classifier.load(stage2.path).predict(["the film was not good"])[0]
    assert again["probabilities"] == pytest.approx(results[0]["probabilities"], abs=1e-5)


def test_predict_file_writes_csv_and_jsonl(two_stage_run, tmp_path):
    _, run = two_stage_run
    classifier = Classifier.load(run.path)
    texts = tmp_path / "texts.csv"
    _csv(texts, ["id", "text"], [[i, f"the game was {w}"] for i, w in enumerate(["good", "not bad", "awful"])])
    assert predict_file(classifier, texts, tmp_path / "out.csv", progress=False) == 3
    with open(tmp_path / "out.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["id"] for r in rows] == ["0", "1", "2"]
    direct = classifier.predict(["the game was good", "the game was not bad", "the game was awful"])
    assert [r["predicted_label"] for r in rows] == [d["label"] for d in direct]
    assert float(rows[0]["p_positive"]) == pytest.approx(direct[0]["probabilities"]["positive"], abs=1e-5)
    predict_file(classifier, texts, tmp_path / "out.jsonl", progress=False)
    lines = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [x["predicted_label"] for x in lines] == [d["label"] for d in direct]


def test_predict_cli(two_stage_run, tmp_path):
    from typer.testing import CliRunner

    from tunesmith.cli import app

    _, run = two_stage_run
    result = CliRunner().invoke(app, ["predict", str(run.path), "the play was hardly dreadful"])
    assert result.exit_code == 0, result.output
    expected = Classifier.load(run.path).predict(["the play was hardly dreadful"])[0]["label"]
    assert result.output.split()[0] == expected
    result = CliRunner().invoke(app, ["predict", str(two_stage_run[0].path), "x"])
    assert result.exit_code == 1 and "not a classifier" in result.output
    result = CliRunner().invoke(app, ["generate", str(run.path), "x"])
    assert result.exit_code == 1 and "tunesmith predict" in result.output and "Traceback" not in result.output


def test_classifications_route(two_stage_run, tunesmith_home):
    import shutil

    from fastapi.testclient import TestClient

    from tunesmith.server.app import ServerConfig, create_app

    _, run = two_stage_run
    shutil.copytree(run.path, tunesmith_home / "runs" / "sentiment")
    app = create_app(ServerConfig(home=tunesmith_home, start_worker=False))
    with TestClient(app) as client:
        resp = client.post("/v1/classifications", json={"model": "sentiment", "input": ["the film was not good", "the trip was great"]})
        assert resp.status_code == 200, resp.text
        body = resp.json()
        expected = Classifier.load(run.path).predict(["the film was not good", "the trip was great"])
        assert [d["label"] for d in body["data"]] == [e["label"] for e in expected]
        assert [d["index"] for d in body["data"]] == [0, 1]
        resp = client.post("/v1/classifications", json={"model": "sentiment", "input": ""})
        assert resp.status_code == 400 and resp.json()["error"]["param"] == "input"
        resp = client.post("/v1/classifications", json={"model": "tiny-llama", "input": "x"})
        assert resp.status_code == 400 and resp.json()["error"]["code"] == "model_not_classifier"
        resp = client.post("/v1/classifications", json={"model": "nope", "input": "x"})
        assert resp.status_code == 404
        # a classifier writes no text: the text routes refuse it instead of failing
        resp = client.post("/v1/completions", json={"model": "sentiment", "prompt": "x", "max_tokens": 2})
        assert resp.status_code == 400 and resp.json()["error"]["code"] == "model_not_generative"


# ---------------------------------------------------------------------------------------------


@pytest.mark.real_model
def test_real_model_classifier_trains_and_predicts(tmp_path, real_base_dir):
    write_jsonl(tmp_path / "d.jsonl", negation_sentences(64, seed=2))
    run = finetune_classifier(tmp_path / "d.jsonl", out=tmp_path / "run", base="smollm2-135m", task="classify",
                              epochs=1, max_steps=4, batch_size=8, progress=False)
    assert run.status == "succeeded"
    rows = [r for r in run.metrics() if "training_loss" in r]
    assert len(rows) == 4 and all(np.isfinite(r["training_loss"]) for r in rows)
    result = Classifier.load(run.path).predict(["the meal was not good"])[0]
    assert result["label"] in ("negative", "positive")
    assert sum(result["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)


def test_train_cli_reports_bad_labelled_data_without_traceback(tmp_path, tiny_model_dir):
    from typer.testing import CliRunner

    from tunesmith.cli import app

    path = _csv(tmp_path / "d.csv", ["review", "stars"], [["good", "5"], ["bad", "1"]])
    result = CliRunner().invoke(app, ["train", str(path), "--task", "classify", "--base", "tiny-llama",
                                      "--out", str(tmp_path / "run")])
    assert result.exit_code == 1
    assert "no label column" in result.output and "review, stars" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "run").exists()
    result = CliRunner().invoke(app, ["train", str(path), "--task", "classify", "--label-col", "stars",
                                      "--text-col", "body", "--base", "tiny-llama", "--out", str(tmp_path / "run")])
    assert result.exit_code == 1 and "'body'" in result.output and "review, stars" in result.output


def _fake_vader_archive(path, rows):
    """An archive shaped like the vaderSentiment sdist: the snippets inside a tarball inside it."""
    import io
    import tarfile

    text = "".join(f"{i}\t{rating}\t{snippet}\r\n" for i, (rating, snippet) in enumerate(rows, 1)).encode()

    def add(tar, name, data):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))

    inner = io.BytesIO()
    with tarfile.open(fileobj=inner, mode="w:gz") as tar:
        add(tar, "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt", text)
    with tarfile.open(path, "w:gz") as tar:
        add(tar, "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz", inner.getvalue())
    return path


def test_snippets_are_read_from_the_nested_archive(tmp_path):
    from tunesmith.two_stage import read_snippets

    archive = _fake_vader_archive(tmp_path / "v.tar.gz", [(2.26666666667, "The Rock is ''Conan''."), (-1.8125, "Dull.")])
    rows = read_snippets(archive)
    assert rows == [{"id": "1", "rating": 2.26666666667, "text": 'The Rock is "Conan".'},
                    {"id": "2", "rating": -1.8125, "text": "Dull."}]
    (tmp_path / "bad.tar.gz").write_bytes(b"not a tarball")
    with pytest.raises(TunesmithError, match="not the expected vaderSentiment archive"):
        read_snippets(tmp_path / "bad.tar.gz")


def test_two_stage_demo_runs_end_to_end(tmp_path, tiny_model_dir):
    from tunesmith.two_stage import format_table, run_two_stage

    rows = [(float(STRENGTH[r["phrase"].split()[-1]] * (-1 if r["phrase"].split()[1] in NEGATORS else 1)),
             f"{r['subject']} {r['phrase']}") for r in graded_sentences(90, seed=3)]
    archive = _fake_vader_archive(tmp_path / "v.tar.gz", rows)
    result = run_two_stage(out=tmp_path / "runs", base="tiny-llama", train_rows=50, valid_rows=30, lm_rows=60,
                           archive=archive, progress=False, say=lambda s: None)
    assert [r.name for r in result.rows][1:] == ["(a) stage 2 from the base", "(b) stage 2 from stage 1"]
    assert result.counts == {"stage1_snippets": 60, "stage2_train": 50, "valid": 30}
    assert Run(result.rows[2].run_dir).config["base"] == str(result.stage1_dir.resolve())
    table = format_table(result)
    assert "mean predictor" in table and "sign accuracy" in table
    heldout = [json.loads(x) for x in (tmp_path / "runs" / "heldout.jsonl").read_text().splitlines()]
    assert len(heldout) == 30 and {"text", "rating", "a", "b"} <= set(heldout[0])
    assert result.rows[1].pearson == pytest.approx(pearson([r["rating"] for r in heldout], [r["a"] for r in heldout]))
    assert result.cpu_seconds > 0 and set(result.effect) >= {"pearson", "pearson_ci", "sign_accuracy"}


def test_stage1_effect_is_b_minus_a_with_a_paired_interval():
    from tunesmith.two_stage import format_effect, stage1_effect

    truth = np.array([1.0, -1.0, 2.0, -2.0, 3.0, -0.5, 0.5, -3.0])
    # (a) is exactly wrong (Pearson -1, no sign right), (b) exactly right: every resample says so
    effect = stage1_effect(truth, -truth, truth)
    assert effect["pearson"] == pytest.approx(2.0) and effect["pearson_ci"] == pytest.approx([2.0, 2.0])
    assert effect["sign_accuracy"] == pytest.approx(1.0) and effect["sign_accuracy_ci"] == pytest.approx([1.0, 1.0])
    assert "stage 1 helped" in format_effect(effect)
    same = stage1_effect(truth, truth + 0.1, truth + 0.1)
    assert same["pearson"] == 0 and same["pearson_ci"] == [0, 0] and "no clear effect" in format_effect(same)
    # (b) right on 3 of 8 signs where (a) is right on 2: +12.5 points, and the interval spans 0
    a = np.array([1, 1, 1, 1, -1, 1, -1, 1.0]) * np.abs(truth)
    b = np.array([1, -1, 1, 1, -1, 1, -1, 1.0]) * np.abs(truth)
    mixed = stage1_effect(truth, a, b)
    assert mixed["sign_accuracy"] == pytest.approx(1 / 8)
    assert mixed["sign_accuracy_ci"][0] <= 0 <= mixed["sign_accuracy_ci"][1]


def test_demo_two_stage_prints_the_table(monkeypatch, tmp_path):
    from typer.testing import CliRunner

    from tunesmith import two_stage
    from tunesmith.cli import app

    seen = {}

    def fake(**kwargs):
        seen.update(kwargs)
        return two_stage.TwoStageResult(
            rows=[two_stage.StageResult("mean predictor (baseline)", None, None, 3.1, 0.52, 0.0),
                  two_stage.StageResult("(a) stage 2 from the base", 0.61, 0.6, 1.9, 0.74, 5.0, tmp_path),
                  two_stage.StageResult("(b) stage 2 from stage 1", 0.66, 0.65, 1.7, 0.77, 5.0, tmp_path)],
            stage1_dir=tmp_path / "stage1-lm", counts={"valid": 400}, seconds=60.0)

    monkeypatch.setattr(two_stage, "run_two_stage", fake)
    result = CliRunner().invoke(app, ["demo", "--two-stage", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert seen["out"] == tmp_path and seen["full"] is False
    lines = result.output.splitlines()
    assert any(line.startswith("(b) stage 2 from stage 1") and "0.660" in line and "0.770" in line for line in lines)
    assert any(line.startswith("mean predictor") and "0 (const)" in line and "0.520" in line for line in lines)


# ---------------------------------------------------------------------------------------------
# `tunesmith prepare` on labelled data: the task, the labels and each problem, with its lines


def _checks(report) -> dict:
    return {c["name"]: c for c in report["checks"]}


def test_prepare_infers_the_task_as_the_legacy_tool_did(tmp_path):
    from tunesmith.labelled import inspect_labelled, looks_labelled

    words = _csv(tmp_path / "words.csv", ["text", "label"], [[f"t{i}", "pos" if i % 2 else "neg"] for i in range(12)])
    stars = _csv(tmp_path / "stars.csv", ["review", "rating"], [[f"t{i}", i % 5 + 1] for i in range(40)])
    scores = _csv(tmp_path / "scores.csv", ["sentence", "score"], [[f"t{i}", i / 4] for i in range(40)])
    assert inspect_labelled(words)["task"] == "classify"
    assert inspect_labelled(stars)["task"] == "classify"  # 5 distinct numbers: classes
    assert "5 distinct values" in inspect_labelled(stars)["task_reason"]
    assert inspect_labelled(scores)["task"] == "regress"  # 40 distinct numbers: a score
    # text without labels, and prompt/completion pairs, are for generation: prepare's own path
    write_jsonl(tmp_path / "text.jsonl", [{"text": "a"}, {"text": "b"}])
    _csv(tmp_path / "pairs.csv", ["prompt", "completion", "label"], [["a", " b", "x"]])
    assert [looks_labelled(p) for p in (words, stars, scores, tmp_path / "text.jsonl", tmp_path / "pairs.csv")] == [
        True, True, True, False, False]
    assert looks_labelled(tmp_path / "text.jsonl", label_col="text")  # named explicitly


def test_prepare_reports_distribution_small_classes_and_conflicts(tmp_path):
    from tunesmith.labelled import inspect_labelled

    rows = ([[f"good {i}", "pos"] for i in range(6)] + [[f"bad {i}", "neg"] for i in range(5)]
            + [["meh", "mixed"], ["so so", "mixed"]] + [["good  0", "neg"], ["bad 1", "neg"]])
    # lines: header 1; pos 2-7; neg 8-12; mixed 13-14; "good  0" (= line 2 up to whitespace) 15; "bad 1" again 16
    report = inspect_labelled(_csv(tmp_path / "d.csv", ["text", "label"], rows))
    assert report["label_counts"] == {"mixed": 2, "neg": 7, "pos": 6}
    checks = _checks(report)
    assert checks["small classes"]["status"] == "warning" and checks["small classes"]["lines"] == [13, 14]
    assert "mixed (2)" in checks["small classes"]["message"]
    # "bad 1" twice with the same label is no conflict; "good 0" as pos and as neg is
    assert report["conflicting_duplicates"] == [{"text": "good 0", "lines": [2, 15], "labels": ["pos", "neg"]}]
    assert "lines 2, 15: 'pos' vs 'neg'" in checks["conflicting duplicates"]["message"]
    assert not any(c["status"] == "error" for c in report["checks"])


def test_prepare_reports_numbers_stored_as_strings_and_nan_targets(tmp_path):
    from tunesmith.labelled import inspect_labelled

    rows = [{"text": f"t{i}", "score": i * 0.5} for i in range(40)]
    rows[3]["score"] = "1.5"          # line 4: a number stored as a string
    rows[6]["score"] = float("nan")   # line 7: NaN (json writes it as NaN)
    rows[9]["score"] = "n/a"          # line 10: not a number
    rows[12]["score"] = ""            # line 13: empty
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    report = inspect_labelled(tmp_path / "d.jsonl")
    assert report["task"] == "regress"
    checks = _checks(report)
    assert checks["numeric labels"]["lines"] == [4] and "stored as a string" in checks["numeric labels"]["message"]
    assert checks["targets"]["status"] == "error" and checks["targets"]["lines"] == [7, 10, 13]
    assert "1 NaN" in checks["targets"]["message"] and "1 not a number" in checks["targets"]["message"]
    assert report["target"]["count"] == 37
    # in a CSV every cell is a string; one number written two ways is what matters there
    path = _csv(tmp_path / "c.csv", ["text", "label"], [["a", "1"], ["b", "1.0"], ["c", "0"], ["d", "0"]])
    check = _checks(inspect_labelled(path))["numeric labels"]
    assert check["status"] == "warning" and "'1' = '1.0'" in check["message"] and check["lines"] == [2, 3]


def test_prepare_errors_for_what_train_refuses(tmp_path):
    from tunesmith.labelled import inspect_labelled

    one = inspect_labelled(_csv(tmp_path / "one.csv", ["text", "label"], [["a", "x"], ["b", "x"]]))
    assert _checks(one)["distribution"]["status"] == "error" and "single class" in _checks(one)["distribution"]["message"]
    empty = inspect_labelled(_csv(tmp_path / "e.csv", ["text", "label"], [["a", "x"], [" ", "y"], ["c", "y"], ["", "x"]]))
    assert _checks(empty)["empty text"]["lines"] == [3, 5]


def test_prepare_cli_on_labelled_data_reports_and_writes_nothing(tmp_path):
    from typer.testing import CliRunner

    from tunesmith.cli import app

    path = _csv(tmp_path / "reviews.csv", ["id", "review", "stars"],
                [[i, f"review {i}", "good" if i % 3 else "bad"] for i in range(30)])
    before = sorted(p.name for p in tmp_path.iterdir())
    result = CliRunner().invoke(app, ["prepare", str(path), "--label-col", "stars"])
    assert result.exit_code == 0, result.output
    assert "task      classification" in result.output and "bad 10, good 20" in result.output
    assert f"tunesmith train {path} --task classify --label-col stars" in result.output
    bad = _csv(tmp_path / "bad.csv", ["text", "score"], [[f"t{i}", i] for i in range(20)] + [["x", "nan"]])
    result = CliRunner().invoke(app, ["prepare", str(bad)])
    assert result.exit_code == 1 and "line 22" in result.output and "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(before + ["bad.csv"])
    write_jsonl(tmp_path / "plain.jsonl", [{"text": "no labels here"}])
    result = CliRunner().invoke(app, ["prepare", str(tmp_path / "plain.jsonl"), "--text-col", "text"])
    assert result.exit_code == 1 and "--text-col" in result.output and "no label column" in result.output


def test_train_auto_task_names_the_nan_line(tmp_path):
    path = _csv(tmp_path / "d.csv", ["text", "score"], [[f"t{i}", i * 0.3] for i in range(30)] + [["x", "NaN"]])
    with pytest.raises(TunesmithError) as info:
        read_labelled(path)  # 30 distinct numbers and one NaN: still a regression, and the NaN is an error
    assert "line 32" in str(info.value) and "'score'" in str(info.value) and "finite number" in str(info.value)


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_labelled_data_from_the_cli(tmp_path, case):
    from typer.testing import CliRunner

    from tunesmith.cli import app

    _, header, rows, options, line, words = case
    path = _csv(tmp_path / "bad.csv", header, rows)
    args = ["train", str(path), "--task", options.get("task", "classify" if "label" in header else "regress"),
            "--base", "tiny-llama", "--out", str(tmp_path / "run")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert str(path) in result.output and all(word in result.output for word in words)
    if line is not None:
        assert f"line {line}" in result.output
    assert not (tmp_path / "run").exists()


def test_ragged_rows_name_the_line_and_column(tmp_path):
    (tmp_path / "short.tsv").write_text("text\tlabel\ngood\t1\nbad\n")
    with pytest.raises(TunesmithError) as info:
        finetune_classifier(tmp_path / "short.tsv", out=tmp_path / "run", base="tiny-llama", progress=False)
    assert str(info.value).startswith(f"{tmp_path / 'short.tsv'}, line 3, field 'label': this row has 1 cell but")
    assert "no cell for column 'label'" in str(info.value) and not (tmp_path / "run").exists()


def test_bad_jsonl_rows_name_the_line(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", [{"text": "good", "label": "pos"}, {"text": "", "label": "neg"}])
    with pytest.raises(TunesmithError, match=r"d\.jsonl, line 2, field 'text': empty text"):
        finetune_classifier(tmp_path / "d.jsonl", out=tmp_path / "run", base="tiny-llama", progress=False)
    write_jsonl(tmp_path / "e.jsonl", [{"text": "good", "stars": 1}, {"text": "bad", "stars": 0}])
    with pytest.raises(TunesmithError, match="no label column found; the columns are: text, stars"):
        finetune_classifier(tmp_path / "e.jsonl", out=tmp_path / "run", base="tiny-llama", progress=False)
    assert not (tmp_path / "run").exists()


def test_block_size_is_the_one_setting_for_text_length(tmp_path, tiny_model_dir):
    from typer.testing import CliRunner

    from tunesmith.cli import app
    from tunesmith.config import TrainConfig, spec

    write_jsonl(tmp_path / "d.jsonl", negation_sentences(40, seed=5))
    result = CliRunner().invoke(app, ["train", str(tmp_path / "d.jsonl"), "--task", "classify", "--base", "tiny-llama",
                                      "--block-size", "16", "--max-steps", "1", "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    run = Run(tmp_path / "run")
    assert run.config["block_size"] == 16
    clf = Classifier.load(run.path)
    words = "the film was not good and then " * 10  # far more than 16 tokens
    assert len(clf.tokenizer(words, add_special_tokens=False)["input_ids"]) > 40
    # only the first 16 tokens count: what comes after them changes nothing
    one, two = clf.predict([words, words + "truly wonderful lovely excellent"])
    assert one["probabilities"] == pytest.approx(two["probabilities"], abs=1e-6)
    # the default and the bounds are TrainConfig's
    from tunesmith.classify import ClassifyConfig

    assert ClassifyConfig().block_size == spec(TrainConfig, "block_size")["default"]
    result = CliRunner().invoke(app, ["train", str(tmp_path / "d.jsonl"), "--task", "classify", "--base", "tiny-llama",
                                      "--block-size", "8", "--out", str(tmp_path / "run2")])
    assert result.exit_code == 1 and "--block-size" in result.output and "between 16 and 8192" in result.output
    assert not (tmp_path / "run2").exists()
