"""Speed and memory of `prepare` on a generated corpus larger than the books it is made of.

A folder of text files (200 MB in all; 20 MB with --quick) is generated from the sentences of the
public-domain books in ../shared/corpora (or random words without them), shuffled into
paragraphs and hard-wrapped at 70 columns, as a Project Gutenberg text is. It is prepared once,
in a fresh child process with the bench's thread settings; the figures are input MB per second of
wall time and the child's peak RSS. Target: peak RSS under 1 GB whatever the input size.

The baseline is the least a competent user would write to get token ids out of the same files:
read each file in 1 MB blocks of whole lines, tokenize them as a batch with the same fast
tokenizer, and append the ids to a uint16 file; no cleaning, cutting, dedupe or split. It is
compared on a smaller corpus (4 MB; 2 MB with --quick) in interleaved runs (tunesmith, baseline,
tunesmith, ...), `repeats` (at least 3) of each, so the comparison does not cost 200 MB a run.

    PYTHONPATH=src .venv/bin/python bench/run.py --quick --only prepare_bench --results /tmp/bench
"""

from __future__ import annotations

import json
import os
import random
import re
import statistics
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORPORA = ROOT.parent / "shared" / "corpora"
RESULT = "PREPARE-BENCH "
RSS_TARGET_MB = 1024.0

CHILD = r"""
import json, resource, sys, time
from pathlib import Path
spec = json.loads(sys.argv[1])
from tunesmith.models import load_tokenizer
tok = load_tokenizer(spec["base"])
start = time.perf_counter()
if spec["kind"] == "tunesmith":
    from tunesmith.prepare import prepare
    result = prepare(spec["data"], out=spec["out"], tokenizer=tok, overwrite=True, estimate=None)
    extra = {"examples": result.report["examples"], "tokens": result.report["tokens"]}
else:
    import numpy as np
    tokens = 0
    with open(spec["out"], "wb") as out:
        for path in sorted(Path(spec["data"]).glob("*.txt")):
            with open(path, encoding="utf-8") as fh:
                while True:
                    lines = fh.readlines(1 << 20)
                    if not lines:
                        break
                    for ids in tok(lines, add_special_tokens=False)["input_ids"]:
                        np.asarray(ids, dtype=np.uint16).tofile(out)
                        tokens += len(ids)
    extra = {"tokens": tokens}
seconds = time.perf_counter() - start
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # carries the parent's peak across exec
for line in open("/proc/self/status"):
    if line.startswith("VmHWM:"):  # this process's own peak
        rss = int(line.split()[1]) / 1024
print("PREPARE-BENCH " + json.dumps({"seconds": seconds, "peak_rss_mb": rss, **extra}))
"""


def make_corpus(folder: Path, total_mb: float, files: int, seed: int = 0) -> int:
    """Write ``files`` text files of about ``total_mb`` MB in all; return the bytes written."""
    sentences: list[str] = []
    for name in ("sherlock.txt", "tinyshakespeare.txt"):
        path = CORPORA / name
        if path.is_file():
            text = " ".join(path.read_text(encoding="utf-8", errors="replace").split())
            sentences += [s for s in re.split(r"(?<=[.!?])\s+", text) if 20 < len(s) < 400]
    rng = random.Random(seed)
    if not sentences:
        words = ["".join(rng.choice("etaoinshrdlu") for _ in range(rng.randint(2, 9))) for _ in range(5000)]
        sentences = [" ".join(rng.choice(words) for _ in range(rng.randint(5, 25))).capitalize() + "." for _ in range(20000)]
    folder.mkdir(parents=True, exist_ok=True)
    per_file = int(total_mb * 1e6 / files)
    written = 0
    for f in range(files):
        size = 0
        with open(folder / f"book-{f:03d}.txt", "w", encoding="utf-8") as out:
            while size < per_file:
                paragraph = " ".join(rng.choice(sentences) for _ in range(rng.randint(2, 8)))
                block = "\n".join(textwrap.wrap(paragraph, 70)) + "\n\n"
                out.write(block)
                size += len(block.encode("utf-8"))
        written += size
    return written


