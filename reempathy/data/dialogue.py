"""The prompt/reference rule: which messages of a dialogue are the prompt, which is the answer, and how each is heard.

One rule for training and running: the **prompt** is every message before the last assistant
turn, that turn is the **reference** answer, and a user message is heard as its units when it
has them and the backbone has audio-unit tokens, else read as its text.
"""

from __future__ import annotations

from reempathy.backbones.base import Turn
from reempathy.data.records import SourcedRecord
from reempathy.data.schema import Message
from reempathy.errors import InputError


def prompt_turn(message: Message, hears_units: bool = True) -> Turn:
    """A message as a prompt turn: a user turn is heard as its units when it has them (and the backbone
    has audio-unit tokens), else read as its text."""
    if message.role == "user" and message.units and (hears_units or not message.text):
        return Turn("user", units=list(message.units))
    if not hears_units:
        return Turn(message.role, text=message.text)
    return Turn(message.role, text=message.text, units=list(message.units) if message.units else None)


def split_record(sr: SourcedRecord) -> tuple[list[Message], Message]:
    """The context messages and the final assistant answer of a record."""
    messages = sr.record.messages
    answer = messages[-1]
    if answer.role != "assistant":
        raise InputError(f"{sr.where}: the last message must be the assistant's answer, not a {answer.role} message")
    if len(messages) < 2 or messages[-2].role != "user":
        raise InputError(f"{sr.where}: the assistant's answer must follow a user message")
    return list(messages[:-1]), answer


__all__ = ["prompt_turn", "split_record"]
