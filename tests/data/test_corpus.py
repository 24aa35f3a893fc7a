import json
import subprocess
import sys

from ftlm.data import corpus
from ftlm.data.clean import HANGUL, LATIN, LETTER, count


def test_embedded_corpus_comes_from_installed_files_without_konlpy_java():
    # In a fresh interpreter: building the corpus must not import konlpy's modules (they start a JVM).
    code = (
        "import sys, json; from ftlm.data import corpus; "
        "ko = list(corpus.korean_documents()); en = list(corpus.english_documents()); "
        "loaded = sorted(m for m in sys.modules if m.startswith(('konlpy', 'jpype'))); "
        "print(json.dumps({'ko': len(ko), 'en': len(en), 'konlpy': loaded}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    result = json.loads(out.stdout)
    assert result["konlpy"] == []
    assert result["ko"] >= 60 and result["en"] >= 250
    assert all(f.endswith((".txt", ".py")) for f in corpus.origin_files())


def test_documents_are_real_text_in_their_language():
    for docs, script, minimum in (
        (list(corpus.korean_documents()), HANGUL, 0.9),
        (list(corpus.english_documents()), LATIN, 0.9),
    ):
        letters = sum(count(LETTER, d["text"]) for d in docs)
        assert sum(count(script, d["text"]) for d in docs) > minimum * letters
        assert all(d["text"].strip() and d["source"] for d in docs)
        assert len({d["text"] for d in docs}) > 0.9 * len(docs)
    korean = "\n".join(d["text"] for d in corpus.korean_documents())
    assert "대한민국은 민주공화국이다" in korean
    assert "구조문대비표" not in korean  # the old/new comparison tables are left out
    assert "공무원이 자녀를 양육하기 위하여" in korean  # printed lines wrapped mid-sentence are rejoined


def test_materialize_writes_jsonl_streams(tmp_path):
    paths = corpus.materialize(str(tmp_path))
    assert set(paths) == {"ko", "en"}
    for path in paths.values():
        with open(path, encoding="utf-8") as f:
            records = [json.loads(line) for line in f]
        assert records and all(isinstance(r["text"], str) for r in records)


def test_embedded_prepare_report(embedded_prepared):
    cfg, prepared = embedded_prepared
    stats = prepared.stats
    assert prepared.streams == ["ko", "en"] and stats["tokenizer"]["vocab_size"] == 4096
    for stream in ("ko", "en"):
        s = stats["streams"][stream]
        assert s["docs_train"] > 40 and s["docs_val"] >= 2 and s["tokens_train"] > 10_000
    assert stats["timings"]["total_s"] < 30
