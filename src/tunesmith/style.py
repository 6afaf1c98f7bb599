"""Stylometry: how close is a text to an author's style, in numbers.

Cosine Delta (Smith & Aldridge 2011), the best-performing Delta variant in Jannidis et al.
(2015): take the corpus's most frequent words (MFW), turn a text into the relative
frequencies of those words, standardise each frequency by its mean and standard deviation
over ~2,000-word pieces of the reference corpus (z-scores), and measure the cosine distance
between two texts' z-vectors. 0 means the same profile, 1 unrelated, 2 opposite.

All comparisons use random bags of ``bag_size`` words drawn from each side (Eder's
bootstrap): every draw gives one distance; the figure is their mean, and its 95% interval
comes from resampling the draws. The mean and standard deviation for the z-scores are taken
over bags from all the texts compared (each weighted equally), as Delta takes them over the
corpus under study: a reference of one author alone would make its z-scores pure noise.
Because every distance is measured between bags of the same size, distances between
different pairs of texts are comparable.

Written in numpy rather than with ``faststylometry``: that library fits its z-scores on a
set of candidate authors and has no bootstrap over bags; the arithmetic here is a few lines.

Also: mean sentence length, MATTR (moving-average type-token ratio, Covington & McFall 2010),
punctuation per 1,000 words and distinct-n (Li et al. 2016).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

import numpy as np

from .errors import TunesmithError

BAG_WORDS = 2_000
MFW_SIZES = (100, 300, 500)
DEFAULT_MFW = 300
# Below this many words per side, Delta is unstable: in a 2,000-word bag the 300th most
# frequent word occurs about twice, so its z-score is mostly counting noise, and a text
# shorter than one bag cannot give independent bags at all (Eder 2015, "Does size matter?",
# finds attribution with Delta unreliable below ~2,500-5,000 words).
MIN_WORDS = 2_500
# Below this, even a flagged estimate says nothing: fewer words than the MFW list is long.
FLOOR_WORDS = 500
MATTR_WINDOW = 500

WORD_RE = re.compile(r"[^\W\d_]+(?:['’][^\W\d_]+)*")
SENTENCE_END_RE = re.compile(r"[.!?]+[\"'”’)\]]*(?=\s|$)")
PUNCTUATION = {
    "comma": ",",
    "period": ".",
    "semicolon": ";",
    "colon": ":",
    "exclamation": "!",
    "question": "?",
    "dash": "—",
    "quote": '"',
    "parenthesis": "(",
}


# Scripts written without spaces between words (Thai, Lao, Tibetan, Myanmar, Khmer, Japanese
# kana, Chinese characters): there a "word" of WORD_RE is a whole clause, and its frequency says
# nothing about style.
UNSPACED_RE = re.compile(
    "[\u0e00-\u0fff\u1000-\u109f\u1780-\u17ff\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]"
)
LETTER_RE = re.compile(r"[^\W\d_]")


def unspaced_share(text: str) -> float:
    """The share of the text's letters (of its first 200,000 characters) that belong to scripts
    written without spaces between words."""
    letters = LETTER_RE.findall(text[:200_000])
    return sum(1 for c in letters if UNSPACED_RE.match(c)) / len(letters) if letters else 0.0


def words(text: str) -> list[str]:
    """Lower-cased words: runs of letters, with inner apostrophes (``don't``) kept."""
    return [w.replace("’", "'") for w in WORD_RE.findall(text.lower())]


# ----------------------------------------------------------------------------------------
# Cosine Delta


def cosine_distance(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """1 - cos(u, v), row-wise for 2-D input."""
    u, v = np.asarray(u, dtype=float), np.asarray(v, dtype=float)
    dot = (u * v).sum(axis=-1)
    norm = np.linalg.norm(u, axis=-1) * np.linalg.norm(v, axis=-1)
    return 1.0 - dot / np.where(norm == 0, np.inf, norm)


def cosine_delta(freq_a: np.ndarray, freq_b: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """Cosine Delta between relative-frequency vectors: cosine distance of their z-scores."""
    return cosine_distance((freq_a - mean) / std, (freq_b - mean) / std)


@dataclass
class DeltaModel:
    """The MFW list and the z-score parameters, fitted on a reference corpus."""

    mfw: list[str]
    mean: np.ndarray
    std: np.ndarray
    bag_size: int

    @classmethod
    def fit(cls, sides: list[list[str]], n_mfw: int = DEFAULT_MFW, bag_size: int = BAG_WORDS,
            bags_per_side: int = 25, seed: int = 0) -> DeltaModel:
        """Fit on the texts under comparison, each weighted equally: ``bags_per_side`` random
        bags of ``bag_size`` words from each side make the reference corpus (then as
        ``from_pieces``, computed on word ids)."""
        rng = np.random.default_rng(seed)
        vocab, inverse = np.unique(np.concatenate([np.asarray(s, dtype=object) for s in sides]).astype(str), return_inverse=True)
        pieces, start = [], 0
        for side in sides:
            ids = inverse[start : start + len(side)]
            start += len(side)
            pieces.append(ids[rng.integers(0, len(ids), size=(bags_per_side, bag_size))])
        pieces = np.concatenate(pieces)
        counts = np.bincount(pieces.ravel(), minlength=len(vocab))
        top = np.argsort(-counts, kind="stable")[: min(n_mfw, int((counts > 0).sum()))]  # vocab is sorted: ties alphabetical
        index = np.full(len(vocab), len(top), dtype=np.int64)
        index[top] = np.arange(len(top))
        freqs = _relative_frequencies(index[pieces], len(top))
        mean, std = freqs.mean(axis=0), freqs.std(axis=0, ddof=1)
        keep = std > 0  # a word with the same frequency everywhere cannot be standardised
        return cls([str(vocab[i]) for i, k in zip(top, keep) if k], mean[keep], std[keep], bag_size)

    @classmethod
    def from_pieces(cls, pieces: list[list[str]], n_mfw: int = DEFAULT_MFW) -> DeltaModel:
        """The ``n_mfw`` most frequent words over all pieces (ties alphabetical), and the mean
        and standard deviation (n-1) of their relative frequencies across the pieces."""
        counts: Counter = Counter()
        for piece in pieces:
            counts.update(piece)
        mfw = [w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:n_mfw]]
        freqs = np.stack([_relative_frequencies(_ids(p, mfw)[None, :], len(mfw))[0] for p in pieces])
        mean, std = freqs.mean(axis=0), freqs.std(axis=0, ddof=1)
        keep = std > 0  # a word with the same frequency everywhere cannot be standardised
        size = int(np.mean([len(p) for p in pieces]))
        return cls([w for w, k in zip(mfw, keep) if k], mean[keep], std[keep], size)

    def ids(self, text_words: list[str]) -> np.ndarray:
        return _ids(text_words, self.mfw)

    def frequencies(self, text_words: list[str]) -> np.ndarray:
        """Relative frequency of each MFW in the whole text (per word of the text)."""
        return _relative_frequencies(self.ids(text_words)[None, :], len(self.mfw))[0]

    def bags(self, ids: np.ndarray, n: int, rng: np.random.Generator, bag_size: int | None = None) -> np.ndarray:
        """Relative frequencies in ``n`` bags of words drawn at random (with replacement)."""
        size = bag_size or self.bag_size
        return _relative_frequencies(ids[rng.integers(0, len(ids), size=(n, size))], len(self.mfw))

    def distances(self, a: list[str], b: list[str], n_boot: int = 200, seed: int = 0, bag_size: int | None = None) -> np.ndarray:
        """Cosine Delta between a random bag of ``a`` and one of ``b``, ``n_boot`` times."""
        rng = np.random.default_rng(seed)
        fa = self.bags(self.ids(a), n_boot, rng, bag_size)
        fb = self.bags(self.ids(b), n_boot, rng, bag_size)
        return cosine_delta(fa, fb, self.mean, self.std)


def _ids(text_words: list[str], mfw: list[str]) -> np.ndarray:
    """Each word's index in ``mfw``, or len(mfw) for any other word."""
    index = {w: i for i, w in enumerate(mfw)}
    other = len(mfw)
    return np.fromiter((index.get(w, other) for w in text_words), dtype=np.int64, count=len(text_words))


def _relative_frequencies(ids: np.ndarray, k: int) -> np.ndarray:
    """Rows of word ids -> rows of relative frequencies of ids 0..k-1 (other words count in the total)."""
    rows, width = ids.shape
    flat = (np.arange(rows)[:, None] * (k + 1) + ids).ravel()
    counts = np.bincount(flat, minlength=rows * (k + 1)).reshape(rows, k + 1)
    return counts[:, :k] / max(width, 1)


RESAMPLES = 2_000


def interval(draws: np.ndarray, seed: int = 0) -> dict:
    """Mean of the per-bag distances and its bootstrap 95% interval (percentiles of the mean
    over resamples of the draws)."""
    draws = np.asarray(draws, dtype=float)
    means = _resample(draws, np.random.default_rng(seed)).mean(axis=1)
    return {"mean": float(draws.mean()), "low": float(np.percentile(means, 2.5)), "high": float(np.percentile(means, 97.5))}


def _resample(draws: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return draws[rng.integers(0, len(draws), size=(RESAMPLES, len(draws)))]


def fidelity(d_base: np.ndarray, d_tuned: np.ndarray, d_human: np.ndarray, seed: int = 0) -> dict:
    """(Δ_base − Δ_tuned) / (Δ_base − Δ_human) from the mean distances, with a bootstrap 95%
    interval (each set of draws resampled independently). NaN when base and human tie."""
    rng = np.random.default_rng(seed)

    def ratio(b, t, h):
        gap = b - h
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(np.abs(gap) > 1e-9, (b - t) / gap, np.nan)

    point = float(ratio(np.mean(d_base), np.mean(d_tuned), np.mean(d_human)))
    boot = ratio(*(_resample(np.asarray(d, dtype=float), rng).mean(axis=1) for d in (d_base, d_tuned, d_human)))
    boot = boot[np.isfinite(boot)]
    low, high = (float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))) if len(boot) else (float("nan"),) * 2
    return {"mean": point, "low": low, "high": high}


def style_distance(
    train: list[str],
    heldout: list[str],
    base: list[str],
    tuned: list[str],
    *,
    mfw_sizes=MFW_SIZES,
    bag_size: int = BAG_WORDS,
    n_boot: int = 200,
    seed: int = 0,
) -> dict:
    """Cosine Delta to the held-out text for base and fine-tuned samples, held-out vs train,
    and the style fidelity index (Δ_base − Δ_tuned) / (Δ_base − Δ_heldout-vs-train), per MFW size.

    Each side needs MIN_WORDS words. With fewer (but at least FLOOR_WORDS), the bags shrink to
    the smallest side and the result says ``"reliable": false``; below FLOOR_WORDS this raises.
    """
    sides = {"training text": train, "held-out text": heldout, "base samples": base, "fine-tuned samples": tuned}
    smallest = min(len(v) for v in sides.values())
    short = [f"{name} ({len(v):,} words)" for name, v in sides.items() if len(v) < MIN_WORDS]
    if smallest < FLOOR_WORDS:
        raise TunesmithError(
            f"too little text for stylometry: {', '.join(short)}; Cosine Delta needs at least "
            f"{MIN_WORDS:,} words per side (bags of ~{bag_size:,} words) and says nothing below {FLOOR_WORDS}",
            hint="hold out more of the corpus (--valid-fraction) or generate more words",
        )
    bag = min(bag_size, smallest)
    # A bag mirrors its whole text's own chance deviations, so a pair with a larger text
    # scores closer: compare the held-out text with a stretch of the training text as long
    # as the samples, so that all three distances pair texts of like size.
    cap = max(len(base), len(tuned))
    if len(train) > cap:
        start = int(np.random.default_rng(seed).integers(0, len(train) - cap + 1))
        train = train[start : start + cap]
    result: dict = {
        "bag_words": bag,
        "bootstrap_draws": n_boot,
        "words": {name: len(v) for name, v in sides.items()},
        "reliable": not short,
        "warning": (
            f"unstable: {', '.join(short)} below the {MIN_WORDS:,} words per side that Cosine Delta needs; "
            f"bags shrunk to {bag:,} words"
        ) if short else None,
        "mfw": {},
    }
    for n_mfw in mfw_sizes:
        model = DeltaModel.fit([train, heldout, base, tuned], n_mfw=n_mfw, bag_size=bag, seed=seed)
        d_base = model.distances(base, heldout, n_boot, seed + 1)
        d_tuned = model.distances(tuned, heldout, n_boot, seed + 2)
        d_human = model.distances(heldout, train, n_boot, seed + 3)
        result["mfw"][str(n_mfw)] = {
            "words_used": len(model.mfw),
            "delta_base": interval(d_base),
            "delta_finetuned": interval(d_tuned),
            "delta_heldout_vs_train": interval(d_human),
            "fidelity_index": fidelity(d_base, d_tuned, d_human, seed),
        }
    return result


# ----------------------------------------------------------------------------------------
# Simple style features


def mattr(text_words: list[str], window: int = MATTR_WINDOW) -> float:
    """Moving-average type-token ratio: the mean TTR over every ``window``-word window.
    A text shorter than the window gives its plain TTR."""
    n = len(text_words)
    if n == 0:
        return float("nan")
    if n <= window:
        return len(set(text_words)) / n
    counts: Counter = Counter(text_words[:window])
    types = len(counts)
    total = types
    for i in range(window, n):
        new, old = text_words[i], text_words[i - window]
        counts[new] += 1
        if counts[new] == 1:
            types += 1
        counts[old] -= 1
        if counts[old] == 0:
            types -= 1
            del counts[old]
        total += types
    return total / ((n - window + 1) * window)


def sentence_lengths(text: str) -> list[int]:
    """Words per sentence; a sentence ends at . ! or ? (with closing quotes) before a space."""
    lengths = []
    for piece in SENTENCE_END_RE.split(text):
        count = len(WORD_RE.findall(piece))
        if count:
            lengths.append(count)
    return lengths


def punctuation_rates(text: str, n_words: int) -> dict[str, float]:
    """Marks per 1,000 words. Dashes count ``—``, ``–`` and ``--``; quotes count straight and curly."""
    if n_words == 0:
        return {name: float("nan") for name in PUNCTUATION}
    normal = text.replace("--", "—").replace("–", "—").replace("“", '"').replace("”", '"')
    return {name: 1000.0 * normal.count(mark) / n_words for name, mark in PUNCTUATION.items()}


def features(text: str, window: int = MATTR_WINDOW) -> dict:
    """Sentence length, MATTR and punctuation of one text (join samples with blank lines)."""
    ws = words(text)
    lengths = sentence_lengths(text)
    return {
        "words": len(ws),
        "sentence_length": float(np.mean(lengths)) if lengths else float("nan"),
        "mattr": mattr(ws, window),
        "mattr_window": min(window, len(ws)),  # a shorter text gives its plain TTR
        "punctuation_per_1000_words": punctuation_rates(text, len(ws)),
    }


def distinct_n(texts: list[str], n: int, max_words: int | None = None) -> float:
    """Distinct n-grams / all n-grams of words, pooled over ``texts`` (Li et al. 2016).
    n-grams do not cross texts. ``max_words`` cuts the pool so that sets of samples of
    different sizes compare fairly (the ratio falls as text grows)."""
    seen: set = set()
    total = 0
    budget = max_words if max_words is not None else float("inf")
    for text in texts:
        ws = words(text)[: int(min(budget, 1 << 62))]
        budget -= len(ws)
        grams = list(zip(*(ws[i:] for i in range(n))))
        seen.update(grams)
        total += len(grams)
        if budget <= 0:
            break
    return len(seen) / total if total else float("nan")
