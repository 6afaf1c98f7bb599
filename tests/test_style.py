"""Stylometry against hand-worked numbers, and its behaviour on texts of known origin."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest

from tunesmith import TunesmithError
from tunesmith.style import (
    DeltaModel,
    cosine_delta,
    distinct_n,
    features,
    mattr,
    punctuation_rates,
    sentence_lengths,
    style_distance,
    unspaced_share,
    words,
)


def test_cosine_delta_by_hand():
    # z_a = ((.5-.4)/.1, (.25-.3)/.1, (.25-.2)/.1) = (1, -0.5, 0.5)
    # z_b = ((.25-.4)/.1, (.5-.3)/.1, (.25-.2)/.1) = (-1.5, 2, 0.5)
    # cos = (-1.5 - 1 + 0.25) / (sqrt(1.5) * sqrt(6.5)) = -2.25 / sqrt(9.75) = -0.720577
    got = cosine_delta(np.array([0.5, 0.25, 0.25]), np.array([0.25, 0.5, 0.25]),
                       np.array([0.4, 0.3, 0.2]), np.array([0.1, 0.1, 0.1]))
    assert got == pytest.approx(1 + 2.25 / math.sqrt(9.75), abs=1e-12)


def test_delta_model_fitted_by_hand():
    # Five 4-word pieces; counts a=9, b=7, x=4, so the 2 MFW are a, b.
    pieces = ["a a b x", "a b b x", "a a a b", "a b x x", "a a b b"]
    model = DeltaModel.from_pieces([p.split() for p in pieces], n_mfw=2)
    assert model.mfw == ["a", "b"]
    # a: .5 .25 .75 .25 .5 -> mean .45, squared deviations sum .175, sd = sqrt(.175/4)
    # b: .25 .5 .25 .25 .5 -> mean .35, squared deviations sum .075, sd = sqrt(.075/4)
    assert model.mean == pytest.approx([0.45, 0.35])
    assert model.std == pytest.approx([math.sqrt(0.04375), math.sqrt(0.01875)])
    # "a b b b": freqs (.25, .75); "a a a x": (.75, 0)
    # z1 = (-.2/sd_a, .4/sd_b), z2 = (.3/sd_a, -.35/sd_b)
    # dot = -.06/.04375 - .14/.01875 = -1.371429 - 7.466667 = -8.838095
    # |z1|^2 = .04/.04375 + .16/.01875 = 9.447619; |z2|^2 = .09/.04375 + .1225/.01875 = 8.590476
    # cos = -8.838095 / sqrt(9.447619 * 8.590476) = -0.981045
    freq = model.frequencies
    got = cosine_delta(freq("a b b b".split()), freq("a a a x".split()), model.mean, model.std)
    assert got == pytest.approx(1.981045, abs=1e-5)


def test_fit_on_sides_and_from_pieces_agree():
    rng = np.random.default_rng(3)
    sides = [[f"w{i}" for i in rng.integers(0, 40, size=900)] for _ in range(3)]
    fitted = DeltaModel.fit(sides, n_mfw=10, bag_size=50, bags_per_side=4, seed=7)
    # The same bags, drawn the way fit draws them, through the plain-Python path.
    rng = np.random.default_rng(7)
    vocab = sorted({w for s in sides for w in s})
    pieces = []
    for side in sides:
        picks = rng.integers(0, len(side), size=(4, 50))
        pieces.extend([side[i] for i in row] for row in picks)
    plain = DeltaModel.from_pieces(pieces, n_mfw=10)
    assert vocab and fitted.mfw == plain.mfw
    assert fitted.mean == pytest.approx(plain.mean) and fitted.std == pytest.approx(plain.std)


def test_mattr_by_hand():
    # windows of 3: [a b a] 2/3, [b a c] 3/3, [a c b] 3/3 -> mean 8/9
    assert mattr("a b a c b".split(), window=3) == pytest.approx(8 / 9)
    # windows of 2: [a a] 1/2, [a b] 1, [b b] 1/2 -> 2/3
    assert mattr("a a b b".split(), window=2) == pytest.approx(2 / 3)
    # shorter than the window: plain TTR
    assert mattr("a a b".split(), window=500) == pytest.approx(2 / 3)


def test_mattr_matches_brute_force():
    ws = [f"w{i}" for i in np.random.default_rng(0).integers(0, 30, size=400)]
    brute = np.mean([len(set(ws[i : i + 50])) / 50 for i in range(len(ws) - 50 + 1)])
    assert mattr(ws, window=50) == pytest.approx(brute)


def test_sentences_punctuation_distinct():
    assert sentence_lengths('He ran. She sat down! "Why?" he asked.') == [2, 3, 1, 2]
    assert words("Don’t SHOUT, Mr. Holmes 42") == ["don't", "shout", "mr", "holmes"]
    rates = punctuation_rates("a, b; c -- d", 4)
    assert rates["comma"] == 250 and rates["semicolon"] == 250 and rates["dash"] == 250 and rates["period"] == 0
    # bigrams of "a b a b": ab ba ab -> 2 distinct of 3; across texts n-grams do not join
    assert distinct_n(["a b a b"], 2) == pytest.approx(2 / 3)
    assert distinct_n(["a b", "a b"], 2) == pytest.approx(1 / 2)
    assert distinct_n(["a b c d", "e f"], 2, max_words=3) == pytest.approx(1.0)  # a b c only: 2 bigrams
    f = features("One two three. Four five!")
    assert f["words"] == 5 and f["sentence_length"] == 2.5


def _texts(seed=0):
    """An 'author' and a 'base' that uses the author's 60 commonest words in another order."""
    rng = np.random.default_rng(seed)
    vocab = np.array([f"w{i}" for i in range(2000)])
    p = 1 / np.arange(1, 2001)
    p /= p.sum()
    author = np.arange(2000)
    other = author.copy()
    other[:60] = rng.permutation(60)
    draw = lambda order, n: list(vocab[order[rng.choice(2000, n, p=p)]])  # noqa: E731
    return draw(author, 20000), draw(author, 6000), draw(other, 6000), draw(author, 6000), draw


