"""The one atomic writer (common.io): a fault of the disk names the file being written and leaves
nothing behind."""

from __future__ import annotations

import errno
import os

import pytest

from common.io import atomic_write, write_text


def test_a_full_disk_names_the_file_and_leaves_the_old_one(tmp_path):
    target = tmp_path / "metrics.csv"
    target.write_text("old\n")

    def full(stream) -> None:
        stream.write(b"new")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))     # as a full disk raises: no file name

    with pytest.raises(OSError) as caught:
        atomic_write(target, full)
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(target)
    assert target.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir()) == ["metrics.csv"]


def test_a_name_too_long_names_the_file_not_its_temporary(tmp_path):
    target = tmp_path / ("n" * 300)
    with pytest.raises(OSError) as caught:
        write_text(target, "x")
    assert caught.value.errno == errno.ENAMETOOLONG and caught.value.filename == str(target)
    assert list(tmp_path.iterdir()) == []


def test_an_error_naming_another_path_keeps_it(tmp_path):
    (tmp_path / "file").write_text("mine\n")
    with pytest.raises(OSError) as caught:
        write_text(tmp_path / "file" / "below" / "x.txt", "x")
    assert str(tmp_path / "file") in str(caught.value.filename)     # the part that is a file, not a folder


def test_an_unnamed_error_of_another_kind_is_named_too(tmp_path):
    def failing(stream) -> None:
        raise PermissionError(errno.EACCES, "Permission denied")

    with pytest.raises(PermissionError) as caught:
        atomic_write(tmp_path / "a.json", failing)
    assert caught.value.filename == str(tmp_path / "a.json")
