"""Speed and memory of the copy finder and of the style scores (a `make bench` section).

Targets: 1M-token corpus: build the index <= 2 s, check a 1,000-token text <= 50 ms; 100M-token
corpus: build <= 3 min with peak RSS <= 4 GB, check <= 250 ms; style scores for 10k words <= 1 s.

The corpus is generated: sentences of the public-domain books in ../shared/corpora (or, without
them, random words) shuffled into rows of ~1,500 characters until it has about N tokens, written
as a prepared directory. Every build and check runs in a child process of its own, with the
bench's thread settings, so peak RSS is that of the index alone.

Baselines, in the same children and interleaved with ours (A B A B ...):
- build: what the same libraries give used plainly: ``tokenizers`` ``encode_batch`` of every row
  (both sides may use all the bench's threads) and ``pydivsufsort.divsufsort`` on the id array;
- check: a set of the corpus's 12-token n-grams (Python tuples), the usual hand-written copy
  check; it answers only "is this 12-gram in the corpus" (no spans, counts, places or novelty);
- style: Cosine Delta with one ``collections.Counter`` per bag, on the same bags.
At 100M tokens only our index is built (once): the n-gram set would not fit in memory.

    .venv/bin/python bench/run.py --quick --only copies_bench --results /tmp/bench
    .venv/bin/python bench/copies_bench.py --tokens 1000000        # one size, ours only, as JSON
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORPORA = ROOT.parent / "shared" / "corpora"
RESULT = "COPIES-BENCH "
CHARS_PER_TOKEN = 4.3  # English prose with this tokenizer; the real count is reported after building
TARGETS = {  # tokens -> (build seconds, check milliseconds, peak RSS MB)
    1_000_000: (2.0, 50.0, None),
    100_000_000: (180.0, 250.0, 4096.0),
}
STYLE_WORDS = 10_000
STYLE_TARGET_S = 1.0
NGRAM = 12


def _sentences(seed: int) -> list[str]:
    books = [CORPORA / "sherlock.txt", CORPORA / "tinyshakespeare.txt"]
    text = " ".join(p.read_text(encoding="utf-8-sig") for p in books if p.is_file())
    if text:
        return [s for s in re.split(r"(?<=[.!?])\s+", " ".join(text.split())) if len(s) > 20]
    rng = random.Random(seed)
    words = ["".join(rng.choice("etaoinshrdlucmfwyp") for _ in range(rng.randint(2, 9))) for _ in range(5000)]
    return [" ".join(rng.choices(words, k=rng.randint(6, 25))).capitalize() + "." for _ in range(20000)]


def make_corpus(directory: Path, tokens: int, seed: int = 0) -> Path:
    """A prepared directory of about ``tokens`` tokens: shuffled sentences in rows of ~1,500 characters."""
    rng = random.Random(seed)
    sentences = _sentences(seed)
    directory.mkdir(parents=True, exist_ok=True)
    target = int(tokens * CHARS_PER_TOKEN)
    written = 0
    with open(directory / "train.jsonl", "w", encoding="utf-8") as fh:
        while written < target:
            rng.shuffle(sentences)
            row, size = [], 0
            for sentence in sentences:
                row.append(sentence)
                size += len(sentence) + 1
                if size >= 1500:
                    fh.write(json.dumps({"text": " ".join(row)}) + "\n")
                    written += size
                    row, size = [], 0
                    if written >= target:
                        break
    report = {"format": "text", "base": "smollm2-135m", "source": None, "examples": {"train": 0, "valid": 0}}
    (directory / "report.json").write_text(json.dumps(report), encoding="utf-8")
    return directory


def _query(directory: Path, tokens: int, seed: int) -> str:
    """About ``tokens`` tokens: a passage copied from the corpus between two runs of shuffled words."""
    rng = random.Random(seed)
    rows = []
    with open(directory / "train.jsonl", encoding="utf-8") as fh:
        for i, line in enumerate(fh):
            rows.append(json.loads(line)["text"])
            if i > 200:
                break
    chars = int(tokens * CHARS_PER_TOKEN)
    copied = rng.choice(rows)[: chars // 2]
    words = " ".join(rows[:50]).split()
    novel = " ".join(rng.choice(words) for _ in range(chars // 12))
    return f"{novel[: chars // 4]} {copied} {novel[chars // 4 : chars // 2]}"


def _rss_mb() -> float:
    """Peak RSS of this process (VmHWM; ru_maxrss would carry the parent's peak across exec)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _timed(fn):
    started, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - started, time.process_time() - cpu


# --- children ---------------------------------------------------------------------------------


def _child_ours(directory: Path, checks: int, check_tokens: int) -> dict:
    from tunesmith.copies import CopyIndex

    index, build, build_cpu = _timed(lambda: CopyIndex.open(directory, rebuild=True))
    _, reopen, _ = _timed(lambda: CopyIndex.open(directory))
    text = _query(directory, check_tokens, seed=1)
    report, first, _ = _timed(lambda: index.check(text))
    times, cpu_times = [], []
    for _ in range(checks):
        _, wall, cpu = _timed(lambda: index.check(text))
        times.append(wall)
        cpu_times.append(cpu)
    return {
        "tokens": int(index.meta["tokens"]),
        "build_s": round(build, 3),
        "build_cpu_s": round(build_cpu, 3),  # CPU time of all threads: less sensitive to a busy machine
        "build_parts_s": index.meta.get("build_seconds"),
        "reopen_s": round(reopen, 3),
        "check_tokens": report.n_tokens,
        "check_spans": len(report.spans),
        "check_copy_rate": round(report.copy_rate, 3),
        "first_check_ms": round(first * 1000, 1),
        "check_ms": [round(t * 1000, 2) for t in times],
        "check_cpu_ms": [round(t * 1000, 2) for t in cpu_times],
        "peak_rss_mb": _rss_mb(),
        "index_mb": round(sum(f.stat().st_size for f in (directory / "copies").iterdir()) / 2**20, 1),
    }


def _child_baseline(directory: Path, checks: int, check_tokens: int) -> dict:
    """Plain use of the same libraries for the index, and a 12-gram set for the check."""
    import numpy as np
    from pydivsufsort import divsufsort
    from tokenizers import Tokenizer

    from tunesmith.copies import _base_tokenizer

    def build():
        tokenizer = Tokenizer.from_file(str(_base_tokenizer("smollm2-135m")))
        rows = [json.loads(line)["text"] for line in open(directory / "train.jsonl", encoding="utf-8")]
        ids = [e.ids + [65535] for e in tokenizer.encode_batch(rows, add_special_tokens=False)]
        tokens = np.fromiter((t for row in ids for t in row), dtype=np.uint16)
        return tokenizer, tokens, divsufsort(tokens)

    (tokenizer, tokens, sa), build_s, build_cpu = _timed(build)
    listed = tokens.tolist()
    grams, set_s, set_cpu = _timed(lambda: {tuple(listed[i : i + NGRAM]) for i in range(len(listed) - NGRAM + 1)})
    rss_with_set = _rss_mb()
    text = _query(directory, check_tokens, seed=1)

    def check():
        q = tokenizer.encode(text, add_special_tokens=False).ids
        hit = [tuple(q[i : i + NGRAM]) in grams for i in range(len(q) - NGRAM + 1)]
        covered = [False] * len(q)
        for i, h in enumerate(hit):
            if h:
                covered[i : i + NGRAM] = [True] * NGRAM
        return sum(covered) / max(len(q), 1)

    times = []
    for _ in range(checks):
        _, wall, _ = _timed(check)
        times.append(wall)
    return {
        "tokens": int(len(tokens)),
        "build_s": round(build_s, 3),
        "build_cpu_s": round(build_cpu, 3),
        "sa_entries": int(len(sa)),
        "ngram_set_s": round(set_s, 3),
        "ngram_set_cpu_s": round(set_cpu, 3),
        "check_ms": [round(t * 1000, 2) for t in times],
        "check_copy_rate": round(check(), 3),
        "peak_rss_mb": rss_with_set,
    }


def _style_sides(words: int) -> list[str]:
    text = " ".join(" ".join(_sentences(0)).split())
    pieces = text.split(" ")
    out, step = [], max(1, len(pieces) // 4)
    for k in range(4):  # training text, held-out text, base samples, fine-tuned samples
        chunk = pieces[k * step : k * step + words] if (k + 1) * step <= len(pieces) else pieces[:words]
        out.append(" ".join((chunk * (words // max(len(chunk), 1) + 1))[:words]))
    return out


def _child_style(words: int, baseline: bool) -> dict:
    """What `eval` computes on the style side for ``words`` words per side: words, Cosine Delta at
    100/300/500 MFW with 200 bootstrap bags, sentence length, MATTR, punctuation, distinct-2/3."""
    import numpy as np

    from tunesmith import style

    texts = _style_sides(words)

    def ours():
        lists = [style.words(t) for t in texts]
        delta = style.style_distance(*lists, n_boot=200, seed=0)
        feats = [style.features(t) for t in texts[1:]]
        distinct = [style.distinct_n([t], n, words) for t in texts[1:] for n in (2, 3)]
        return delta, feats, distinct

    def theirs():  # the same Delta with a Counter per bag
        from collections import Counter

        lists = [style.words(t) for t in texts]
        rng = np.random.default_rng(0)
        out = {}
        for n_mfw in style.MFW_SIZES:
            bags = [[[side[i] for i in rng.integers(0, len(side), size=style.BAG_WORDS)] for _ in range(25)] for side in lists]
            total = Counter(w for side in bags for bag in side for w in bag)
            mfw = [w for w, _ in total.most_common(n_mfw)]
            counted = [Counter(bag) for side in bags for bag in side]
            freq = np.array([[c[w] / style.BAG_WORDS for w in mfw] for c in counted])
            mean, std = freq.mean(axis=0), freq.std(axis=0, ddof=1)
            std[std == 0] = 1

            def z(side, mfw=mfw, mean=mean, std=std):
                bag = [side[i] for i in rng.integers(0, len(side), size=style.BAG_WORDS)]
                counts = Counter(bag)
                return (np.array([counts[w] / len(bag) for w in mfw]) - mean) / std

            pairs = ((2, 1), (3, 1), (1, 0))
            out[n_mfw] = [[1 - np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b)
                           for a, b in ((z(lists[i]), z(lists[j])) for _ in range(200))] for i, j in pairs]
        feats = [style.features(t) for t in texts[1:]]
        distinct = [style.distinct_n([t], n, words) for t in texts[1:] for n in (2, 3)]
        return out, feats, distinct

    _, wall, cpu = _timed(theirs if baseline else ours)
    return {"seconds": round(wall, 4), "cpu_seconds": round(cpu, 4), "words_per_side": words}


# --- the section ------------------------------------------------------------------------------


def _run_child(args: list[str], env: dict) -> dict:
    child_env = {**os.environ, **env, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=child_env, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT)]
    if proc.returncode or not lines:
        return {"error": f"child {' '.join(args[:2])} failed: {proc.stderr.strip()[-600:]}"}
    return json.loads(lines[-1][len(RESULT):])


def _stats(values: list[float]) -> dict:
    values = [v for v in values if v is not None]
    if not values:
        return {}
    return {"median": round(statistics.median(values), 4), "min": round(min(values), 4), "max": round(max(values), 4), "n": len(values)}


def run(ctx: dict) -> dict:
    """Both corpus sizes (the larger one is 100M tokens in full mode, 5M with --quick) and the style scores."""
    quick = bool(ctx.get("quick"))
    repeats = 1 if quick else max(3, int(ctx.get("repeats") or 3))
    say = ctx.get("say") or print
    threads = int((ctx.get("env") or {}).get("OMP_NUM_THREADS") or os.cpu_count() or 1)
    # the tokenizer may use every thread the bench gives, on both sides
    env = {**(ctx.get("env") or {}), "TOKENIZERS_PARALLELISM": "true", "RAYON_NUM_THREADS": str(threads)}
    work = Path(ctx.get("work") or tempfile.mkdtemp(prefix="copies-bench-"))
    checks = 5 if quick else 20
    began = time.perf_counter()
    out: dict = {"quick": quick, "repeats": repeats, "threads": threads, "checks": checks, "sizes": {},
                 "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f} at the start"}
    for tokens, with_baseline, rounds in ((1_000_000, True, repeats), (5_000_000 if quick else 100_000_000, False, 1)):
        say(f"  copies: a {tokens:,}-token corpus ...")
        directory, _, gen_s = _timed(lambda n=tokens: make_corpus(work / f"copies-{n}", n))
        entry: dict = {"corpus_seconds": round(gen_s, 1), "ours": [], "baseline": []}
        for r in range(rounds):
            spec = [str(directory), "--checks", str(checks), "--check-tokens", "1000"]
            entry["ours"].append(_run_child(["--child", "ours", *spec], env))
            say(f"    ours {r + 1}/{rounds}: {_brief(entry['ours'][-1])}")
            if with_baseline:
                entry["baseline"].append(_run_child(["--child", "baseline", *spec], env))
                say(f"    baseline {r + 1}/{rounds}: {_brief(entry['baseline'][-1])}")
        entry["summary"] = _summarise(entry, tokens)
        out["sizes"][str(tokens)] = entry
        shutil.rmtree(directory, ignore_errors=True)  # up to ~1 GB at 100M tokens
    say(f"  style: {STYLE_WORDS:,} words per side ...")
    style: dict = {"ours": [], "baseline": []}
    for _ in range(repeats):
        style["ours"].append(_run_child(["--child", "style", "--words", str(STYLE_WORDS)], env))
        style["baseline"].append(_run_child(["--child", "style-baseline", "--words", str(STYLE_WORDS)], env))
    ok = [r for r in style["ours"] if "error" not in r]
    base_ok = [r for r in style["baseline"] if "error" not in r]
    style["summary"] = {
        "seconds": _stats([r["seconds"] for r in ok]), "cpu_seconds": _stats([r["cpu_seconds"] for r in ok]),
        "baseline_seconds": _stats([r["seconds"] for r in base_ok]),
        "target_s": STYLE_TARGET_S,
        "met": bool(ok) and max(r["seconds"] for r in ok) <= STYLE_TARGET_S,
    }
    out["style"] = style
    out["seconds"] = round(time.perf_counter() - began, 1)
    out["load_at_end"] = round(os.getloadavg()[0], 1)
    return out


def _brief(result: dict) -> str:
    if "error" in result:
        return result["error"]
    checks = result.get("check_ms") or [0]
    return (f"build {result['build_s']:.2f} s (CPU {result['build_cpu_s']:.2f} s), check {statistics.median(checks):.1f} ms, "
            f"peak RSS {result['peak_rss_mb']:.0f} MB")


def _summarise(entry: dict, tokens: int) -> dict:
    ours = [r for r in entry["ours"] if "error" not in r]
    theirs = [r for r in entry["baseline"] if "error" not in r]
    build_t, check_t, rss_t = TARGETS.get(tokens, (None, None, None))
    s: dict = {"targets": {"build_s": build_t, "check_ms": check_t, "peak_rss_mb": rss_t}}
    if not ours:
        return s
    s["tokens"] = ours[0]["tokens"]
    s["build_s"] = _stats([r["build_s"] for r in ours])
    s["build_cpu_s"] = _stats([r["build_cpu_s"] for r in ours])
    s["check_ms"] = _stats([t for r in ours for t in r["check_ms"]])
    s["check_cpu_ms"] = _stats([t for r in ours for t in r["check_cpu_ms"]])
    s["peak_rss_mb"] = _stats([r["peak_rss_mb"] for r in ours])
    s["build_parts_s"] = ours[-1].get("build_parts_s")
    s["index_mb"] = ours[-1]["index_mb"]
    if theirs:
        s["baseline_build_s"] = _stats([r["build_s"] for r in theirs])
        s["baseline_check_ms"] = _stats([t for r in theirs for t in r["check_ms"]])
        s["baseline_peak_rss_mb"] = _stats([r["peak_rss_mb"] for r in theirs])
        s["baseline_ngram_set_s"] = _stats([r["ngram_set_s"] for r in theirs])
        # worse end: our slowest build against their fastest
        s["build_speedup_worse_end"] = round(s["baseline_build_s"]["min"] / s["build_s"]["max"], 2)
        s["build_speedup_median"] = round(s["baseline_build_s"]["median"] / s["build_s"]["median"], 2)
    met = {}
    if build_t is not None:
        met["build"] = s["build_s"]["max"] <= build_t
    if check_t is not None:
        met["check"] = s["check_ms"]["max"] <= check_t
    if rss_t is not None:
        met["peak_rss"] = s["peak_rss_mb"]["max"] <= rss_t
    s["met"] = met
    return s


def _range(stats: dict, digits: int = 2, unit: str = "") -> str:
    if not stats:
        return "–"
    if stats.get("n", 1) == 1:
        return f"{stats['median']:.{digits}f}{unit}"
    return f"{stats['median']:.{digits}f}{unit} ({stats['min']:.{digits}f}–{stats['max']:.{digits}f})"


def _mark(value: bool | None) -> str:
    return "" if value is None else (" **met**" if value else " **unmet**")


def render(result: dict) -> str:
    """The section of bench/results/LATEST.md."""
    if "error" in result:
        return f"## Copy finder and style scores\n\nfailed: {result['error']}\n"
    lines = ["## Copy finder and style scores", "",
             f"Generated corpora of shuffled sentences (sherlock, tinyshakespeare); each build and check in a fresh "
             f"process with {result['threads']} threads; {result['repeats']} interleaved repeat(s) at 1M tokens, one "
             f"build at the larger size; checks of a 1,000-token text (half copied), {result['checks']} per process; median and "
             f"(min–max). Targets are judged at the worse end. {result['machine']}; load {result.get('load_at_end')} "
             f"at the end; section took {result['seconds']:.0f} s.", "",
             "| corpus | build s (wall) | build s (CPU) | check ms | peak RSS MB | index MB | targets |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for tokens, entry in result["sizes"].items():
        s = entry["summary"]
        if "build_s" not in s:
            errors = [r.get("error") for r in entry["ours"] if "error" in r]
            lines.append(f"| {int(tokens):,} | failed: {errors[:1]} | | | | | |")
            continue
        t, met = s["targets"], s.get("met", {})
        goals = []
        if t["build_s"] is not None:
            goals.append(f"build ≤ {t['build_s']:g} s{_mark(met.get('build'))}")
        if t["check_ms"] is not None:
            goals.append(f"check ≤ {t['check_ms']:g} ms{_mark(met.get('check'))}")
        if t["peak_rss_mb"] is not None:
            goals.append(f"RSS ≤ {t['peak_rss_mb'] / 1024:g} GB{_mark(met.get('peak_rss'))}")
        lines.append(f"| {s['tokens']:,} tokens | {_range(s['build_s'])} | {_range(s['build_cpu_s'])} | "
                     f"{_range(s['check_ms'], 1)} | {_range(s['peak_rss_mb'], 0)} | {s['index_mb']:.0f} | "
                     f"{'; '.join(goals) or 'none at this size (--quick)'} |")
        parts = s.get("build_parts_s") or {}
        if parts:
            lines.append(f"| ↳ build parts (last run) | tokenize {parts.get('tokenize', 0):.2f}, suffix array "
                         f"{parts.get('suffix_array', 0):.2f}, write {parts.get('write', 0):.2f} | tokenize "
                         f"{parts.get('tokenize_cpu', 0):.2f}, suffix array {parts.get('suffix_array_cpu', 0):.2f} | | | | |")
        if "baseline_build_s" in s:
            lines.append(f"| baseline: `encode_batch` + `divsufsort` on the ids | {_range(s['baseline_build_s'])} | | "
                         f"12-gram set: {_range(s['baseline_check_ms'], 2)} (set built in "
                         f"{_range(s['baseline_ngram_set_s'])} s) | {_range(s['baseline_peak_rss_mb'], 0)} | | "
                         f"build {s['build_speedup_median']}x faster (worse end {s['build_speedup_worse_end']}x) |")
    st = result["style"]["summary"]
    lines += ["", f"Style scores for {STYLE_WORDS:,} words per side (training, held-out, base and fine-tuned texts: words, "
              f"Cosine Delta at 100/300/500 MFW with 200 bootstrap bags each, sentence length, MATTR, punctuation, "
              f"distinct-2/3): {_range(st['seconds'], 3)} s wall, {_range(st['cpu_seconds'], 3)} s CPU; target "
              f"≤ {st['target_s']:g} s{_mark(st['met'])}. The same Delta with a `Counter` per bag: "
              f"{_range(st['baseline_seconds'], 3)} s.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=1_000_000)
    parser.add_argument("--checks", type=int, default=20)
    parser.add_argument("--check-tokens", type=int, default=1000)
    parser.add_argument("--words", type=int, default=STYLE_WORDS)
    parser.add_argument("--child", choices=("ours", "baseline", "style", "style-baseline"), help=argparse.SUPPRESS)
    parser.add_argument("directory", nargs="?", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child in ("ours", "baseline"):
        child = _child_ours if args.child == "ours" else _child_baseline
        print(RESULT + json.dumps(child(args.directory, args.checks, args.check_tokens)), flush=True)
        return
    if args.child:
        print(RESULT + json.dumps(_child_style(args.words, args.child == "style-baseline")), flush=True)
        return
    with tempfile.TemporaryDirectory() as tmp:
        directory = make_corpus(Path(tmp) / "corpus.prepared", args.tokens)
        print(json.dumps(_run_child(["--child", "ours", str(directory), "--checks", str(args.checks),
                                     "--check-tokens", str(args.check_tokens)], {}), indent=2))


if __name__ == "__main__":
    main()
