"""`reempathy convert`: a killed run is cleaned up by the next, a DST inside a file is one error, wording (issue 16)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from glm4voice_fixture import make_tiny_glm4voice_dir

from reempathy.backbones.glm4voice import convert_glm4voice
from reempathy.cli import main


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    return make_tiny_glm4voice_dir(tmp_path_factory.mktemp("glm4voice") / "published")


def dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def test_a_killed_conversions_temporary_folders_are_removed_by_the_next_run(src, tmp_path):
    dst = tmp_path / "native"
    for name in (f".native.converting-{dead_pid()}-0badc0de", ".native.converting-deadbeef"):  # new and old forms
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"half")
    convert_glm4voice(src, dst)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["native"]


def test_a_running_conversions_temporary_folder_is_left_alone(src, tmp_path):
    busy = tmp_path / f".native.converting-{os.getppid()}-0badc0de"
    busy.mkdir()
    convert_glm4voice(src, tmp_path / "native")
    assert busy.exists()


def test_a_conversion_killed_mid_swap_gets_its_previous_destination_back(src, tmp_path):
    aside = tmp_path / f".native.replaced-{dead_pid()}-0badc0de"
    aside.mkdir()
    (aside / "config.json").write_text("{}")
    dst = tmp_path / "native"
    with pytest.raises(Exception, match="not empty"):
        convert_glm4voice(src, dst)  # the restored DST is a non-empty directory again
    assert (dst / "config.json").read_text() == "{}" and not aside.exists()


def test_a_destination_inside_a_file_is_one_line(src, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    code = main(["convert", "glm-4-voice", str(src), str(tmp_path / "afile" / "x")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "not a directory" in err


def test_a_non_empty_destination_names_the_flag(src, tmp_path, capsys):
    dst = tmp_path / "native"
    dst.mkdir()
    (dst / "keep").write_text("x")
    code = main(["convert", "glm-4-voice", str(src), str(dst)])
    err = capsys.readouterr().err
    assert code == 2 and "pass --overwrite" in err and "overwrite=True" not in err


def test_a_destination_that_is_a_symbolic_link_is_refused(src, tmp_path, capsys):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    code = main(["convert", "glm-4-voice", str(src), str(tmp_path / "link"), "--overwrite"])
    assert code == 2 and "symbolic link" in capsys.readouterr().err
    assert (tmp_path / "link").is_symlink()
