"""Speed and memory of the copy finder: build the index of an N-token corpus, check a 1,000-token text.

Targets: 1M tokens: build <= 2 s, check <= 50 ms; 100M tokens: build <= 3 min with peak RSS
<= 4 GB, check <= 250 ms. The corpus is generated: sentences of the public-domain books in
../shared/corpora (or, without them, random words) shuffled into paragraphs until it has about
N tokens, written as a prepared directory. Each size is built and checked in a child process of
its own, so peak RSS is that of the index alone.

    .venv/bin/python bench/copies_bench.py                       # 1M tokens
    .venv/bin/python bench/copies_bench.py --tokens 100000000    # the 100M case (minutes, ~1 GB of disk)

``bench_copies(tokens)`` returns the figures as a dict, for bench/run.py.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import resource
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


def _child(directory: Path, repeats: int, check_tokens: int) -> dict:
    from tunesmith.copies import CopyIndex

    started, cpu = time.perf_counter(), time.process_time()
    index = CopyIndex.open(directory)
    build, build_cpu = time.perf_counter() - started, time.process_time() - cpu
    started = time.perf_counter()
    index = CopyIndex.open(directory)
    reopen = time.perf_counter() - started
    text = _query(directory, check_tokens, seed=1)
    started = time.perf_counter()
    report = index.check(text)
    first = time.perf_counter() - started
    times, cpu_times = [], []
    for _ in range(repeats):
        started, cpu = time.perf_counter(), time.process_time()
        index.check(text)
        times.append(time.perf_counter() - started)
        cpu_times.append(time.process_time() - cpu)
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
        "check_ms_median": round(statistics.median(times) * 1000, 1),
        "check_ms_max": round(max(times) * 1000, 1),
        "check_cpu_ms_median": round(statistics.median(cpu_times) * 1000, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "index_mb": round(sum(f.stat().st_size for f in (directory / "copies").iterdir()) / 2**20, 1),
    }


def bench_copies(
    tokens: int = 1_000_000, repeats: int = 20, check_tokens: int = 1000, keep: Path | None = None
) -> dict:
    """Generate a corpus of about ``tokens`` tokens, then build and check in a child process."""
    with tempfile.TemporaryDirectory(dir=keep) as tmp:
        directory = make_corpus(Path(tmp) / "corpus.prepared", tokens)
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
        proc = subprocess.run(
            [sys.executable, __file__, "--child", str(directory), "--repeats", str(repeats),
             "--check-tokens", str(check_tokens)],
            capture_output=True, text=True, env=env, check=False,
        )
        lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT)]
        if proc.returncode or not lines:
            raise RuntimeError(f"copies bench child failed:\n{proc.stdout}\n{proc.stderr}")
        result = json.loads(lines[-1][len(RESULT):])
    build_target, check_target, rss_target = TARGETS.get(tokens, (None, None, None))
    result["targets"] = {"build_s": build_target, "check_ms": check_target, "peak_rss_mb": rss_target}
    result["machine"] = f"{platform.machine()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f} at the start"
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--check-tokens", type=int, default=1000)
    parser.add_argument("--results", type=Path, default=None, help="write COPIES-<tokens>.json here")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(RESULT + json.dumps(_child(args.child, args.repeats, args.check_tokens)), flush=True)
        return
    result = bench_copies(args.tokens, args.repeats, args.check_tokens)
    print(json.dumps(result, indent=2))
    if args.results:
        args.results.mkdir(parents=True, exist_ok=True)
        (args.results / f"COPIES-{args.tokens}.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
