"""The README's sample output is what the command prints (timings aside)."""

from __future__ import annotations

from pathlib import Path

from reempathy.cli import main

ROOT = Path(__file__).resolve().parents[1]
COMMAND = "$ reempathy decode --config configs/reempathy.toml"


def readme_sample() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index(COMMAND + "\n") + len(COMMAND) + 1
    return text[start : text.index("```", start)].splitlines()


def test_the_readme_sample_output_is_what_decode_prints(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert main(["decode", "--config", "configs/reempathy.toml"]) == 0
    printed = capsys.readouterr().out.splitlines()
    keep = lambda lines: [line for line in lines if not line.startswith("timings:")]  # noqa: E731
    assert keep(printed) == keep(readme_sample())
    assert any(line.startswith("timings:") for line in readme_sample())
