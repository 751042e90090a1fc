"""Streaming document readers: .txt paragraphs, .jsonl (plain, gzip, zstandard), .parquet."""

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from edit_jax import corpus_files
from edit_jax.errors import UserError

RECORDS = [{"text": "first doc"}, {"text": "second\n\ndoc"}, {"text": "third ü"}]


def _documents(path, field="text"):
    return [text for text, _ in corpus_files.read_documents(path, field)]


def test_every_format_yields_its_documents_with_progress(tmp_path):
    lines = "".join(json.dumps(r) + "\n" for r in RECORDS)
    (tmp_path / "a.jsonl").write_text(lines + "\n")  # a blank line is skipped
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(lines.encode()))
    (tmp_path / "a.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines.encode()))
    pq.write_table(pa.table({"text": [r["text"] for r in RECORDS], "n": [1, 2, 3]}),
                   tmp_path / "a.parquet", row_group_size=2)
    expected = [r["text"] for r in RECORDS]
    for name in ("a.jsonl", "a.jsonl.gz", "a.jsonl.zst", "a.parquet"):
        path = tmp_path / name
        read = list(corpus_files.read_documents(path, "text"))
        assert [t for t, _ in read] == expected, name
        progress = [done for _, done in read]
        assert progress == sorted(progress) and progress[-1] == path.stat().st_size, name
    (tmp_path / "b.txt").write_text("one\r\ntwo\r\n \t\r\nthree\n\n\n\nfour")
    assert _documents(tmp_path / "b.txt") == ["one\ntwo", "three", "four"]


def test_expand_paths_and_errors(tmp_path):
    for name in ("x.jsonl.zst", "y.txt", "z.parquet"):
        (tmp_path / name).write_text("")
    found = corpus_files.expand_paths([str(tmp_path / "*"), str(tmp_path / "y.txt")])
    assert [p.name for p in found] == ["x.jsonl.zst", "y.txt", "z.parquet"]
    (tmp_path / "w.csv").write_text("a,b")
    with pytest.raises(UserError, match="unsupported data file .*w.csv"):
        corpus_files.expand_paths([str(tmp_path / "w.csv")])
    with pytest.raises(UserError, match="no files match data.paths pattern"):
        corpus_files.expand_paths([str(tmp_path / "*.json")])
    with pytest.raises(UserError, match="cannot read parquet file"):
        _documents(tmp_path / "z.parquet")
    pq.write_table(pa.table({"body": ["a"]}), tmp_path / "z.parquet")
    with pytest.raises(UserError, match="has no column 'text'; set data.text_field to one of: body"):
        _documents(tmp_path / "z.parquet")
    (tmp_path / "bad.jsonl.gz").write_bytes(b"not gzip")
    with pytest.raises(UserError, match="cannot read data file .*bad.jsonl.gz"):
        _documents(tmp_path / "bad.jsonl.gz")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": 3}\n')
    with pytest.raises(UserError, match=r"bad.jsonl:2: no string field 'text'"):
        _documents(tmp_path / "bad.jsonl")
