"""Where a run's adapter starts: a fresh LoRA adapter on the backbone, or a checkpoint's adapter trained further.

``[train] init_from = DIR`` continues training the adapter of a finished checkpoint: round t+1 of
iterated DPO starts from round t's policy, GRPO starts from an SFT checkpoint. The checkpoint's
adapter is loaded *unmerged and trainable*, so the new checkpoint is again one adapter on the
base weights — it decodes like any other, and its manifest names where it started.

Where it decides:

- :func:`start_from` checks the checkpoint against the run before any training: the backbone and
  every option that changes its weights (as decoding a checkpoint does), the delimiter ids, the
  LoRA settings the config sets (a run cannot change the rank of the adapter it continues; unset
  ones are taken from the adapter), and that the adapter trains every delimiter row the run's
  sequences use.
- **the reference** of DPO and GRPO: TRL copies the starting adapter into a frozen adapter named
  ``ref`` and uses it as the reference model, so round t+1's reference is round t's policy (without
  ``init_from`` the reference is the backbone with the adapter disabled). TRL copies the LoRA
  weights but not peft's trainable-token rows (their names end in ``.default``, not
  ``.default.``); :func:`sync_reference_adapter` copies those too, so the reference is exactly the
  starting policy. :func:`drop_reference_adapter` removes it before the adapter is saved.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from reempathy.backbones.base import Backbone
from reempathy.checkpoints import Manifest, apply_checkpoint, check_backbone_options, read_manifest
from reempathy.errors import ConfigError
from reempathy.registry import Registry

REFERENCE_ADAPTER = "ref"  # the name TRL gives the frozen copy of a starting adapter


@dataclass
class Start:
    """A run that continues a checkpoint's adapter: the trainable peft model, its manifest and LoRA settings."""

    model: Any
    manifest: Manifest
    directory: Path
    rank: int
    alpha: float
    dropout: float

    def record(self) -> dict[str, Any]:
        """What the new manifest says about where training started."""
        return {"path": str(self.directory), "created": self.manifest.created, "steps": self.manifest.steps,
                "method": self.manifest.training.get("method")}


def start_identity(init_from: str | None) -> dict[str, Any] | None:
    """What a resumed run must find unchanged about its starting checkpoint (read without loading it)."""
    if init_from is None:
        return None
    manifest = read_manifest(init_from)
    return {"path": str(Path(init_from).resolve()), "created": manifest.created, "steps": manifest.steps}


def start_from(
    directory: str,
    backbone: Backbone,
    backbone_name: str,
    backbone_options: dict[str, Any],
    train: Any,
    delimiter_ids: Sequence[int],
    registry: Registry,
) -> Start:
    """Load ``directory``'s adapter onto ``backbone``'s model, trainable, after the checks in the module docstring."""
    where = f"[train] init_from {directory!r}"
    manifest = read_manifest(directory)
    if manifest.backbone.name != backbone_name:
        raise ConfigError(f"{where} was trained on backbone {manifest.backbone.name!r}, but this run trains "
                          f"{backbone_name!r}; an adapter only fits the model it was trained on")
    check_backbone_options(manifest, backbone_name, backbone_options, registry)
    loaded = apply_checkpoint(backbone, directory, merge=False, trainable=True)
    model = loaded.model
    config = model.peft_config["default"]
    rank, alpha, dropout = int(config.r), float(config.lora_alpha), float(config.lora_dropout)
    for key, have in (("lora_rank", rank), ("lora_alpha", alpha), ("lora_dropout", dropout)):
        if key in train.model_fields_set and float(getattr(train, key)) != float(have):
            raise ConfigError(f"{where}: its adapter has {key} = {have:g}, but [train] sets {key} = "
                              f"{getattr(train, key):g}; a run continues the adapter it starts from: drop "
                              f"train.{key} or set it to {have:g}")
    trained = _trainable_rows(config, model)
    missing = sorted(set(int(i) for i in delimiter_ids) - trained)
    if missing:
        names = [n for n, i in backbone.layout.special.items() if i in missing]
        raise ConfigError(f"{where}: its adapter does not train the rows of {', '.join(names)}, which this run's "
                          "sequences use; start from a checkpoint trained for the same strategy, or from the "
                          "backbone (leave init_from unset)")
    return Start(model, manifest, Path(directory), rank, alpha, dropout)


def _trainable_rows(config: Any, model: Any) -> set[int]:
    """The input-embedding rows the adapter trains (peft ``trainable_token_indices``)."""
    indices = getattr(config, "trainable_token_indices", None)
    if not indices:
        return set()
    if isinstance(indices, dict):
        embedding = model.get_base_model().get_input_embeddings()
        names = {id(m): n for n, m in model.get_base_model().named_modules()}
        own = names.get(id(embedding), "")
        rows: set[int] = set()
        for name, ids in indices.items():
            if own == name or own.endswith("." + name):
                rows |= {int(i) for i in ids}
        return rows
    return {int(i) for i in indices}


def sync_reference_adapter(model: Any) -> None:
    """Make TRL's ``ref`` adapter an exact copy of ``default``, trainable-token rows included (module docstring)."""
    peft_config = getattr(model, "peft_config", None)
    if not peft_config or REFERENCE_ADAPTER not in peft_config:
        return
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, param in params.items():
            if name.endswith(".default"):
                twin = params.get(name[: -len(".default")] + f".{REFERENCE_ADAPTER}")
                if twin is not None:
                    twin.copy_(param)


def drop_reference_adapter(model: Any) -> None:
    """Remove TRL's frozen reference adapter, so that saving writes the trained adapter only."""
    peft_config = getattr(model, "peft_config", None)
    if peft_config and REFERENCE_ADAPTER in peft_config:
        model.delete_adapter(REFERENCE_ADAPTER)
        model.set_adapter("default")


__all__ = ["Start", "start_from", "start_identity", "sync_reference_adapter", "drop_reference_adapter", "REFERENCE_ADAPTER"]
