"""core.io: atomic writes leave nothing behind on failure and give what they write the modes a
plain open() / mkdir() would (tempfile's are 0600 / 0700)."""

from __future__ import annotations

import os
import stat

import pytest

from core.io import atomic_dir, atomic_write, atomic_write_text, temp_sibling


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.usefixtures("umask_022")
def test_written_files_and_folders_get_the_umasks_mode_or_the_replaced_files(tmp_path):
    atomic_write_text(tmp_path / "new.json", "{}")
    assert _mode(tmp_path / "new.json") == 0o644  # as open(..., "w") under umask 022
    (tmp_path / "kept.json").write_text("old")
    os.chmod(tmp_path / "kept.json", 0o640)
    atomic_write_text(tmp_path / "kept.json", "new")
    assert (tmp_path / "kept.json").read_text() == "new" and _mode(tmp_path / "kept.json") == 0o640
    with atomic_dir(tmp_path / "folder") as tmp:
        (tmp / "a.txt").write_text("a")
    assert _mode(tmp_path / "folder") == 0o755 and (tmp_path / "folder" / "a.txt").is_file()


def _half_write(path) -> None:
    with atomic_write(path, "w") as f:
        f.write("half")  # type: ignore[attr-defined]
        raise RuntimeError("stop")


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    (tmp_path / "f.txt").write_text("old")
    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "d"):
        raise RuntimeError("stop")
    with pytest.raises(RuntimeError):
        _half_write(tmp_path / "f.txt")
    assert (tmp_path / "f.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.txt"]


def test_temporary_siblings_are_unique_and_hidden(tmp_path):
    names = set()
    for _ in range(20):
        fd, name = temp_sibling(tmp_path / "x.bin")
        assert fd is not None
        os.close(fd)
        names.add(os.path.basename(name))
    assert len(names) == 20 and all(n.startswith(".x.bin.") and n.endswith(".tmp") for n in names)
