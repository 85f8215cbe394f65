"""The state of one answer being decoded: sequence, labels, segments, counters."""

from __future__ import annotations

from typing import Any

import torch

from reempathy.backbones.base import Backbone
from reempathy.decoding.spans import CONTROL, PROMPT, SPEAK, SPOKEN_AUDIO, SPOKEN_TEXT, Segment, Span


class DecodeSession:
    """What plugins read while an answer is decoded. The loop is the only writer of sequence state.

    ``ids`` holds every position (prompt, generated, forced); ``labels`` the label of each;
    ``segments`` one entry per stay in a phase. ``forwarded`` counts tokens sent through the model.
    ``spoken_tokens`` counts the generated tokens of the spoken stream (text and audio), ``hidden_tokens`` the
    generated content tokens of hidden segments (reflections, thoughts); control tokens count in
    neither. The token budgets (``max_spoken_tokens``, ``max_hidden_tokens``) are read against them.
    """

    def __init__(self, backbone: Backbone, prompt_ids: list[int], generator: torch.Generator, options: Any) -> None:
        self.backbone = backbone
        self.layout = backbone.layout
        self.options = options
        self.generator = generator
        self.ids: list[int] = list(prompt_ids)
        self.labels: list[str] = [PROMPT] * len(prompt_ids)
        self.prompt_len = len(prompt_ids)
        self.segments: list[Segment] = []
        self.generated = 0
        self.spoken_tokens = 0
        self.hidden_tokens = 0
        self.forced = 0
        self.forwarded = 0
        self.unforwarded = 0
        self.extra: dict[str, Any] = {}
        self._phase_counts: dict[str, int] = {}

    # --- read side -------------------------------------------------------------------

    @property
    def phase(self) -> str | None:
        """Name of the current phase (``speak`` or a hidden phase such as ``reflection``)."""
        return self.segments[-1].phase if self.segments else None

    @property
    def hidden(self) -> bool:
        """True while the current phase is never spoken."""
        return bool(self.segments) and self.segments[-1].hidden

    @property
    def segment(self) -> Segment | None:
        """The segment being generated now."""
        return self.segments[-1] if self.segments else None

    def last_segment(self, phase: str | None = None, hidden: bool | None = None) -> Segment | None:
        """The most recent finished segment (not the current one) matching ``phase`` and/or ``hidden``."""
        for seg in reversed(self.segments[:-1]):
            if (phase is None or seg.phase == phase) and (hidden is None or seg.hidden == hidden):
                return seg
        return None

    def segment_ids(self, segment: Segment) -> list[int]:
        """Token ids of a segment's content (control tokens inside it excluded)."""
        return [
            self.ids[i] for i in range(segment.start, segment.end) if self.labels[i] != CONTROL
        ]

    def spans(self) -> list[Span]:
        """Maximal runs of one label; generated runs carry their segment's position in ``segments`` (1-based)."""
        out: list[Span] = []
        seg_of = [0] * len(self.ids)
        for n, seg in enumerate(self.segments, start=1):
            for i in range(seg.start, seg.end):
                seg_of[i] = n
        start = 0
        for i in range(1, len(self.ids) + 1):
            if i == len(self.ids) or self.labels[i] != self.labels[start] or seg_of[i] != seg_of[start]:
                out.append(Span(self.labels[start], start, i, seg_of[start]))
                start = i
        return out

    # --- write side (the loop only) ----------------------------------------------------

    def _label_sampled(self, token_id: int) -> str:
        layout = self.layout
        if self.hidden:
            return self.phase if layout.is_text(token_id) else CONTROL  # type: ignore[return-value]
        if layout.is_text(token_id):
            return SPOKEN_TEXT
        if layout.is_audio(token_id):
            return SPOKEN_AUDIO
        return CONTROL

    def _append_sampled(self, token_id: int) -> None:
        label = self._label_sampled(token_id)
        pos = len(self.ids)
        self.ids.append(token_id)
        self.labels.append(label)
        self.generated += 1
        seg = self.segments[-1]
        if label is SPOKEN_TEXT or label is SPOKEN_AUDIO:
            self.spoken_tokens += 1
        elif label != CONTROL:
            self.hidden_tokens += 1
        if label != CONTROL:
            if seg.start == seg.end:
                seg.start = pos
            seg.end = pos + 1

    def _append_forced(self, tokens: tuple[int, ...]) -> None:
        self.ids.extend(tokens)
        self.labels.extend([CONTROL] * len(tokens))
        self.forced += len(tokens)

    def _append_prefix(self, tokens: tuple[int, ...]) -> None:
        """Forced tokens that open the current segment (``Switch.prefix``): labelled, and in the segment, as if sampled."""
        seg = self.segments[-1]
        for token_id in tokens:
            label = self._label_sampled(token_id)
            pos = len(self.ids)
            self.ids.append(token_id)
            self.labels.append(label)
            if label != CONTROL:
                if seg.start == seg.end:
                    seg.start = pos
                seg.end = pos + 1
        self.forced += len(tokens)

    def _enter(self, phase: str, hidden: bool) -> Segment:
        n = self._phase_counts.get(phase, 0) + 1
        self._phase_counts[phase] = n
        pos = len(self.ids)
        seg = Segment(phase=phase, hidden=hidden, index=n, start=pos, end=pos)
        self.segments.append(seg)
        return seg


__all__ = ["DecodeSession", "SPEAK", "PROMPT", "CONTROL", "SPOKEN_TEXT", "SPOKEN_AUDIO"]
