"""A stand-in for the strong LLM of ``reempathy make-data``: replies to each step of the shipped prompts from the prompt alone.

Used behind :class:`evaluation_helpers.ChatServer` (an OpenAI-compatible chat-completions server on
127.0.0.1): the step is recognised by the shipped template's wording, the reply is built from what
the prompt says (the record's topic and emotion, the number of user turns), so the same prompt
always gets the same reply — like an LLM at temperature 0. ``override[step]`` replaces a step's
reply: a function ``(body, n) -> (status, text)``, ``n`` counting that step's requests from 1. It also
answers llm-judge: a reflection on an answer prefix (``reflect-data``, ``make-data --reflections``) and
the four scores of an answer (``reempathy eval``).
"""

from __future__ import annotations

import json
import re
import threading
from typing import Callable

from evaluation_helpers import user_text

STEP_MARKS = {
    "scenario": "Invent a realistic situation",
    "dialogue": "Write the spoken conversation",
    "assessment": "Assess that last answer",
    "rejected": "Write a worse answer",
    "reflection": "silent reflection",
    "score": "The assistant's spoken answer:",  # llm-judge scoring an answer (reempathy eval)
}
GOOD = {"need_support": 4, "wording_appropriateness": 4, "emotion_understanding": 5, "emotional_support": 4}
POOR = {"need_support": 2, "wording_appropriateness": 2, "emotion_understanding": 1, "emotional_support": 1}


def step_of(body: dict) -> str:
    """Which make-data step (or llm-judge reflection) a request is."""
    text = user_text(body)
    for step, mark in STEP_MARKS.items():
        if mark in text:
            return step
    raise AssertionError(f"the stub LLM does not know this prompt: {text[:120]!r}")


class DataLLM:
    """``reply(body)`` for :class:`ChatServer`; ``requests[step]`` counts each step's requests."""

    def __init__(self, override: dict[str, Callable[[dict, int], tuple[int, str]]] | None = None) -> None:
        self.override = override or {}
        self.requests: dict[str, int] = {}
        self.lock = threading.Lock()

    def __call__(self, body: dict) -> tuple[int, str]:
        step = step_of(body)
        with self.lock:
            self.requests[step] = n = self.requests.get(step, 0) + 1
        if step in self.override:
            return self.override[step](body, n)
        return 200, getattr(self, step)(user_text(body))

    def scenario(self, prompt: str) -> str:
        topic, emotion = re.search(r"topic: (.*?)\. How they feel: (.*?)\.", prompt).groups()
        return json.dumps({"scenario": f"A person feels {emotion} about {topic}.",
                           "story": f"For days they have felt {emotion} about {topic}. Tonight they want someone to listen."})

    def dialogue(self, prompt: str) -> str:
        emotion, topic = re.search(r"Scenario: A person feels (.*?) about (.*?)\.", prompt).groups()
        turns = int(re.search(r"The user speaks (\d+) time", prompt).group(1))
        messages = []
        for k in range(1, turns + 1):
            messages.append({"role": "user", "text": f"I feel {emotion} about {topic}." if k == 1 else "It still weighs on me."})
            messages.append({"role": "assistant", "text": "I hear you." if k < turns else
                             f"I hear you. Feeling {emotion} about {topic} is hard, and I am here with you."})
        return "Here it is:\n```json\n" + json.dumps({"messages": messages}) + "\n```"

    def assessment(self, prompt: str) -> str:
        return json.dumps({"text": "The answer names the feeling and offers support.", "scores": GOOD})

    def rejected(self, prompt: str) -> str:
        return json.dumps({"text": "Just get over it.", "assessment": {"text": "Cold and dismissive.", "scores": POOR}})

    def score(self, prompt: str) -> str:
        return json.dumps({**GOOD, "rationale": "Warm and on point."})

    def reflection(self, prompt: str) -> str:
        k = re.search(r"spoken chunk (\d+)", prompt).group(1)
        return f"Chunk {k} names the feeling; keep it warm."
