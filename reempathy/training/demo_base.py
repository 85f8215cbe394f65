"""The demo's base model: the tiny architecture trained, all weights, on examples/ before the checkpoints.

A real backbone (GLM-4-Voice) already speaks; the tiny one is random, and a LoRA adapter on a
random 2-layer model learns too slowly for a demo (its frozen random embeddings and head leave
the adapter little to work with: rank 8 for 40 steps gave noise, rank 64 for 150 steps on an
English-trained base still left reflections garbled). So ``reempathy demo`` first makes a
stand-in for a backbone that has seen such data: the tiny architecture, initialised the usual
way (normal, std 0.02), trained on every example record laid out as ``sft`` (twice),
``cotbs`` and ``reempathy`` (twice) sequences (the builders' own output: prompt, answer, thoughts,
reflections, delimiters). Each strategy's LoRA checkpoint is then trained on top by the ordinary
``reempathy train`` path, and decoding with each checkpoint's strategy picks its layout.

What this model can and cannot do: 34 records are memorised, not understood. Given the prompt
of a training record it says that record's answer, in the layout its strategy asks for,
with that record's reflections after their chunks; given a new prompt it blends memorised
fragments into non-words (tried: answers after randomly drawn prompts make new prompts
readable for ``cotbs`` and ``reempathy`` but not for ``sft``, where nothing constrains the
layout). The demo therefore shows a training prompt by default and the held-out one on request.

Where it decides: :data:`BASE_SETTINGS` (layouts, steps, learning rate). The base is saved
as a ``tiny`` ``path`` directory (``save_pretrained``: config, safetensors, tokenizer),
written to a temporary sibling and renamed, so a killed run leaves nothing that looks complete.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from reempathy.backbones.base import Backbone
from reempathy.backbones.tiny import TinyOptions, load_tiny
from reempathy.safe_write import replacing_dir
from reempathy.training.builders import BUILDERS, IGNORE_INDEX, TrainingSequence, build_all
from reempathy.data.records import RecordSet


@dataclass(frozen=True)
class BaseSettings:
    """How the demo's base is made (all of it goes into the demo's cache key)."""

    # (builder, copies). The plain spoken layout twice, so that decoding with nothing to steer the
    # layout (sft, and the dpo checkpoint, which learns preferences, not layouts) speaks it; the
    # reempathy layout twice, the slowest to learn (a reflection after every chunk).
    layouts: tuple[tuple[str, int], ...] = (("sft", 2), ("cotbs", 1), ("reempathy", 2))
    steps: int = 1000
    batch_size: int = 4
    learning_rate: float = 5e-3  # decayed linearly to zero
    init_std: float = 0.02
    seed: int = 0


BASE_SETTINGS = BaseSettings()


def base_corpus(records: RecordSet, backbone: Backbone, layouts: tuple[tuple[str, int], ...]) -> list[list[TrainingSequence]]:
    """Every record built by each builder of ``layouts`` (default options, as ``reempathy train`` builds them),
    one group per layout, each layout repeated its number of copies."""
    groups = []
    for name, copies in layouts:
        spec = BUILDERS[name]
        items = build_all(records, backbone, spec, spec.options_model()).items
        groups += [list(items)] * copies  # type: ignore[list-item]
    return groups


def _batches(groups: list[list[TrainingSequence]], size: int, rng: random.Random, pad: int) -> Iterator[tuple[torch.Tensor, ...]]:
    """Endless shuffled epochs of right-padded batches (ids, labels, attention mask). A batch holds one layout's
    sequences, which are of similar length, so little of it is padding."""
    while True:
        batches = []
        for group in groups:
            order = list(range(len(group)))
            rng.shuffle(order)
            batches += [[group[i] for i in order[start : start + size]] for start in range(0, len(order), size)]
        rng.shuffle(batches)
        for rows in batches:
            width = max(len(r.input_ids) for r in rows)
            ids = torch.tensor([r.input_ids + [pad] * (width - len(r.input_ids)) for r in rows])
            labels = torch.tensor([r.labels + [IGNORE_INDEX] * (width - len(r.labels)) for r in rows])
            mask = torch.tensor([[1] * len(r.input_ids) + [0] * (width - len(r.input_ids)) for r in rows])
            yield ids, labels, mask


def train_base(
    records: RecordSet,
    out: Path,
    settings: BaseSettings = BASE_SETTINGS,
    progress: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Initialise the tiny model, train every weight on :func:`base_corpus`, save it to ``out``; returns the losses."""
    backbone = load_tiny(TinyOptions(seed=settings.seed))
    model = backbone.model
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, settings.init_std)
    groups = base_corpus(records, backbone, settings.layouts)
    pad = backbone.tokenizer.pad_token_id or 0
    batches = _batches(groups, settings.batch_size, random.Random(settings.seed), pad)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate, weight_decay=0.0)
    # Linear decay to zero: the last steps settle the memorised details (a constant rate leaves them noisy).
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / settings.steps)
    model.train()
    losses = []
    for step in range(settings.steps):
        ids, labels, mask = next(batches)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        if progress is not None:
            progress(step + 1, losses[-1])
    model.eval()
    # Saved beside, synced and swapped in (the shared write discipline): a kill leaves no base that looks trained.
    with replacing_dir(out, "partial") as partial:
        model.save_pretrained(partial)
        backbone.tokenizer.save_pretrained(partial)
    return losses


def settings_key(settings: BaseSettings = BASE_SETTINGS) -> str:
    """The settings as a stable string, for the demo's cache key."""
    return repr(sorted(asdict(settings).items()))


__all__ = ["BaseSettings", "BASE_SETTINGS", "base_corpus", "train_base", "settings_key"]
