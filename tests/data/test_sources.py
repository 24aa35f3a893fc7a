"""Reading inputs in parts: a big .jsonl by byte ranges, a big .parquet by row groups; together the parts read
exactly what one reader of the whole file reads, issues (with their file:line) included."""

import gzip
import json
import random

import pytest

from ftlm.data.sources import InputIssues, SourceError, file_parts, read_documents, resolve_files


def write_jsonl(path, rng: random.Random, n: int = 200) -> list[str]:
    lines, texts = [], []
    for i in range(n):
        if i % 37 == 5:
            lines.append("{broken json")
        elif i % 53 == 7:
            lines.append("")  # a blank line
        elif i % 41 == 3:
            lines.append(json.dumps({"body": "no text"}))
        else:
            text = " ".join(
                rng.choice(["가나", "다라마", "word", "x" * rng.randint(1, 40)]) for _ in range(rng.randint(1, 30))
            )
            texts.append(text)
            lines.append(json.dumps({"text": text}, ensure_ascii=False))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return texts


def read_all(path, parts, max_line_bytes=1 << 20):
    issues = InputIssues()
    texts = [d.text for part in parts for d in read_documents([str(path)], "text", issues, max_line_bytes, part)]
    return texts, issues.to_dict()


@pytest.mark.parametrize("task_bytes", [1, 97, 512, 1000, 4096, 10**9])
def test_jsonl_parts_read_what_the_whole_file_reads(tmp_path, task_bytes):
    path = tmp_path / "big.jsonl"
    expected = write_jsonl(path, random.Random(task_bytes))
    whole, whole_issues = read_all(path, [None])
    assert whole == expected
    parts = file_parts(str(path), task_bytes)
    assert (parts == [None]) == (task_bytes >= path.stat().st_size)
    texts, issues = read_all(path, parts)
    assert texts == expected
    assert issues["counts"] == whole_issues["counts"]
    assert sorted(issues["examples"]["malformed_json"]) == sorted(whole_issues["examples"]["malformed_json"])


def test_parts_that_begin_exactly_at_a_line_and_an_enormous_line(tmp_path):
    path = tmp_path / "lines.jsonl"
    lines = [json.dumps({"text": f"document {i}"}) for i in range(10)]
    lines[4] = json.dumps({"text": "y" * 5000})  # longer than max_line_bytes below: skipped and reported
    path.write_text("\n".join(lines) + "\n")
    starts = [0]
    for line in lines:
        starts.append(starts[-1] + len(line) + 1)
    for cut in starts[1:-1]:  # two parts split exactly at each line start
        texts, issues = read_all(path, [[0, cut], [cut, starts[-1]]], max_line_bytes=1000)
        assert texts == [f"document {i}" for i in range(10) if i != 4]
        assert issues["counts"] == {"enormous_line": 1}
        assert issues["examples"]["enormous_line"][0].startswith(f"{path}:5 ")


def test_no_final_newline_is_reported_by_the_last_part_only(tmp_path):
    path = tmp_path / "open.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"doc {i}"}) for i in range(50)))
    texts, issues = read_all(path, file_parts(str(path), 100))
    assert texts == [f"doc {i}" for i in range(50)]
    assert issues["counts"] == {"no_final_newline": 1}


def test_compressed_and_txt_files_are_read_whole(tmp_path):
    gz = tmp_path / "a.jsonl.gz"
    with gzip.open(gz, "wt") as f:
        f.write("\n".join(json.dumps({"text": "x " * 100}) for _ in range(100)) + "\n")
    txt = tmp_path / "b.txt"
    txt.write_text("one document\n\nanother\n" * 200)
    assert file_parts(str(gz), 10) == [None] and file_parts(str(txt), 10) == [None]


