"""Decoder weight files: ``flow.pt`` / ``hift.pt`` (read with ``weights_only=True``) or their safetensors copies.

``convert_decoder_weights`` writes ``flow.safetensors`` and ``hift.safetensors`` beside the
``.pt`` files once, with the same tensor names; loading prefers them when present. Weight
normalisation (``*.weight_g`` / ``*.weight_v``, or the newer ``parametrizations.weight.original0/1``)
is folded into a plain ``weight`` as ``g · v / ‖v‖`` (norm over all but the first dimension),
the value the published modules compute on every call.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from reempathy.errors import CheckpointError
from reempathy.safe_write import check_output_file, write_with

PARTS = ("flow", "hift")


def weight_path(directory: Path, part: str) -> Path:
    """``part.safetensors`` if present, else ``part.pt``; ``CheckpointError`` if neither exists."""
    st, pt = directory / f"{part}.safetensors", directory / f"{part}.pt"
    if st.is_file():
        return st
    if pt.is_file():
        return pt
    raise CheckpointError(f"{pt} is missing; pass the glm-4-voice-decoder directory (config.yaml, flow.pt, hift.pt)")


def read_state(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of one weight file, on the CPU, never unpickling arbitrary objects."""
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except (SafetensorError, pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError) as e:
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"{path} cannot be read as a plain tensor state dict ({first}); re-download it") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors; it is not a decoder weight file")
    return dict(state)


def fold_weight_norm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Replace every weight-normalised pair by its plain ``weight``."""
    out = dict(state)
    for g_name, v_name in (
        ("weight_g", "weight_v"),
        ("parametrizations.weight.original0", "parametrizations.weight.original1"),
    ):
        for key in [k for k in state if k == g_name or k.endswith("." + g_name)]:
            stem = key[: -len(g_name)]  # "" or "layer.name."
            g, v = out.pop(key), out.pop(stem + v_name, None)
            if v is None:
                raise CheckpointError(f"weight-normalised {stem or 'weight'} has its magnitude but no direction tensor")
            out[stem + "weight"] = torch._weight_norm(v.float(), g.float(), 0)
    return out


def load_into(module: nn.Module, directory: Path, part: str, device: torch.device) -> nn.Module:
    """Fill ``module`` (built on the meta device) from ``directory``'s ``part`` weights; every name must match."""
    path = weight_path(directory, part)
    state = fold_weight_norm(read_state(path))
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        detail = f"lacks {missing[:3]}" if missing else f"has unknown tensors {unexpected[:3]}"
        raise CheckpointError(
            f"{path} {detail} ({len(missing)} missing, {len(unexpected)} unknown); "
            "the weights and config.yaml do not belong together"
        )
    for key, tensor in state.items():
        if tensor.shape != expected[key].shape:
            raise CheckpointError(
                f"{path}: tensor {key} has shape {tuple(tensor.shape)}, config.yaml implies "
                f"{tuple(expected[key].shape)}; the weights and config.yaml do not belong together"
            )
    module.load_state_dict({k: v.to(device=device, dtype=torch.float32) for k, v in state.items()}, assign=True)
    return module.eval()


def convert_decoder_weights(directory: str | Path, overwrite: bool = False) -> list[Path]:
    """Write ``flow.safetensors`` and ``hift.safetensors`` next to the ``.pt`` files (same tensor names)."""
    directory = Path(directory).expanduser()
    written = []
    for part in PARTS:
        pt, st = directory / f"{part}.pt", directory / f"{part}.safetensors"
        if not pt.is_file():
            raise CheckpointError(f"{pt} is missing; nothing to convert")
        if st.exists() and not overwrite:
            raise CheckpointError(f"{st} already exists; pass --overwrite to replace it")
        check_output_file(st, "converted decoder weights", CheckpointError)
        state = {k: v.contiguous() for k, v in read_state(pt).items()}
        write_with(st, lambda tmp: save_file(state, str(tmp), metadata={"format": "pt", "source": pt.name}),
                   "converted decoder weights", CheckpointError)
        written.append(st)
    return written
