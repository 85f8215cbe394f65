"""Small plugins the tests share."""

from __future__ import annotations

from reempathy.hooks import hookimpl


class NoStop:
    """Bans the backbone's stop tokens, so that only the budget (or the strategy) ends the answer.

    The random tiny model may sample a stop token anywhere; tests about layout need full answers.
    """

    def __init__(self, backbone):
        self.ids = list(backbone.layout.stop_ids)

    @hookimpl
    def reempathy_logits(self, session, logits):
        logits[self.ids] = float("-inf")