def _child(kind: str, data: Path, out: Path, base: str, env: dict) -> dict:
    spec = {"kind": kind, "data": str(data), "out": str(out), "base": base}
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(spec)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT / "src"), **env}, timeout=1800)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT):
            return json.loads(line[len(RESULT):])
    raise RuntimeError(f"{kind} child failed: {proc.stderr[-2000:]}")


def run(ctx: dict) -> dict:
    say = ctx.get("say", print)
    quick = ctx["quick"]
    big_mb, ab_mb = (20.0, 2.0) if quick else (200.0, 4.0)
    repeats = 1 if quick else max(3, ctx.get("repeats", 3))
    work = Path(ctx["work"]) / "prepare_bench"
    base = ctx.get("model") or "smollm2-135m"
    env = ctx.get("env", {})
    # The throughput against the baseline: interleaved runs on a small corpus.
    small = work / "small"
    small_size = make_corpus(small, ab_mb, files=2, seed=1)
    runs: dict[str, list[dict]] = {"tunesmith": [], "baseline": []}
    for repeat in range(repeats):
        for kind in ("tunesmith", "baseline"):
            out = work / (f"out-{kind}.prepared" if kind == "tunesmith" else f"out-{kind}.bin")
            result = _child(kind, small, out, base, env)
            result["mb_per_second"] = small_size / 1e6 / result["seconds"]
            runs[kind].append(result)
            say(f"  prepare {repeat + 1}/{repeats} {kind} ({small_size / 1e6:.0f} MB): "
                f"{result['mb_per_second']:.2f} MB/s, peak RSS {result['peak_rss_mb']:.0f} MB")
    # Memory at scale: one run on the large corpus.
    data = work / "corpus"
    size = make_corpus(data, big_mb, files=4 if quick else 10)
    big = _child("tunesmith", data, work / "out-big.prepared", base, env)
    big["mb_per_second"] = size / 1e6 / big["seconds"]
    say(f"  prepare {size / 1e6:.0f} MB: {big['mb_per_second']:.2f} MB/s, peak RSS {big['peak_rss_mb']:.0f} MB")
    return {"input_mb": size / 1e6, "files": len(list(data.glob("*.txt"))), "big": big,
            "ab_mb": small_size / 1e6, "repeats": repeats, "runs": runs}


def _stat(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}–{max(values):.2f})"


def render(result: dict) -> str:
    if "error" in result:
        return f"## prepare\n\nfailed: {result['error']}\n"
    ours, theirs, big = result["runs"]["tunesmith"], result["runs"]["baseline"], result["big"]
    worst_rss = max([big["peak_rss_mb"]] + [r["peak_rss_mb"] for r in ours])
    met = "met" if worst_rss < RSS_TARGET_MB else "unmet"
    ratio = [a["mb_per_second"] / b["mb_per_second"] for a, b in zip(ours, theirs)]
    lines = [
        "## prepare: a folder of text, in bounded memory",
        "",
        f"{result['input_mb']:.0f} MB in {result['files']} files, one run: **{big['mb_per_second']:.2f} MB/s**, "
        f"peak RSS **{big['peak_rss_mb']:.0f} MB** ({big['examples']['train']:,} train and "
        f"{big['examples']['valid']:,} valid examples, {big['tokens']['train'] + big['tokens']['valid']:,} tokens).",
        "",
        f"Against the baseline on {result['ab_mb']:.0f} MB, {result['repeats']} interleaved runs each, "
        "median (range), each run a fresh process:",
        "",
        "| | MB/s | peak RSS MB |",
        "|---|---|---|",
        f"| `tunesmith prepare` (clean, cut, dedupe, split, shards) | {_stat([r['mb_per_second'] for r in ours])} "
        f"| {_stat([r['peak_rss_mb'] for r in ours])} |",
        f"| baseline: batch-tokenize lines to uint16 | {_stat([r['mb_per_second'] for r in theirs])} "
        f"| {_stat([r['peak_rss_mb'] for r in theirs])} |",
        "",
        f"- peak RSS under {RSS_TARGET_MB:.0f} MB (worst run {worst_rss:.0f} MB): **{met}**",
        f"- throughput relative to the baseline: {_stat(ratio)}x (no target: prepare tokenizes each "
        "example more than once, to cut it on sentence ends within the block budget, and cleans the text)",
    ]
    return "\n".join(lines) + "\n"
