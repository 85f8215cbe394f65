"""Exit codes and the one-line rule (docs/errors.md): every failure is one line on stderr; --debug adds the traceback."""

from __future__ import annotations

import pytest

from reempathy import cli
from reempathy.cli import main
from reempathy.errors import PluginFailure


def run(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("reempathy: error: "), lines[0]
    return lines[0]


@pytest.mark.parametrize(
    "args, needle",
    [
        (("decode", "--seed", "x"), "argument --seed: invalid seed 'x'"),
        (("decode", "--prompt", "hi", "--units", "u.txt"), "not allowed with argument --prompt"),
        (("decode", "--no-such-flag"), "unrecognized arguments: --no-such-flag"),
        ((), "the following arguments are required: COMMAND"),
        (("speech",), "the following arguments are required"),
        (("decode", "--max-new-tokens", "0"), "argument --max-new-tokens"),
    ],
)
def test_a_command_line_argparse_cannot_read_is_one_line_and_exit_2(capsys, args, needle):
    code, _, err = run(capsys, *args)
    assert code == 2
    line = one_line(err)
    assert needle in line and "--help" in line


def test_help_still_prints_and_exits_0(capsys):
    code, out, _ = run(capsys, "decode", "--help")
    assert code == 0 and "--strategy" in out and "--backbone" in out


def test_seeds_of_2_63_and_more_are_refused_on_the_command_line(capsys):
    code, _, err = run(capsys, "decode", "--seed", str(2**63))
    assert code == 2 and "out of range" in one_line(err)


def _raise(exc):
    def command(args):
        raise exc

    return command


def _with_command(monkeypatch, exc):
    real = cli.build_parser

    def build():
        parser = real()
        parser.set_defaults(func=_raise(exc))
        for action in parser._actions:
            if hasattr(action, "choices") and isinstance(action.choices, dict):
                action.choices["plugins"].set_defaults(func=_raise(exc))
        return parser

    monkeypatch.setattr(cli, "build_parser", build)


def test_an_unexpected_exception_is_one_line_that_says_bug_and_exit_1(capsys, monkeypatch):
    _with_command(monkeypatch, ZeroDivisionError("division by zero"))
    code, _, err = run(capsys, "plugins")
    assert code == 1
    line = one_line(err)
    assert "bug" in line and "ZeroDivisionError: division by zero" in line and "--debug" in line


def test_debug_flag_shows_the_traceback_before_the_line(capsys, monkeypatch):
    _with_command(monkeypatch, ZeroDivisionError("division by zero"))
    code, _, err = run(capsys, "plugins", "--debug")
    assert code == 1
    assert "Traceback (most recent call last)" in err
    assert err.strip().splitlines()[-1].startswith("reempathy: error: internal error")


def test_debug_flag_before_the_command_works_too(capsys, monkeypatch):
    _with_command(monkeypatch, ZeroDivisionError("x"))
    code, _, err = run(capsys, "--debug", "plugins")
    assert code == 1 and "Traceback" in err


def test_debug_environment_variable_shows_the_traceback(capsys, monkeypatch):
    monkeypatch.setenv("REEMPATHY_DEBUG", "1")
    _with_command(monkeypatch, ZeroDivisionError("x"))
    code, _, err = run(capsys, "plugins")
    assert code == 1 and "Traceback" in err


def test_a_plugin_failure_is_one_line_naming_plugin_and_hook_exit_1(capsys, monkeypatch):
    _with_command(monkeypatch, PluginFailure("acme", "reempathy_logits", ValueError("bad\nthings")))
    code, _, err = run(capsys, "plugins")
    assert code == 1
    line = one_line(err)
    assert "plugin 'acme' failed in reempathy_logits: ValueError: bad things" in line and "--debug" in line


def test_a_multi_line_message_is_joined_into_one_line(capsys, monkeypatch):
    from reempathy.errors import InputError

    _with_command(monkeypatch, InputError("first\nsecond\n\nthird"))
    code, _, err = run(capsys, "plugins")
    assert code == 2 and one_line(err).endswith("first second third")


def test_a_file_system_refusal_on_a_named_path_is_the_users_exit_2(capsys, monkeypatch):
    _with_command(monkeypatch, PermissionError(13, "Permission denied", "/root/secret"))
    code, _, err = run(capsys, "plugins")
    assert code == 2 and "/root/secret: Permission denied" in one_line(err)


def test_a_lone_surrogate_in_an_argument_is_printed_escaped(capsys):
    code, _, err = run(capsys, "decode", "--config", "missing-\udcff.toml")
    assert code == 2 and "\\udcff" in one_line(err)
