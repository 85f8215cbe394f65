"""What transformers prints while a backbone loads: its "Loading weights" progress bar is switched off.

transformers 5 draws a tqdm bar on stderr for every ``from_pretrained`` (``core_model_loading``
iterates the checkpoint's tensors through ``transformers.utils.logging.tqdm``). A load takes
seconds for the models this project runs, and the bar would stand as an extra stderr line
before any later error, where the CLI promises exactly one (``reempathy: error: ...``). So the
backbones that load through ``from_pretrained`` (``qwen2.5-omni``, ``hf-interleaved``) load
inside :func:`no_loading_bar`, which restores the previous setting afterwards.
"""

from __future__ import annotations

import contextlib
from typing import Iterator


@contextlib.contextmanager
def no_loading_bar() -> Iterator[None]:
    """transformers' progress bars off for the duration; back on afterwards if they were on before."""
    from transformers.utils import logging

    before = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if before:
            logging.enable_progress_bar()


__all__ = ["no_loading_bar"]