def test_parquet_parts_are_row_groups(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    texts = [f"문서 {i} " + "내용 " * (i % 17) for i in range(300)]
    values = [None if i % 29 == 0 else t for i, t in enumerate(texts)]
    path = tmp_path / "big.parquet"
    pq.write_table(pa.table({"text": values}), path, row_group_size=40)
    whole, whole_issues = read_all(path, [None])
    parts = file_parts(str(path), 2000)
    assert len(parts) > 1 and parts[0][0] == 0 and parts[-1][1] == pq.ParquetFile(path).metadata.num_row_groups
    assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
    texts_read, issues = read_all(path, parts)
    assert texts_read == whole == [t for t in values if t is not None]
    assert issues == whole_issues  # null rows counted once each, at their row numbers


# -- bad input is counted with its file and line, and never stops a preparation --------------------------------------
def read_one(path, max_line_bytes=1 << 20):
    issues = InputIssues()
    texts = [d.text for d in read_documents([str(path)], "text", issues, max_line_bytes)]
    return texts, issues.to_dict()


def jsonl(texts) -> str:
    return "".join(json.dumps({"text": t}) + "\n" for t in texts)


def test_a_corrupt_parquet_page_loses_only_its_row_group(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    texts = [f"document {i} " + "words " * (i % 7 + 20) for i in range(30)]
    path = tmp_path / "corrupt.parquet"
    pq.write_table(pa.table({"text": texts}), path, row_group_size=10, compression="snappy")
    chunk = pq.ParquetFile(path).metadata.row_group(1).column(0)  # the footer stays intact
    start = chunk.dictionary_page_offset or chunk.data_page_offset
    data = bytearray(path.read_bytes())
    for i in range(start + chunk.total_compressed_size // 2, start + chunk.total_compressed_size):
        data[i] ^= 0xA5
    path.write_bytes(bytes(data))
    read, issues = read_one(path)
    assert read == texts[:10] + texts[20:]
    assert issues["counts"] == {"corrupt_file": 1}
    assert issues["examples"]["corrupt_file"][0].startswith(f"{path}:11 (")


def test_a_json_line_nested_too_deep_is_malformed(tmp_path):
    path = tmp_path / "deep.jsonl"
    deep = '{"meta": ' + "[" * 100_000 + "]" * 100_000 + ', "text": "x"}\n'
    path.write_text(jsonl(["a"]) + deep + jsonl(["b"]))
    texts, issues = read_one(path)
    assert texts == ["a", "b"]
    assert issues["counts"] == {"malformed_json": 1}
    assert issues["examples"]["malformed_json"][0].startswith(f"{path}:2 ")


def test_zstd_corruption_keeps_every_line_before_it(tmp_path):
    zstandard = pytest.importorskip("zstandard")
    compress = zstandard.ZstdCompressor().compress
    trail = tmp_path / "trail.jsonl.zst"  # a whole frame, then garbage: as gzip, all 10 lines are kept
    trail.write_bytes(compress(jsonl(f"t{i}" for i in range(10)).encode()) + b"garbage!!")
    texts, issues = read_one(trail)
    assert texts == [f"t{i}" for i in range(10)]
    assert issues["counts"] == {"corrupt_file": 1}
    assert issues["examples"]["corrupt_file"][0].startswith(f"{trail}:11 (")
    frames = tmp_path / "frames.jsonl.zst"  # a good frame, then a corrupt one, in the same 64 KiB read
    good = [f"document {i} " + "x" * 100 for i in range(300)]
    bad = bytearray(compress(jsonl(good).encode()))
    for i in range(20, 200):
        bad[i] ^= 0x55
    frames.write_bytes(compress(jsonl(good).encode()) + bytes(bad))
    texts, issues = read_one(frames)
    assert texts == good
    assert issues["examples"]["corrupt_file"][0].startswith(f"{frames}:301 (")


def test_a_byte_order_mark_inside_a_concatenated_file_is_repaired(tmp_path):
    path = tmp_path / "cat.jsonl"
    bom = b"\xef\xbb\xbf"
    path.write_bytes(bom + jsonl(["a", "b"]).encode() + bom + jsonl(["c"]).encode())
    texts, issues = read_one(path)
    assert texts == ["a", "b", "c"]
    assert issues["examples"] == {"byte_order_mark": [f"{path}:1", f"{path}:3"]}


@pytest.mark.parametrize("entry", ["", [""], ["  "], [None]])
def test_an_empty_source_path_is_an_error_not_the_working_directory(tmp_path, monkeypatch, entry):
    (tmp_path / "stray.jsonl").write_text(jsonl(["stray"]))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SourceError, match=r"data\.sources\.ko: a path is empty"):
        resolve_files("ko", entry)


def test_a_json_array_file_is_read_element_by_element(tmp_path):
    docs = [{"text": f"문서 {i}"} for i in range(20)]
    for name, dump in [("indented.json", json.dumps(docs, indent=2)), ("line.json", json.dumps(docs))]:
        path = tmp_path / name
        path.write_text(dump)
        assert read_one(path) == ([d["text"] for d in docs], {"counts": {}, "examples": {}})
        assert file_parts(str(path), 10) == [None]  # no line starts to divide it at
    packed = tmp_path / "packed.json.gz"
    packed.write_bytes(gzip.compress(b"\xef\xbb\xbf" + json.dumps(docs).encode()))
    texts, issues = read_one(packed)
    assert texts == [d["text"] for d in docs] and issues["counts"] == {"byte_order_mark": 1}
    lines = tmp_path / "lines.json"  # not an array: JSON lines, as before
    lines.write_text(jsonl(["a", "b"]))
    assert read_one(lines)[0] == ["a", "b"]
    bad = tmp_path / "bad.json"  # bad elements are counted with their number (from 1) as the line
    bad.write_text('[{"text": "a"}, 5, {"x": 1}, {"text": 3}, {"text": ""}, {"text": "c"}]')
    texts, issues = read_one(bad)
    assert texts == ["a", "c"]
    assert {k: [e.split(" ")[0] for e in v] for k, v in issues["examples"].items()} == {
        "missing_text_field": [f"{bad}:2", f"{bad}:3"],
        "non_string_text_field": [f"{bad}:4"],
        "empty_document": [f"{bad}:5"],
    }


def test_a_json_array_that_cannot_be_parsed_whole_is_named(tmp_path):
    """Broken, cut short, or bigger than data.max_line_bytes: one issue naming the file, the run goes on."""
    cases = {
        "broken.json": ('[{"text": "a"}, garbage]', "malformed_json"),
        "cut.json.gz": (None, "truncated_file"),
        "big.json": (json.dumps([{"text": "x" * 5000}]), "enormous_line"),
    }
    for name, (content, kind) in cases.items():
        path = tmp_path / name
        if content is None:
            packed = gzip.compress(json.dumps([{"text": "y" * 3000}]).encode())
            path.write_bytes(packed[: len(packed) // 2])
        else:
            path.write_text(content)
        texts, issues = read_one(path, max_line_bytes=4096)
        assert texts == [] and issues["counts"] == {kind: 1}, (name, issues)
    assert "jq -c '.[]'" in issues["examples"]["enormous_line"][0]


def test_an_existing_path_is_taken_literally_before_it_is_a_glob(tmp_path):
    (tmp_path / "part[1].jsonl").write_text(jsonl(["a"]))
    (tmp_path / "part1.jsonl").write_text(jsonl(["b"]))  # what the glob part[1].jsonl would match
    assert resolve_files("ko", [str(tmp_path / "part[1].jsonl")]) == [str(tmp_path / "part[1].jsonl")]
    assert resolve_files("ko", [str(tmp_path / "part[0-9].jsonl")]) == [str(tmp_path / "part1.jsonl")]


def test_a_directory_skips_hidden_files_and_reports_dangling_symlinks(tmp_path, caplog):
    (tmp_path / "a.jsonl").write_text(jsonl(["a"]))
    (tmp_path / ".hidden.jsonl").write_text(jsonl(["h"]))
    (tmp_path / ".hidden_dir").mkdir()
    (tmp_path / ".hidden_dir" / "h.jsonl").write_text(jsonl(["h"]))
    (tmp_path / "gone.jsonl").symlink_to(tmp_path / "missing.jsonl")
    with caplog.at_level("WARNING"):
        assert resolve_files("ko", [str(tmp_path)]) == [str(tmp_path / "a.jsonl")]
    assert f"{tmp_path / 'gone.jsonl'} is a symlink to" in caplog.text
    assert resolve_files("ko", [str(tmp_path / "**" / "*.jsonl")]) == [str(tmp_path / "a.jsonl")]  # as a glob


def test_a_glob_matching_folders_reads_them(tmp_path):
    for year in ("2023", "2024"):
        (tmp_path / f"ko_{year}" / "sub").mkdir(parents=True)
        (tmp_path / f"ko_{year}" / "sub" / "a.jsonl").write_text(jsonl([year]))
    expected = [str(tmp_path / f"ko_{year}" / "sub" / "a.jsonl") for year in ("2023", "2024")]
    assert resolve_files("ko", [str(tmp_path / "ko_*")]) == expected
    assert resolve_files("ko", [str(tmp_path / "**")]) == expected  # every folder matched, each file once
    with pytest.raises(SourceError, match="no file"):
        resolve_files("ko", [str(tmp_path / "ko_*" / "sub" / "*.txt")])


def test_lone_carriage_returns_end_txt_lines(tmp_path):
    path = tmp_path / "mac.txt"
    path.write_bytes(b"one\rtwo\r\rthree\r\n\r\nfour\r")
    texts, issues = read_one(path)
    assert texts == ["one\ntwo", "three", "four"]
    assert issues["examples"] == {"cr_line_ends": [f"{path}:1"], "crlf_line_ends": [f"{path}:4"]}


def test_a_lone_cr_split_across_blocks(tmp_path):
    import io

    from ftlm.data.sources import _LoneCarriageReturns

    class OneByte(io.RawIOBase):
        def __init__(self, data):
            self.data = data

        def read1(self, size):
            block, self.data = self.data[:1], self.data[1:]
            return block

    reader = _LoneCarriageReturns(OneByte(b"a\rb\r\nc\r\r\n\r"))
    assert io.BufferedReader(reader).read() == b"a\nb\r\nc\n\r\n\n" and reader.first == 1


@pytest.mark.parametrize("name", ["blank.jsonl", "blank.txt", "bom.jsonl"])
def test_a_file_of_blank_lines_is_an_empty_file(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"\xef\xbb\xbf\n" if name == "bom.jsonl" else b"\n  \n\t\n")
    texts, issues = read_one(path)
    assert texts == [] and issues["counts"]["empty_file"] == 1
    assert "no_final_newline" not in issues["counts"]
