"""Reading inputs in parts: a big .jsonl by byte ranges, a big .parquet by row groups; together the parts read
exactly what one reader of the whole file reads, issues (with their file:line) included."""

import json
import random

import pytest

from ftlm.data.sources import InputIssues, file_parts, read_documents


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
    import gzip

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