def test_fidelity_index_one_for_the_author_zero_for_the_base():
    train, heldout, base, author_like, _ = _texts()
    like_author = style_distance(train, heldout, base, author_like, mfw_sizes=(100,), n_boot=300)
    assert like_author["reliable"] and like_author["warning"] is None
    row = like_author["mfw"]["100"]
    assert row["delta_base"]["mean"] > row["delta_heldout_vs_train"]["high"]
    assert 0.6 < row["fidelity_index"]["mean"] < 1.4
    like_base = style_distance(train, heldout, base, base[::-1], mfw_sizes=(100,), n_boot=300)
    fi = like_base["mfw"]["100"]["fidelity_index"]
    assert -0.2 < fi["mean"] < 0.2 and fi["low"] <= fi["mean"] <= fi["high"]


def test_too_little_text():
    train, heldout, base, tuned, _ = _texts(1)
    flagged = style_distance(train, heldout[:1500], base, tuned, mfw_sizes=(100,), n_boot=50)
    assert flagged["reliable"] is False and "held-out text (1,500 words)" in flagged["warning"]
    assert flagged["bag_words"] == 1500
    with pytest.raises(TunesmithError, match="2,500 words per side"):
        style_distance(train, heldout[:300], base, tuned, mfw_sizes=(100,))


def test_style_scores_for_10k_words_within_a_second():
    train, heldout, base, tuned, draw = _texts(2)
    tuned = draw(np.arange(2000), 10_000)
    text = " ".join(tuned)
    start = time.process_time()  # CPU time of all threads: a busy machine does not fail it
    style_distance(train, heldout, base, tuned)
    features(text)
    distinct_n([text], 2), distinct_n([text], 3)
    assert time.process_time() - start < 1.0


def test_fidelity_on_real_prose(corpora):
    """Holmes stories as the author, Shakespeare as the 'base model': unseen Holmes text scores
    about 1, more Shakespeare about 0, half and half in between."""
    holmes = words((corpora / "sherlock.txt").read_text(encoding="utf-8"))
    bard = words((corpora / "tinyshakespeare.txt").read_text(encoding="utf-8"))
    train, heldout, base = holmes[:60000], holmes[60000:63000], bard[:5000]
    def index(tuned):
        return style_distance(train, heldout, base, tuned, mfw_sizes=(300,))["mfw"]["300"]["fidelity_index"]["mean"]
    assert 0.75 < index(holmes[70000:75000]) < 1.25
    assert -0.15 < index(bard[20000:25000]) < 0.15
    assert 0.15 < index(holmes[80000:82500] + bard[10000:12500]) < 0.65


def test_scripts_without_word_spaces_are_recognised():
    assert unspaced_share("東京の古い書店で、彼女は一冊の地図を見つけた。") == 1.0
    assert unspaced_share("ภาษาไทยไม่เว้นวรรคระหว่างคำ") > 0.9
    assert unspaced_share("Москва — столица России, and Paris is in France.") == 0.0
    assert unspaced_share("He said 東京 twice.") == pytest.approx(2 / 13)  # 13 letters, 2 of them Chinese
    assert unspaced_share("1984, 2001 ...") == 0.0
