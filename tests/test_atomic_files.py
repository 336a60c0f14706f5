"""rlhf_lit.atomic_files: content, permissions under the umask, and no trace left on failure."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf_lit.atomic_files import write_bytes_atomic, write_jsonl_atomic, write_text_atomic


@pytest.fixture
def umask():
    """A setter of the process umask; the old umask is restored after the test."""
    old = os.umask(0o022)
    os.umask(old)
    yield os.umask
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_writes_bytes_text_and_jsonl(tmp_path):
    write_bytes_atomic(tmp_path / "a.bin", b"\x00\x01")
    write_text_atomic(tmp_path / "sub" / "b.md", "é\r\nline\n")  # parent folder created
    records = [{"text": "héllo", "n": 1}, {"nested": {"x": [1, 2]}}]
    write_jsonl_atomic(iter(records), tmp_path / "c.jsonl")
    assert (tmp_path / "a.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "sub" / "b.md").read_bytes() == "é\r\nline\n".encode("utf-8")  # no newline translation
    raw = (tmp_path / "c.jsonl").read_bytes()
    assert raw == "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a.bin", "b.md", "c.jsonl", "sub"]


def test_replaces_an_existing_file(tmp_path):
    target = tmp_path / "f.txt"
    target.write_text("old")
    write_text_atomic(target, "new")
    assert target.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]


@pytest.mark.parametrize("mask, expected", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_permissions_follow_the_umask(tmp_path, umask, mask, expected):
    umask(mask)
    write_bytes_atomic(tmp_path / "a", b"x")
    write_text_atomic(tmp_path / "b", "x")
    write_jsonl_atomic([{}], tmp_path / "c")
    with open(tmp_path / "plain", "w"):  # what an ordinary open() gives, for comparison
        pass
    assert {name: _mode(tmp_path / name) for name in "abc"} == dict.fromkeys("abc", expected)
    assert _mode(tmp_path / "plain") == expected


def test_a_failure_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "rows.jsonl"
    target.write_text("old\n")

    def records():
        yield {"ok": 1}
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        write_jsonl_atomic(records(), target)
    with pytest.raises(TypeError):
        write_jsonl_atomic([{"x": object()}], target)  # not JSON-serialisable
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["rows.jsonl"]


def test_a_failed_replace_removes_the_temp(tmp_path):
    target = tmp_path / "taken"
    target.mkdir()
    (target / "inside").write_text("x")  # os.replace cannot put a file over a non-empty folder
    with pytest.raises(OSError):
        write_bytes_atomic(target, b"data")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_imports_without_torch():
    """Scripts import the writer in a process that must not pay for loading torch."""
    code = "import sys, rlhf_lit.atomic_files; assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])
