"""End to end: messy input files -> prepare -> shards, with every problem counted and every good document kept."""

import gzip
import json
import os
import random
import time

import numpy as np
import pytest
from omegaconf import OmegaConf

from ftlm.data.checks import DataConfigError
from ftlm.data.clean import normalize
from ftlm.data.prepare import prepare
from ftlm.data.shards import split_dir
from ftlm.data.sources import SourceError
from ftlm.data.stream import read_split
from ftlm.data.tokenizer import Tokenizer

MAX_LINE = 4096


def korean_doc(rng: random.Random) -> str:
    syllables = [chr(0xAC00 + rng.randrange(11172)) for _ in range(400)]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(2, 4))) for _ in range(rng.randint(25, 40))]
    return " ".join(words) + "."


def english_doc(rng: random.Random) -> str:
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = ["".join(rng.choice(letters) for _ in range(rng.randint(3, 8))) for _ in range(rng.randint(25, 40))]
    return " ".join(words).capitalize() + "."


@pytest.fixture(scope="module")
def messy(tmp_path_factory, make_data_config):
    """Input files holding every kind of bad input next to good documents; returns (dir, expected good docs)."""
    root = tmp_path_factory.mktemp("messy")
    rng = random.Random(0)
    ko = [korean_doc(rng) for _ in range(16)]
    en = [english_doc(rng) for _ in range(10)]
    good = {"ko": [], "en": []}

    def line(text):
        return json.dumps({"text": text}, ensure_ascii=False)

    # ko/main.jsonl: BOM, CRLF, malformed JSON, missing/non-string/null/empty fields, decomposed jamo, no final newline
    lines = [
        line(ko[0]),
        "{not json",
        line(ko[1]),
        json.dumps({"body": ko[2]}),
        json.dumps({"text": 42}),
        json.dumps({"text": None}),
        json.dumps({"text": ""}),
        json.dumps({"text": "   "}),
        line(ko[3].replace(" ", " \u200b", 1)),
        line(__import__("unicodedata").normalize("NFD", ko[4])),
        json.dumps(["a", "list"]),
        line(ko[5]),
    ]
    (root / "ko").mkdir()
    (root / "ko" / "main.jsonl").write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).encode("utf-8"))
    good["ko"] += [ko[0], ko[3], ko[4], ko[5]]
    # invalid UTF-8 inside a document: repaired (the bad bytes dropped), kept
    bad_bytes = ko[6].encode("utf-8")
    bad_bytes = bad_bytes[:30] + b"\xff\xfe" + bad_bytes[30:]
    (root / "ko" / "bytes.jsonl").write_bytes(b'{"text": "' + bad_bytes + b'"}\n' + line(ko[7]).encode() + b"\n")
    good["ko"] += [ko[6], ko[7]]
    (root / "ko" / "empty.jsonl").write_bytes(b"")
    # one enormous line, skipped without stopping the file
    (root / "ko" / "huge.jsonl").write_text(line("가" * (3 * MAX_LINE)) + "\n" + line(ko[8]) + "\n", encoding="utf-8")
    good["ko"].append(ko[8])
    # compressed text files: .txt.gz (blank-line separated) and .jsonl.zst
    with gzip.open(root / "ko" / "docs.txt.gz", "wt", encoding="utf-8") as f:
        f.write(f"{ko[9]}\n\n\n{ko[10]}\n")
    import zstandard

    (root / "ko" / "docs.jsonl.zst").write_bytes(
        zstandard.ZstdCompressor().compress((line(ko[11]) + "\n" + line(ko[12]) + "\n").encode())
    )
    good["ko"] += [ko[9], ko[10], ko[11], ko[12]]
    # exact and near duplicates across files of the stream; files are read in sorted order, so the copies in
    # dups.jsonl are seen first and kept, and those in main.jsonl are dropped
    (root / "ko" / "dups.jsonl").write_text(
        line(ko[0]) + "\n" + line(ko[1] + " 추가") + "\n" + line(ko[13]) + "\n", encoding="utf-8"
    )
    good["ko"] += [ko[1] + " 추가", ko[13]]
    # an English document in the Korean stream fails the language check
    (root / "ko" / "wrong.jsonl").write_text(line(en[0]) + "\n" + line(ko[14]) + "\n", encoding="utf-8")
    good["ko"].append(ko[14])

    (root / "en").mkdir()
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": [en[1], None, en[2], ""]}), root / "en" / "a.parquet")
    (root / "en" / "b.txt").write_text(f"{en[3]}\n\n{en[4]}\n\n\n{en[5]}", encoding="utf-8")  # no final newline
    (root / "en" / "c.jsonl").write_text("\n".join(line(t) for t in en[6:10]) + "\n", encoding="utf-8")
    good["en"] += [en[1], en[2], en[3], en[4], en[5], en[6], en[7], en[8], en[9]]
    global data_config
    data_config = make_data_config
    return root, good


