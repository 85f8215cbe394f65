"""Units → mel spectrogram (80 bins at 22050/256 frames per second), as the published ``MaskedDiffWithXvec``.

1. Units (prompt units first, when streaming) are embedded and encoded (block-causal conformer),
   then projected to the mel width.
2. Length regulation: the mel length is ``int(units / input_frame_rate * 22050 / 256)``
   (float32, truncated); the encoder output is stretched to it by nearest-neighbour
   interpolation and smoothed by a small convolution stack.
3. The speaker vector is the affine layer applied to a normalised all-zero embedding (the
   published decoder is used without a speaker prompt), i.e. the layer's bias.
4. Conditional flow matching from Gaussian noise, 10 Euler steps, guidance 0.7; the prompt mel
   (when streaming) conditions the first frames and is cut from the output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from reempathy.speech.decoder.cfm import solve_euler, time_schedule
from reempathy.speech.decoder.config import FlowConfig
from reempathy.speech.decoder.conformer import FlowEncoder
from reempathy.speech.decoder.estimator import Estimator


def mel_frames(units: int, input_frame_rate: float) -> int:
    """Mel frames for ``units`` units, computed in float32 and truncated as the published code does."""
    n = torch.tensor([units], dtype=torch.int32)
    return int((n / input_frame_rate * 22050 / 256).int().item())


class LengthRegulator(nn.Module):
    """Stretch ``(B, T, C)`` to ``frames`` by nearest-neighbour interpolation, then Conv → GroupNorm → Mish stacks."""

    def __init__(self, channels: int, ratios: tuple[int, ...], groups: int = 1):
        super().__init__()
        layers: list[nn.Module] = []
        for _ in ratios:
            layers += [nn.Conv1d(channels, channels, 3, 1, 1), nn.GroupNorm(groups, channels), nn.Mish()]
        layers.append(nn.Conv1d(channels, channels, 1, 1))
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, frames: int) -> torch.Tensor:
        x = F.interpolate(x.transpose(1, 2).contiguous(), size=frames, mode="nearest")
        return self.model(x).transpose(1, 2).contiguous()


class ConditionalFlow(nn.Module):
    """Holds the estimator under the checkpoint's name (``decoder.estimator.*``)."""

    def __init__(self, estimator: Estimator):
        super().__init__()
        self.estimator = estimator


class Flow(nn.Module):
    """The published flow's inference path; parameter names follow ``flow.pt``."""

    def __init__(self, cfg: FlowConfig):
        super().__init__()
        self.cfg = cfg
        # _weight skips the random init (the weights are loaded; on the meta device init is not free).
        self.input_embedding = nn.Embedding(
            cfg.vocab_size, cfg.input_size, _weight=torch.empty(cfg.vocab_size, cfg.input_size)
        )
        self.spk_embed_affine_layer = nn.Linear(cfg.spk_embed_dim, cfg.output_size)
        self.encoder = FlowEncoder(cfg.encoder)
        self.encoder_proj = nn.Linear(cfg.encoder.output_size, cfg.output_size)
        self.length_regulator = LengthRegulator(cfg.regulator_channels, cfg.regulator_ratios, cfg.regulator_groups)
        self.decoder = ConditionalFlow(Estimator(cfg.estimator))

    @torch.inference_mode()
    def inference(
        self,
        units: torch.Tensor,
        generator: torch.Generator,
        prompt_units: torch.Tensor | None = None,
        prompt_mel: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``units`` ``(1, T)`` → mel ``(1, mels, frames)``; ``prompt_mel`` ``(1, frames_p, mels)`` is cut off.

        ``generator`` gives the starting noise; it must live on the module's device.
        """
        cfg = self.cfg
        if prompt_units is not None and prompt_units.shape[1]:
            units = torch.cat([prompt_units.to(units), units], dim=1)
        device = self.input_embedding.weight.device
        dtype = self.input_embedding.weight.dtype
        spks = self.spk_embed_affine_layer(
            F.normalize(torch.zeros(1, cfg.spk_embed_dim, device=device, dtype=dtype), dim=1)
        )
        lengths = torch.tensor([units.shape[1]], device=device)
        h = self.encoder(self.input_embedding(units.clamp(min=0)), lengths)
        h = self.encoder_proj(h)
        frames = mel_frames(units.shape[1], cfg.input_frame_rate)
        mu = self.length_regulator(h, frames).transpose(1, 2).contiguous()
        cond = torch.zeros(1, frames, cfg.output_size, device=device, dtype=dtype)
        n_prompt = 0 if prompt_mel is None else prompt_mel.shape[1]
        if n_prompt:
            cond[:, :n_prompt] = prompt_mel[:, :frames]
        cond = cond.transpose(1, 2)
        mask = torch.ones(1, 1, frames, device=device, dtype=dtype)
        noise = torch.randn(mu.shape, generator=generator, device=device, dtype=dtype)
        t_span = time_schedule(cfg.n_timesteps, cfg.t_scheduler, device)
        mel = solve_euler(self.decoder.estimator, noise, t_span, mu, mask, spks, cond, cfg.inference_cfg_rate)
        return mel[:, :, n_prompt:]
