"""Fill the ``units`` of every message in the example JSONL files with synthetic audio units.

The units are not speech: each word maps to a few unit ids taken from a hash of the word, so the
same word always "sounds" the same, and every id is in 0..1023 (the tiny backbone's range).
A message gets two units per text token of the tiny backbone's tokenizer, plus a short tail,
so the answers lay out in any chunk layout with two audio slots per text slot (13+26, 5+10, ...).
Records with per-chunk ``reflections`` are checked against their answer's full chunks (in their
``reflections_layout``, 5+10 by default): a mismatch is listed and the exit status is 1.

    python examples/synth_units.py examples/empathy_dialogues.jsonl examples/heldout.jsonl

Running it again gives the same file.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

from reempathy.backbones.tiny import build_tokenizer
from reempathy.decoding.chunking import ChunkLayout, split_spoken

UNITS = 1024
PER_TOKEN = 2
TAIL = 2


def word_units(word: str, count: int) -> list[int]:
    """``count`` unit ids derived from the word's hash."""
    out = []
    for i in range(count):
        digest = hashlib.sha256(f"{word.lower()}#{i}".encode()).digest()
        out.append(int.from_bytes(digest[:4], "big") % UNITS)
    return out


def synthetic_units(text: str, tokenizer) -> list[int]:
    """Units for a text: per word, two per token of that word; topped up to two per token of the whole text."""
    units: list[int] = []
    for n, word in enumerate(text.split()):
        piece = word if n == 0 else " " + word
        units.extend(word_units(word, PER_TOKEN * len(tokenizer.encode(piece, add_special_tokens=False))))
    need = PER_TOKEN * len(tokenizer.encode(text, add_special_tokens=False)) + TAIL
    units.extend(word_units("<pause>", max(0, need - len(units))))
    return units


def full_chunks(text: str, units: list[int], layout: str, tokenizer) -> int:
    """How many full chunks of ``layout`` ("5+10") the answer fills, as the training builder lays it out."""
    text_slots, audio_slots = (int(n) for n in layout.split("+"))
    text_ids = tokenizer.encode(text, add_special_tokens=False)
    chunks = split_spoken(text_ids, [UNITS + u for u in units], ChunkLayout(text_slots, audio_slots))
    return sum(1 for chunk in chunks if len(chunk) == text_slots + audio_slots)


def fill(path: Path, tokenizer) -> tuple[int, list[str]]:
    """Rewrite ``path`` with synthetic units in every message that has text.

    Returns the number of records and one line per record whose per-chunk ``reflections`` no
    longer match the full chunks of its answer (after its text changed, say).
    """
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    mismatched = []
    for lineno, record in enumerate(records, start=1):
        messages = list(record["messages"])
        if record.get("rejected"):
            messages.append(record["rejected"])
        for message in messages:
            if message.get("text"):
                message["units"] = synthetic_units(message["text"], tokenizer)
        answer, reflections = record["messages"][-1], record.get("reflections")
        if reflections is not None and answer.get("text"):
            layout = record.get("reflections_layout", "5+10")
            need = full_chunks(answer["text"], answer["units"], layout, tokenizer)
            if need != len(reflections):
                mismatched.append(f"{path}:{lineno}: {len(reflections)} reflections for {need} full {layout} chunks")
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return len(records), mismatched


def main(argv: list[str]) -> int:
    tokenizer = build_tokenizer()
    bad = []
    for name in argv:
        count, mismatched = fill(Path(name), tokenizer)
        print(f"{name}: {count} records")
        bad += mismatched
    for line in bad:
        print(f"{line}; rewrite them, one per full chunk")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
