"""`tunesmith demo` ends with the answers: the quick eval table after the before/after text."""

from __future__ import annotations

import json

from test_evaluate import prose
from typer.testing import CliRunner

from tunesmith.evaluate import EvalSettings


def test_demo_ends_with_the_eval_table(tmp_path, tiny_model_dir, monkeypatch):
    from tunesmith import demo
    from tunesmith.cli import app

    book = tmp_path / "book.txt"
    book.write_text(prose(16_000, 3))
    said: list[str] = []
    settings = EvalSettings.make(True, words=600, probe_windows=4, sample_tokens=64, bootstrap=50)
    result = demo.run_demo(text=book, out=tmp_path / "demo", base="tiny-llama", epochs=1, max_tokens=16,
                           progress=False, say=said.append, eval_settings=settings)
    evaluation = result.evaluation
    assert evaluation["run"] == "demo" and evaluation["base"] == "tiny-llama"
    written = json.loads((result.run_dir / "eval.json").read_text())
    assert written["fit"] == json.loads(json.dumps(evaluation["fit"]))  # the table is the one written to eval.json
    assert (result.run_dir / "eval.md").is_file() and (result.run_dir / "eval.png").is_file()
    assert any(s.startswith("Evaluating (tunesmith eval --quick)") for s in said)

    # the command prints the before/after text, then the table
    monkeypatch.setattr(demo, "run_demo", lambda **kwargs: result)
    shown = CliRunner().invoke(app, ["demo", "--out", str(tmp_path / "other")])
    assert shown.exit_code == 0, shown.output
    out = shown.output
    assert "fine-tuned" in out and "demo: base tiny-llama vs fine-tuned" in out
    assert out.index("base model") < out.index("demo: base tiny-llama vs fine-tuned")
    assert "held-out" in out and "eval.md, eval.png" in out


def test_demo_can_skip_the_eval(tmp_path, monkeypatch):
    from tunesmith import demo
    from tunesmith.cli import app

    seen = {}

    def fake(**kwargs):
        seen.update(kwargs)
        return demo.DemoResult(tmp_path, "p", "a", "b", None, None, None)

    monkeypatch.setattr(demo, "run_demo", fake)
    shown = CliRunner().invoke(app, ["demo", "--skip-eval", "--out", str(tmp_path / "x")])
    assert shown.exit_code == 0, shown.output
    assert seen["evaluate"] is False and "eval.md" not in shown.output
