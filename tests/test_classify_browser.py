"""The playground's classify box in a real headless Chromium: a classifier run shows labels with their
probabilities, a regressor run its score, each as /v1/classifications answers; a language model shows the
prompt box again. Screenshot: test-artifacts/playground-classify.png."""

from __future__ import annotations

import shutil

import pytest
from test_classify import graded_sentences, negation_sentences
from test_playground_browser import CHROMIUM, browser  # noqa: F401 - the Chromium fixture
from test_server_live import LiveServer

from tunesmith.atomic import write_jsonl
from tunesmith.classify import Classifier, finetune_classifier

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not shutil.which(CHROMIUM), reason=f"{CHROMIUM} is missing (apt-get install chromium)"),
]

TEXTS = ["the film was not good", "the song was truly lovely"]


@pytest.fixture()
def runs(tunesmith_home, tmp_path):
    """A classifier and a regressor, trained briefly on the tiny model, as runs the server lists."""
    write_jsonl(tmp_path / "labels.jsonl", negation_sentences(48, seed=4))
    write_jsonl(tmp_path / "scores.jsonl", [{"text": f"{r['subject']} {r['phrase']}", "score": r["score"]}
                                             for r in graded_sentences(48, seed=4)])
    common = dict(base="tiny-llama", epochs=1, max_steps=2, batch_size=8, dtype="fp32", progress=False)
    classifier = finetune_classifier(tmp_path / "labels.jsonl", out=tunesmith_home / "runs" / "sentiment",
                                     task="classify", **common)
    regressor = finetune_classifier(tmp_path / "scores.jsonl", out=tunesmith_home / "runs" / "rating",
                                    task="regress", **common)
    return classifier, regressor


def test_playground_classify_box(browser, runs, tunesmith_home, artifacts):  # noqa: F811
    classifier, regressor = runs
    server = LiveServer(tunesmith_home).start()
    try:
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(server.url + "/")
        page.wait_for_function("() => [...document.querySelectorAll('#model option')].some(o => o.value === 'sentiment')")

        page.select_option("#model", "sentiment")
        assert page.is_visible("#classify-card") and not page.is_visible("#prompt-card")
        assert page.inner_text("#classify") == "Classify"
        page.fill("#classify-input", "\n".join(TEXTS))
        page.click("#classify")
        page.wait_for_function("() => document.querySelectorAll('#classify-results .classify-item').length === 2",
                               timeout=60_000)
        expected = Classifier.load(classifier.path).predict(TEXTS)
        items = page.query_selector_all("#classify-results .classify-item")
        for item, text, want in zip(items, TEXTS, expected):
            assert item.query_selector(".classify-text").inner_text() == text
            rows = item.query_selector_all(".prob-row")
            shown = {r.query_selector(".prob-label").inner_text(): r.query_selector("meter").evaluate("m => m.value")
                     for r in rows}
            assert shown == pytest.approx(want["probabilities"], abs=1e-4)
            top = item.query_selector(".prob-row.top .prob-label").inner_text()
            assert top == want["label"]
            first = rows[0].query_selector(".prob-value").inner_text()
            assert first == f"{100 * max(want['probabilities'].values()):.1f}%"  # most likely first
        assert "2 texts" in page.inner_text("#classify-stats")
        page.screenshot(path=str(artifacts / "playground-classify.png"), full_page=True)

        page.select_option("#model", "rating")
        assert page.inner_text("#classify") == "Score"
        page.fill("#classify-input", TEXTS[0])
        page.click("#classify")
        page.wait_for_function("() => document.querySelectorAll('#classify-results .classify-item').length === 1",
                               timeout=60_000)
        score = Classifier.load(regressor.path).predict(TEXTS[:1])[0]["score"]
        assert page.inner_text("#classify-results .classify-score") == f"score {score:.3f}"

        page.select_option("#model", "tiny-llama")  # a language model: back to the prompt
        assert page.is_visible("#prompt-card") and not page.is_visible("#classify-card")
        assert not errors, errors
    finally:
        server.stop()
