"""Strategy ``sft``: plain decoding of the spoken stream, text and audio tokens as the backbone emits them."""

from __future__ import annotations

from pydantic import BaseModel

from reempathy.backbones.base import Backbone
from reempathy.options import STRICT


class SftOptions(BaseModel):
    """``sft`` has no options."""

    model_config = STRICT


class SftStrategy:
    """Lets every sampled token through; the loop stops at the backbone's stop tokens or the budget."""

    name = "sft"

    def __init__(self, options: SftOptions, backbone: Backbone) -> None:
        self.options = options
