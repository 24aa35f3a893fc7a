import random

import pytest

from ftlm.data.dedup import DedupConfig, Deduplicator, Fingerprinter

WORDS = (
    "river mountain data model token cloud garden window letter market silver engine harbor candle "
    "forest ladder pepper violin orbit meadow canyon bridge lantern pillow rocket saddle tunnel"
).split()


def document(seed: int, n_words: int = 220) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) + str(rng.randrange(50)) for _ in range(n_words))


def with_changed_words(text: str, n_changes: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    words = text.split()
    for i in rng.sample(range(len(words)), n_changes):
        words[i] = "changed" + str(i)
    return " ".join(words)


def run(texts, **config):
    config = DedupConfig(**config)
    fingerprint, dedup = Fingerprinter(config), Deduplicator(config)
    return [dedup.is_duplicate(*fingerprint(t)) for t in texts]


def test_exact_duplicates_ignore_case_and_whitespace():
    a = document(1)
    assert run([a, a.upper(), "  " + a.replace(" ", "\n  "), document(2)], near=False) == [None, "exact", "exact", None]


def test_near_duplicate_with_a_few_changed_words_is_caught():
    # 5-word shingles: each changed word touches up to 5 of them, so the share of changed words sets the similarity.
    a = document(3, n_words=400)
    results = run([a, with_changed_words(a, 3), with_changed_words(a, 5, seed=1), with_changed_words(a, 60, seed=2)])
    assert results == [None, "near", "near", None]


def test_different_documents_are_kept():
    texts = [document(seed) for seed in range(40)]
    assert run(texts) == [None] * 40


def test_korean_near_duplicate_is_caught():
    base = " ".join(f"제{i}조 국민은 법률이 정하는 바에 의하여 권리를 가진다 조항{i}" for i in range(30))
    edited = base.replace("조항3 ", "조항삼 ").replace("조항17 ", "조항십칠 ")
    assert run([base, edited]) == [None, "near"]


def test_fingerprints_are_stable_across_instances():
    a = document(7)
    config = DedupConfig()
    k1, s1 = Fingerprinter(config)(a)
    k2, s2 = Fingerprinter(config)(a)
    assert k1 == k2 and (s1 == s2).all()


def test_bad_settings_are_config_errors():
    with pytest.raises(ValueError, match="data.dedup.threshold"):
        DedupConfig.from_cfg({"threshold": 1.5})
    with pytest.raises(ValueError, match="data.dedup"):
        DedupConfig.from_cfg({"treshold": 0.5})