def messy_config(root, out, **overrides):
    return data_config(
        out,
        name="messy",
        sources={"ko": [str(root / "ko")], "en": [str(root / "en" / "*")]},
        mix={"ko": 0.6, "en": 0.4},
        max_line_bytes=MAX_LINE,
        val_fraction=0.2,
        val_min_docs=1,
        clean={"min_chars": 40, "min_words": 8},
        tokenizer={"vocab_size": 600, "sample_chars": 100000},
        **overrides,
    )


def decoded_split_texts(out, stream, tokenizer):
    return [
        tokenizer.decode(t.tolist())
        for split in ("train", "val")
        for t in read_split(split_dir(str(out), stream, split))
    ]


@pytest.fixture(scope="module")
def prepared(messy, tmp_path_factory):
    root, good = messy
    out = tmp_path_factory.mktemp("messy_out")
    cfg = messy_config(root, out)
    return cfg, prepare(OmegaConf.create(cfg)), good


def test_every_good_document_is_found_in_the_shards(prepared):
    cfg, result, good = prepared
    tokenizer = Tokenizer.load(result.tokenizer_path)
    for stream in ("ko", "en"):
        decoded = decoded_split_texts(result.out_dir, stream, tokenizer)
        assert sorted(decoded) == sorted(normalize(t) for t in good[stream]), stream
        assert result.stats["streams"][stream]["docs_val"] >= 1


def test_every_bad_input_is_counted_with_file_and_line(prepared):
    cfg, result, _ = prepared
    ko = result.stats["streams"]["ko"]["input_issues"]
    counts, examples = ko["counts"], ko["examples"]
    main = os.path.join("ko", "main.jsonl")
    assert counts["byte_order_mark"] == 1 and examples["byte_order_mark"][0].endswith(f"{main}:1")
    assert counts["crlf_line_ends"] == 1
    assert counts["malformed_json"] == 1 and f"{main}:2" in examples["malformed_json"][0]
    assert counts["missing_text_field"] == 3  # other field name, null, and a JSON list
    assert any(e.split(" ")[0].endswith(f"{main}:4") for e in examples["missing_text_field"])
    assert counts["non_string_text_field"] == 1 and f"{main}:5" in examples["non_string_text_field"][0]
    assert counts["empty_document"] == 2
    assert counts["no_final_newline"] == 1 and f"{main}:12" in examples["no_final_newline"][0]
    assert counts["invalid_utf8"] == 1 and "bytes.jsonl:1" in examples["invalid_utf8"][0]
    assert counts["empty_file"] == 1 and "empty.jsonl:0" in examples["empty_file"][0]
    assert counts["enormous_line"] == 1 and "huge.jsonl:1" in examples["enormous_line"][0]
    en = result.stats["streams"]["en"]["input_issues"]["counts"]
    assert en["missing_text_field"] == 1 and en["empty_document"] == 1 and en["no_final_newline"] == 1


def test_filters_and_duplicates_are_counted(prepared):
    _, result, good = prepared
    ko = result.stats["streams"]["ko"]
    assert ko["duplicates"] == {"exact": 1, "near": 1}
    assert ko["filtered"].get("wrong_language") == 1
    assert ko["docs_out"] == ko["docs_train"] + ko["docs_val"] == len(good["ko"]) == 14
    for stream in ("ko", "en"):
        s = result.stats["streams"][stream]
        assert s["tokens"] == s["tokens_train"] + s["tokens_val"] > 0
        assert s["tokens_per_char"] > 0 and s["tokens_per_word"] > 0
        assert s["chinchilla_params"] == s["tokens_train"] // 20


