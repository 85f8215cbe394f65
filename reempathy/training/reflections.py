"""The reflections of a ``reempathy`` training sequence: one per full spoken chunk, f_k right after r_k.

Where it decides:

- :func:`reflection_texts` takes the record's per-chunk ``reflections`` when it has them for the
  training layout (their number must equal the answer's full chunks, else the record is bad)
  and otherwise — no reflections, or reflections marked for another ``reflections_layout`` —
  cuts the record's global assessment into that many pieces with :func:`split_at_boundaries`.
- :func:`split_at_boundaries` cuts at sentence ends first; only when there are fewer sentences
  than pieces does it cut inside sentences, and then only between words (never inside a word).
  Pieces are balanced by token count. When the assessment has fewer words than pieces, the last
  reflections are empty (the model learns to close them at once).
- :func:`fit_to_length` is the fixed-length rule (training's side of decoding's
  ``reflection_tokens`` mode, where every reflection is exactly N text tokens and the decoder
  forces the close): a longer reflection is cut after its last whole word that fits (inside a
  word only when its first word alone is longer than N), a shorter one is padded with the
  backbone's space token up to N.

A short answer (no full chunk) gets no reflection: the decoder reflects only when a chunk is
full and may stop inside a chunk, so a reflection after a shorter last chunk is something
decoding never writes.
"""

from __future__ import annotations

import re
from typing import Callable, Sequence

from reempathy.backbones.base import Backbone
from reempathy.errors import InputError

_WORD = re.compile(r"\S+")
# A word that ends a sentence: . ! ? or … then any closing quotes or brackets.
_SENTENCE_END = re.compile(r"[.!?…][\"'”’)\]]*$")


