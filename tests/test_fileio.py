"""The one JSONL reader and writer (bytelm.fileio)."""

from __future__ import annotations

import gzip

import pytest

from bytelm.errors import UserError
from bytelm.fileio import iter_jsonl, read_jsonl, write_jsonl


def test_round_trip_plain_and_gzipped(tmp_path):
    rows = [{"a": 1}, {"text": "naïve\u2028line separator inside a string"}, [1, 2], "s",
            {"completion": "a lone surrogate \udc80 (a model's invalid UTF-8)"}]
    write_jsonl(tmp_path / "x.jsonl", rows)
    assert read_jsonl(tmp_path / "x.jsonl") == rows
    with gzip.open(tmp_path / "x.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write((tmp_path / "x.jsonl").read_text(encoding="utf-8"))
    assert read_jsonl(tmp_path / "x.jsonl.gz") == rows


def test_blank_lines_are_skipped_and_lines_keep_their_numbers(tmp_path):
    (tmp_path / "x.jsonl").write_text('{"a": 1}\n\n  \n{"a": 2}\n')
    assert list(iter_jsonl(tmp_path / "x.jsonl")) == [(1, {"a": 1}), (4, {"a": 2})]


def test_a_bad_line_is_an_error_that_names_it(tmp_path):
    f = tmp_path / "x.jsonl"
    f.write_text('{"a": 1}\n{"a": \n{"a": 3}\n')
    for appending in (False, True):  # a bad line before the last is never a cut-off append
        with pytest.raises(UserError, match=r"x.jsonl line 2 is not valid JSON"):
            read_jsonl(f, appending=appending)


def test_a_cut_off_last_line_is_dropped_only_from_a_log(tmp_path):
    f = tmp_path / "metrics.jsonl"
    f.write_text('{"step": 1}\n{"step": 2, "lo\n\n')
    assert read_jsonl(f, appending=True) == [{"step": 1}]
    with pytest.raises(UserError, match="line 2 is not valid JSON"):
        read_jsonl(f)


def test_a_missing_file(tmp_path):
    with pytest.raises(UserError, match="nope.jsonl not found"):
        read_jsonl(tmp_path / "nope.jsonl")
    assert read_jsonl(tmp_path / "nope.jsonl", appending=True) == []  # a log not begun yet


def test_a_file_that_is_not_text_is_one_clear_error(tmp_path):
    (tmp_path / "x.jsonl.gz").write_bytes(b"not gzip at all")
    with pytest.raises(UserError, match="cannot read"):
        read_jsonl(tmp_path / "x.jsonl.gz")
    (tmp_path / "y.jsonl").write_bytes(b'{"a": "\xff"}\n')
    with pytest.raises(UserError, match="cannot read"):
        read_jsonl(tmp_path / "y.jsonl")
