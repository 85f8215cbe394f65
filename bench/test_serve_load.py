"""Smoke run of the serve load test (bench/serve_load.py): two sessions at once, a few tokens, nothing lost.

The figures come from running the script itself (bench/README.md, "Serving"); this only proves it
runs end to end and that its offline check holds, in seconds.
"""

from __future__ import annotations

import pytest

pytest.importorskip("uvicorn")

import serve_load  # noqa: E402


def test_the_load_test_runs_and_every_session_equals_the_offline_decode(tmp_path):
    out = tmp_path / "load.json"
    code = serve_load.main(["--model", "tiny", "--strategy", "reempathy", "--sessions", "1,2", "--tokens", "6",
                            "--rounds-sessions", "2", "--timeout", "300", "--json", str(out)])
    import json

    rows = json.loads(out.read_text())["rows"]
    assert code == 0
    assert [r["sessions"] for r in rows] == [1, 2] and all(r["all_match_offline"] for r in rows)
