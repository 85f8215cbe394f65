"""A file of speech unit ids (a prompt heard as units, or units to synthesise), read in one of three forms."""

from __future__ import annotations

import json
import re
from pathlib import Path

from reempathy.errors import InputError
from reempathy.paths import check_name, read_input_file

_AUDIO_TOKEN = re.compile(r"<\|audio_(\d+)\|>")
MAX_UNITS_BYTES = 16 * 2**20  # a units file of an 8192-token context is about 50 kB
_AUDIO_ONLY = re.compile(r"^(\s*<\|audio_\d+\|>)*\s*$")
_INTEGERS = re.compile(r"^[0-9]+([\s,]+[0-9]+)*$")


def read_units(path: str | Path) -> list[int]:
    """Speech unit ids from a file: a JSON list, ``<|audio_N|>`` tokens, or whitespace/comma-separated integers.

    One form per file: anything else in it (words beside ``<|audio_N|>`` tokens, a number that is
    not a whole number) is an InputError, so a file is never half read.
    """
    p = check_name(path, "units file")
    raw = read_input_file(p, "units file", MAX_UNITS_BYTES, InputError, "give a file of speech unit ids")
    try:
        text = raw.decode("utf-8").strip()
    except UnicodeDecodeError as exc:
        raise InputError(f"units file {str(p)!r} is not UTF-8 text (byte {exc.start}); it should hold unit ids") from None
    if not text:
        raise InputError(f"units file {str(p)!r} is empty; it should hold speech unit ids")
    expected = "expected integers (a JSON list, whitespace-separated, or <|audio_N|> tokens)"
    if text.startswith("["):
        try:
            data = json.loads(text)
        except (ValueError, RecursionError):
            raise InputError(f"units file {str(p)!r} is not a valid JSON list; {expected}") from None
        if not isinstance(data, list) or not all(isinstance(u, int) and not isinstance(u, bool) for u in data):
            raise InputError(f"units file {str(p)!r}: the JSON list must hold integers only; {expected}")
        units = list(data)
    elif "<|audio_" in text:
        if not _AUDIO_ONLY.match(text):
            raise InputError(
                f"units file {str(p)!r} mixes <|audio_N|> tokens with other text; give only the tokens (or only integers)"
            )
        units = [int(m) for m in _AUDIO_TOKEN.findall(text)]
    elif _INTEGERS.match(text):
        try:
            units = [int(tok) for tok in re.split(r"[\s,]+", text) if tok]
        except ValueError:  # a number of thousands of digits
            raise InputError(f"units file {str(p)!r}: a unit id is absurdly long; {expected}") from None
    else:
        raise InputError(f"units file {str(p)!r}: {expected}")
    if not units:
        raise InputError(f"units file {str(p)!r} holds no unit ids")
    return units


__all__ = ["read_units", "MAX_UNITS_BYTES"]
