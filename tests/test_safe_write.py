"""The write discipline (reempathy/safe_write.py): checked first, written beside, synced, renamed; nothing else replaced."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from reempathy.errors import InputError
from reempathy.safe_write import (
    check_output_dir,
    check_output_file,
    output_file,
    replacing_dir,
    restore_interrupted_swap,
    write_bytes,
)


def test_a_missing_path_or_a_regular_file_may_be_written(tmp_path):
    write_bytes(tmp_path / "new.bin", b"one", "--out")
    write_bytes(tmp_path / "new.bin", b"two", "--out")
    assert (tmp_path / "new.bin").read_bytes() == b"two"
    assert os.listdir(tmp_path) == ["new.bin"]  # no temporary left


def test_a_fifo_is_refused_and_stays_a_fifo(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(InputError, match="is a named pipe"):
        write_bytes(fifo, b"x", "--out")
    assert fifo.is_fifo()


def test_a_symbolic_link_is_refused_and_its_target_untouched(tmp_path):
    target = tmp_path / "target"
    target.write_bytes(b"keep")
    link = tmp_path / "link"
    link.symlink_to(target)
    with pytest.raises(InputError, match="is a symbolic link"):
        write_bytes(link, b"x", "--out")
    assert link.is_symlink() and target.read_bytes() == b"keep"


def test_a_device_is_refused():
    with pytest.raises(InputError, match="a device or socket"):
        check_output_file("/dev/null", "--out")


def test_a_directory_is_refused(tmp_path):
    with pytest.raises(InputError, match="is a directory"):
        check_output_file(tmp_path, "--out")


def test_a_path_inside_a_file_is_refused(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(InputError, match="not a directory"):
        check_output_file(tmp_path / "afile" / "x", "--out")
    with pytest.raises(InputError, match="not a directory"):
        check_output_dir(tmp_path / "afile" / "x", "DST")


def test_a_missing_directory_is_named(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        check_output_file(tmp_path / "no" / "x.wav", "--out")


def test_a_name_over_the_file_system_limit_is_refused_before_any_work(tmp_path):
    with pytest.raises(InputError, match="255-byte limit"):
        check_output_file(tmp_path / ("x" * 300), "--out")


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    out = tmp_path / "o.json"
    out.write_text("old")
    with pytest.raises(RuntimeError):
        with output_file(out, "--json") as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert out.read_text() == "old" and os.listdir(tmp_path) == ["o.json"]


def test_a_temporary_of_a_dead_process_is_removed_by_the_next_write(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    stale = tmp_path / f".o.wav.tmp-{pid}-abcd1234"
    stale.write_bytes(b"half")
    live = tmp_path / f".o.wav.tmp-{os.getppid()}-abcd1234"  # a running process: left alone
    live.write_bytes(b"busy")
    write_bytes(tmp_path / "o.wav", b"x", "--out")
    assert not stale.exists() and live.exists()


def test_replacing_a_directory_removes_a_killed_runs_folder_and_swaps_atomically(tmp_path):
    dst = tmp_path / "native"
    dst.mkdir()
    (dst / "old").write_text("old")
    killed = tmp_path / ".native.converting-deadbeef"  # the older name form, without a pid
    killed.mkdir()
    with replacing_dir(dst, label="converting") as tmp:
        (tmp / "new").write_text("new")
    assert sorted(os.listdir(tmp_path)) == ["native"]
    assert os.listdir(dst) == ["new"]


def test_a_swap_killed_between_its_renames_is_undone_by_the_next_run(tmp_path):
    dst = tmp_path / "native"
    aside = tmp_path / ".native.replaced-999999999-abcd1234"  # the previous complete DST, moved aside
    aside.mkdir()
    (aside / "weights").write_text("complete")
    assert restore_interrupted_swap(dst) == dst
    assert (dst / "weights").read_text() == "complete" and not aside.exists()