def test_stats_json_is_the_completion_marker_and_preparation_is_idempotent(prepared):
    cfg, result, _ = prepared
    stats_path = os.path.join(result.out_dir, "stats.json")
    with open(stats_path) as f:
        assert json.load(f)["fingerprint"] == result.stats["fingerprint"]
    before = os.stat(stats_path).st_mtime_ns
    started = time.time()
    again = prepare(OmegaConf.create(cfg))
    assert time.time() - started < 2.0 and os.stat(stats_path).st_mtime_ns == before
    assert again.stats == result.stats and again.streams == ["ko", "en"]
    assert not os.path.exists(os.path.join(result.out_dir, "clean"))  # intermediate text removed
    assert os.path.dirname(result.out_dir) == cfg["out_dir"] and os.listdir(os.path.join(cfg["out_dir"], "tmp")) == []


def test_parallel_workers_write_identical_shards(messy, prepared, tmp_path):
    root, _ = messy
    cfg, result, _ = prepared
    parallel = prepare(OmegaConf.create(messy_config(root, tmp_path, num_workers=2)))
    assert parallel.stats["fingerprint"] == result.stats["fingerprint"]
    with open(result.tokenizer_path) as a, open(parallel.tokenizer_path) as b:
        assert a.read() == b.read()
    for stream in ("ko", "en"):
        for split in ("train", "val"):
            one = read_split(split_dir(result.out_dir, stream, split))
            two = read_split(split_dir(parallel.out_dir, stream, split))
            assert len(one) == len(two) and all(np.array_equal(x, y) for x, y in zip(one, two))


def test_changed_settings_prepare_again(messy, tmp_path):
    root, _ = messy
    cfg = messy_config(root, tmp_path)
    first = prepare(OmegaConf.create(cfg))
    cfg["clean"]["min_words"] = 9
    second = prepare(OmegaConf.create(cfg))
    assert first.stats["fingerprint"] != second.stats["fingerprint"]
    assert os.path.isfile(os.path.join(first.out_dir, "stats.json"))  # side by side: the first one is kept
    reuse = dict(cfg, tokenizer=dict(cfg["tokenizer"], path=first.tokenizer_path))
    third = prepare(OmegaConf.create(reuse))
    assert third.stats["tokenizer"]["origin"].startswith("reused")
    assert third.stats["tokenizer"]["vocab_size"] == first.stats["tokenizer"]["vocab_size"]


@pytest.mark.parametrize(
    "change,message",
    [
        ({"mix": {"ko": 0.6, "en": 0.3}}, "data.mix shares must sum to 1"),
        ({"mix": {"ko": 0.5, "en": 0.3, "de": 0.2}}, r"data.mix names unknown stream\(s\) \['de'\]"),
        ({"mix": {"ko": 1.0}}, r"data.mix has no share for stream\(s\) \['en'\]"),
        (
            {"sources": {"ko": ["/no/such/file.jsonl"], "en": ["/no/such/dir/*.jsonl"]}, "mix": None},
            "data.sources.ko: no such file or directory: /no/such/file.jsonl",
        ),
        (
            {"sources": {"ko": ["/tmp/ftlm-nothing-matches-*.jsonl"]}, "mix": None, "lang": {"ko": "ko"}},
            r"data.sources.ko: no file matches /tmp/ftlm-nothing-matches-\*.jsonl",
        ),
        ({"val_fraction": 0.9}, "data.val_fraction"),
        ({"shard_compression": "lzma"}, "data.shard_compression"),
        ({"tokenizer": {"vocab_size": 10}}, "data.tokenizer.vocab_size"),
        ({"lang": {"ko": "kr"}}, "data.lang.ko"),
    ],
)
def test_bad_config_fails_before_any_work(messy, tmp_path, change, message):
    root, _ = messy
    out = tmp_path / "never_created"
    cfg = messy_config(root, out)
    for key, value in change.items():  # a sub-config is changed key by key
        cfg[key] = {**cfg[key], **value} if key == "tokenizer" else value
    with pytest.raises((DataConfigError, SourceError), match=message):
        prepare(OmegaConf.create(cfg))
    assert not out.exists()
