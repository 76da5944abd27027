"""Atomic output files: renamed into place, links followed, devices written in place,
permissions as ``open`` would give them."""
from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from diffit.outputs import AtomicOutput, write_atomically


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_new_file_appears_only_on_commit_with_umask_permissions(tmp_path: Path, monkeypatch) -> None:
    import diffit.outputs

    monkeypatch.setattr(diffit.outputs, "_UMASK", None)  # read it afresh
    path = tmp_path / "fits.tbl"
    old = os.umask(0o027)
    try:
        output = AtomicOutput(str(path))
        assert os.umask(0o027) == 0o027  # reading the umask left it as it was
    finally:
        os.umask(old)
    output.stream.write("row\n")
    assert not path.exists()
    output.commit()
    assert path.read_text() == "row\n"
    assert _mode(path) == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fits.tbl"]


def test_existing_file_keeps_its_permissions_and_discard_keeps_its_content(tmp_path: Path) -> None:
    path = tmp_path / "fits.tbl"
    path.write_text("old\n")
    os.chmod(path, 0o640)
    output = AtomicOutput(str(path))
    output.stream.write("new\n")
    output.discard()
    assert path.read_text() == "old\n" and _mode(path) == 0o640
    output = AtomicOutput(str(path))
    output.stream.write("new\n")
    output.commit()
    assert path.read_text() == "new\n" and _mode(path) == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fits.tbl"]


def test_symbolic_link_is_followed(tmp_path: Path) -> None:
    (tmp_path / "results").mkdir()
    target = tmp_path / "results" / "fits.tbl"
    target.write_text("old\n")
    link = tmp_path / "fits.tbl"
    link.symlink_to(target)
    output = AtomicOutput(str(link))
    output.stream.write("new\n")
    output.commit()
    assert link.is_symlink() and target.read_text() == "new\n"


def test_device_is_written_in_place_not_replaced(tmp_path: Path) -> None:
    before = os.stat(os.devnull)
    output = AtomicOutput(os.devnull)
    assert output.in_place
    output.stream.write("row\n")
    output.commit()
    after = os.stat(os.devnull)
    assert stat.S_ISCHR(after.st_mode) and (after.st_ino, after.st_rdev) == (before.st_ino, before.st_rdev)
    with pytest.raises(OSError, match="not a regular file"):
        write_atomically(os.devnull, lambda name: Path(name).write_bytes(b"x"), binary=True)
    assert stat.S_ISCHR(os.stat(os.devnull).st_mode)


def test_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(IsADirectoryError):
        AtomicOutput(str(tmp_path))


def test_write_atomically_by_name(tmp_path: Path) -> None:
    path = tmp_path / "d.fits"
    path.write_bytes(b"stale")

    def fail(name: str) -> None:
        Path(name).write_bytes(b"half")
        raise RuntimeError("writer failed")

    with pytest.raises(RuntimeError):
        write_atomically(str(path), fail, binary=True)
    assert path.read_bytes() == b"stale"
    write_atomically(str(path), lambda name: Path(name).write_bytes(b"fresh"), binary=True)
    assert path.read_bytes() == b"fresh"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.fits"]


def test_undecodable_names_are_written_back_as_their_bytes(tmp_path: Path) -> None:
    name = os.fsdecode(b"im\xff.fits")  # a surrogate-escaped name from a table
    output = AtomicOutput(str(tmp_path / "failures.csv"))
    output.stream.write(name + "\n")
    output.commit()
    assert (tmp_path / "failures.csv").read_bytes() == b"im\xff.fits\n"


def test_long_names_sharing_their_start_keep_their_own_temporaries(tmp_path: Path) -> None:
    from diffit.outputs import remove_stale_temporaries

    first = tmp_path / ("a" * 230 + ".tbl")
    second = tmp_path / ("a" * 230 + ".tbl.journal")
    output = AtomicOutput(str(first))
    assert remove_stale_temporaries(str(second)) == 0
    assert os.path.exists(output.temporary)
    assert remove_stale_temporaries(str(first), keep=output.temporary) == 0
    output.commit()
    assert first.exists()