def _partition(costs: Sequence[int], parts: int) -> list[int]:
    """Cut points splitting ``costs`` into ``parts`` non-empty consecutive groups whose sums are as even as
    possible (least sum of squares). Returns the start index of every group; needs ``parts <= len(costs)``."""
    n = len(costs)
    prefix = [0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    # best[k][i]: least sum of squares for the first i items in k groups; back[k][i]: where group k starts.
    best = [[inf] * (n + 1) for _ in range(parts + 1)]
    back = [[0] * (n + 1) for _ in range(parts + 1)]
    best[0][0] = 0.0
    for k in range(1, parts + 1):
        for i in range(k, n - (parts - k) + 1):
            for j in range(k - 1, i):
                if best[k - 1][j] == inf:
                    continue
                s = prefix[i] - prefix[j]
                value = best[k - 1][j] + s * s
                if value < best[k][i]:
                    best[k][i], back[k][i] = value, j
    starts, i = [], n
    for k in range(parts, 0, -1):
        i = back[k][i]
        starts.append(i)
    return starts[::-1]


def _groups(items: Sequence[int], starts: Sequence[int]) -> list[list[int]]:
    bounds = list(starts) + [len(items)]
    return [list(items[bounds[g] : bounds[g + 1]]) for g in range(len(starts))]


def split_at_boundaries(text: str, parts: int, count: Callable[[str], int]) -> list[str]:
    """``text`` cut into ``parts`` pieces at sentence ends, then (if needed) between words, never inside a word.

    ``count`` gives the tokens of a word; pieces are balanced by it. Each piece is a slice of
    ``text`` from the start of its first word to the end of its last (whitespace between pieces
    is dropped, whitespace inside a piece kept). With fewer words than ``parts`` every word is a
    piece and the remaining pieces are empty strings, at the end.
    """
    if parts < 1:
        return []
    spans = [(m.start(), m.end()) for m in _WORD.finditer(text)]
    if not spans:
        return [""] * parts
    costs = [max(1, count(text[a:b])) for a, b in spans]
    sentences: list[list[int]] = [[]]
    for i, (a, b) in enumerate(spans):
        sentences[-1].append(i)
        if _SENTENCE_END.search(text[a:b]) and i + 1 < len(spans):
            sentences.append([])

    if parts <= len(sentences):
        sentence_costs = [sum(costs[i] for i in s) for s in sentences]
        groups = [[w for s in g for w in sentences[s]] for g in _groups(range(len(sentences)), _partition(sentence_costs, parts))]
    else:
        # Fewer sentences than pieces: every sentence gets a piece, and each further piece goes to
        # the sentence whose pieces are longest on average, as long as it has words to spare.
        shares = [1] * len(sentences)
        for _ in range(parts - len(sentences)):
            open_ = [s for s in range(len(sentences)) if shares[s] < len(sentences[s])]
            if not open_:
                break
            s = max(open_, key=lambda s: (sum(costs[i] for i in sentences[s]) / shares[s], -s))
            shares[s] += 1
        groups = []
        for s, words in enumerate(sentences):
            starts = _partition([costs[i] for i in words], shares[s])
            groups.extend(_groups(words, starts))
    pieces = [text[spans[g[0]][0] : spans[g[-1]][1]] for g in groups]
    return pieces + [""] * (parts - len(pieces))


def space_token(backbone: Backbone) -> int:
    """The backbone's single text token for ``" "``: what fixed-length reflections are padded with."""
    ids = list(backbone.tokenizer.encode(" ", add_special_tokens=False))
    if len(ids) != 1 or not backbone.layout.is_text(ids[0]):
        raise InputError(
            f"backbone {backbone.name!r}: fixed-length reflections are padded with the space token, but its tokenizer "
            f"encodes ' ' as {ids}; train with free-length reflections (leave reflection_tokens unset)"
        )
    return ids[0]


def fit_to_length(text: str, length: int, encode: Callable[[str], list[int]], filler: int) -> list[int]:
    """Exactly ``length`` token ids for ``text``: cut after the last whole word that fits, then padded with ``filler``.

    Only when the first word alone has more than ``length`` tokens is it cut inside (its first
    ``length`` tokens), since no whole word fits.
    """
    ids = encode(text)
    if len(ids) > length:
        fitted: list[int] = []
        for m in _WORD.finditer(text):
            candidate = encode(text[: m.end()])
            if len(candidate) > length:
                break
            fitted = candidate
        ids = fitted or ids[:length]
    return ids + [filler] * (length - len(ids))


def reflection_texts(
    reflections: Sequence[str] | None,
    reflections_layout: str | None,
    assessment: str | None,
    full_chunks: int,
    count: Callable[[str], int],
    where: str,
    layout: str,
) -> list[str]:
    """The text of each reflection, one per full chunk: the record's own ``reflections``, else the assessment split.

    ``layout`` is the training chunk layout as ``"TEXT+AUDIO"``. Reflections written for another
    layout (``reflections_layout``) are set aside and the assessment is split instead. Raises
    InputError (``where`` = FILE:LINE) when the record's reflections are not one per full chunk,
    or when there is nothing to make reflections of.
    """
    if reflections is not None and reflections_layout not in (None, layout):
        if assessment is None and full_chunks:
            raise InputError(
                f"{where}: the reflections were written for {reflections_layout} chunks, training uses {layout} "
                "and the record has no assessment to split instead; add one, or train with the reflections' layout"
            )
        reflections = None
    if reflections is not None:
        if len(reflections) != full_chunks:
            raise InputError(
                f"{where}: {len(reflections)} reflections for {full_chunks} full spoken chunk"
                f"{'s' if full_chunks != 1 else ''} of {layout} tokens (a shorter last chunk gets none); "
                f"give one reflection per full chunk, or drop 'reflections' to split the assessment"
            )
        return list(reflections)
    if full_chunks == 0:
        return []
    if assessment is None:
        raise InputError(
            f"{where}: strategy 'reempathy' needs the record's per-chunk 'reflections' or its assessment "
            "(whose text is split into the reflections)"
        )
    return split_at_boundaries(assessment, full_chunks, count)


__all__ = ["split_at_boundaries", "fit_to_length", "space_token", "reflection_texts"]
