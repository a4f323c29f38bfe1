import os
import stat

import pytest

from nlistral.io import read_jsonl, write_jsonl


def test_atomic_write_leaves_nothing_on_failure_and_keeps_the_old_file(tmp_path):
    path = tmp_path / "out" / "rows.jsonl"
    write_jsonl(path, [{"a": 1}])

    def rows():
        yield {"a": 2}
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        write_jsonl(path, rows())
    assert read_jsonl(path) == [{"a": 1}]
    assert os.listdir(path.parent) == ["rows.jsonl"]


def test_outputs_get_the_usual_file_mode(tmp_path):
    mask = os.umask(0o022)
    try:
        write_jsonl(tmp_path / "rows.jsonl", [{"a": 1}])
    finally:
        os.umask(mask)
    assert stat.S_IMODE((tmp_path / "rows.jsonl").stat().st_mode) == 0o644


def test_no_records_is_one_empty_line_that_reads_as_no_records(tmp_path):
    """DVC warns "is empty" about a 0-byte output (a run with no failed row); a blank line is no record."""
    assert write_jsonl(tmp_path / "failed.jsonl", []) == 0
    assert (tmp_path / "failed.jsonl").read_bytes() == b"\n"
    assert read_jsonl(tmp_path / "failed.jsonl") == []
