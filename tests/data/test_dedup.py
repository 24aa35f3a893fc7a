import random
import re

import numpy as np
import pytest

from ftlm.data import minhash
from ftlm.data.dedup import DedupConfig, clusters, components, deduplicate, drops, find_pairs, fingerprint, write_rows

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


def run(texts, tmp_path, **config):
    return deduplicate(texts, DedupConfig(**config), str(tmp_path))


def test_exact_duplicates_ignore_case_and_whitespace(tmp_path):
    a = document(1)
    texts = [a, a.upper(), "  " + a.replace(" ", "\n  "), document(2)]
    assert run(texts, tmp_path, near=False) == [None, "exact", "exact", None]


def test_near_duplicate_with_a_few_changed_words_is_caught(tmp_path):
    # 5-word shingles: each changed word touches up to 5 of them, so the share of changed words sets the similarity.
    a = document(3, n_words=400)
    texts = [a, with_changed_words(a, 3), with_changed_words(a, 5, seed=1), with_changed_words(a, 60, seed=2)]
    assert run(texts, tmp_path) == [None, "near", "near", None]


def test_different_documents_are_kept(tmp_path):
    texts = [document(seed) for seed in range(40)]
    assert run(texts, tmp_path) == [None] * 40


def test_korean_near_duplicate_is_caught(tmp_path):
    base = " ".join(f"제{i}조 국민은 법률이 정하는 바에 의하여 권리를 가진다 조항{i}" for i in range(30))
    edited = base.replace("조항3 ", "조항삼 ").replace("조항17 ", "조항십칠 ")
    assert run([base, edited], tmp_path) == [None, "near"]


def test_signatures_are_stable_and_estimate_jaccard():
    a = document(7, 300)
    s1 = minhash.signatures([a, a])
    assert (s1[0] == s1[1]).all() and (minhash.signatures([a]) == s1[:1]).all()
    # Across similarity levels the estimate is within ~3 standard errors of the exact Jaccard of the shingle sets.
    for changes in (2, 10, 30, 80):
        b = with_changed_words(a, changes, seed=changes)
        exact = jaccard(shingles(a), shingles(b))
        est = float(minhash.similarity(*minhash.signatures([a, b], num_perm=256)))
        assert abs(est - exact) < 3 * np.sqrt(exact * (1 - exact) / 256) + 0.02, (changes, est, exact)


def test_union_find_components():
    u, v = np.array([0, 2, 5, 6]), np.array([1, 3, 6, 4])
    assert components(u, v, 8).tolist() == [0, 0, 2, 2, 4, 4, 4, 7]
    chain = np.arange(999)
    assert (components(chain[::-1], chain[::-1] + 1, 1000) == 0).all()


def test_bad_settings_are_config_errors():
    with pytest.raises(ValueError, match="data.dedup.threshold"):
        DedupConfig.from_cfg({"threshold": 1.5})
    with pytest.raises(ValueError, match="data.dedup"):
        DedupConfig.from_cfg({"treshold": 0.5})


# -- recall and precision against exact Jaccard on a planted set ---------------------------------------------------
def shingles(text: str, n: int = 5) -> set:
    words = re.findall(r"\w+", text.lower())
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b)


def planted(seed: int = 0, bases: int = 120):
    """Originals, near copies (1-4 of 300 words changed: Jaccard ~0.88-0.97) and hard negatives sharing most of
    their text (12-30 changes: Jaccard ~0.45-0.72), shuffled."""
    rng = random.Random(seed)
    texts = []
    for b in range(bases):
        base = document(1000 + b, 300)
        texts.append(base)
        for _ in range(rng.randint(0, 3)):
            texts.append(with_changed_words(base, rng.randint(1, 4), seed=rng.randrange(1 << 30)))
        if rng.random() < 0.5:
            texts.append(with_changed_words(base, rng.randint(12, 30), seed=rng.randrange(1 << 30)))
    rng.shuffle(texts)
    return texts


def test_near_dup_recall_and_precision_against_exact_jaccard(tmp_path):
    texts = planted()
    sets = [shingles(t) for t in texts]
    threshold = 0.8
    # Truth: a document is a near-duplicate when an earlier one has exact Jaccard >= threshold with it (first kept).
    truth = set()
    for j in range(len(texts)):
        if any(jaccard(sets[i], sets[j]) >= threshold for i in range(j)):
            truth.add(j)
    assert 150 < len(truth) < len(texts) - 150  # the set has both kinds in numbers
    found = {i for i, r in enumerate(deduplicate(texts, DedupConfig(threshold=threshold), str(tmp_path), 4)) if r}
    recall = len(found & truth) / len(truth)
    precision = len(found & truth) / max(len(found), 1)
    assert recall >= 0.95 and precision >= 0.95, (recall, precision, len(truth), len(found))


def test_duplicate_across_two_tasks_and_partitions_is_caught(tmp_path):
    config = DedupConfig()
    a, b = document(5, 300), document(6, 300)
    first = [a, b]
    second = [document(8, 300), with_changed_words(a, 2), b.upper()]
    write_rows(str(tmp_path), 0, *fingerprint(first, config), config, partitions=3)
    write_rows(str(tmp_path), 1, *fingerprint(second, config), config, partitions=3)
    for p in range(3):
        find_pairs(str(tmp_path), [0, 1], p, config)
    assert clusters(str(tmp_path), 3) == {"exact": 1, "near": 1}
    assert drops(str(tmp_path), 0).size == 0
    assert sorted(map(tuple, drops(str(tmp_path), 1).tolist())) == [(1, 1), (2, 0)]


def test_band_params_follow_datasketchs_loop():
    """The vectorised (bands, rows) is the one datasketch's double loop picks (the first minimum in b, r order)."""

    def reference(threshold, num_perm, weight):
        lo, hi = np.linspace(0.0, threshold, 201), np.linspace(threshold, 1.0, 201)
        best, best_err = (1, num_perm), float("inf")
        for b in range(1, num_perm + 1):
            for r in range(1, num_perm // b + 1):
                fp = float(np.trapezoid(1 - (1 - lo**r) ** b, lo))
                fn = float(np.trapezoid(1 - (1 - (1 - hi**r) ** b), hi))
                err = (1 - weight) * fp + weight * fn
                if err < best_err:
                    best, best_err = (b, r), err
        return best

    for threshold in (0.5, 0.8, 0.9):
        for num_perm in (16, 128):
            for weight in (0.5, minhash.FALSE_NEGATIVE_WEIGHT):
                assert minhash.band_params(threshold, num_perm, weight) == reference(threshold, num_perm, weight)
