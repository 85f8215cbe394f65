"""Mel → waveform: the HiFT vocoder (neural source filter + iSTFT head), as published in CosyVoice.

- An F0 predictor (five convolutions, a linear layer, absolute value) gives one pitch per frame.
- The source: the pitch is repeated to the sample rate and turned into a fundamental plus
  ``nb_harmonics`` overtones, each with a random starting phase (the fundamental's is 0), silenced
  where the pitch is below ``nsf_voiced_threshold`` and mixed with Gaussian noise; a linear layer
  and tanh merge them into one excitation signal.
- The mel is upsampled by transposed convolutions (8 × 8); at each stage the STFT of the
  excitation is downsampled and added; multi-receptive-field ResNet blocks with Snake
  activations follow. The head predicts an ``n_fft``-point spectrum (log-magnitude, phase)
  which an iSTFT with hop ``hop_len`` turns into ``upsample × hop`` = 256 samples per frame.

Random draws, in the published order: the harmonic phases (``torch.rand`` on the CPU, as the
published ``Uniform`` distribution draws them there), then the source noise (on the device).
Weight normalisation is folded into plain weights when loading. Parameter names follow ``hift.pt``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from reempathy.speech.decoder.config import HiftConfig


def is_weight_normed(name: str) -> bool:
    """Whether the published vocoder wraps parameter ``name``'s layer in weight normalisation."""
    layer = name.rsplit(".", 1)[0]
    return name.endswith(".weight") and (
        layer in ("conv_pre", "conv_post")
        or layer.startswith("ups.")
        or ".convs1." in f".{layer}."
        or ".convs2." in f".{layer}."
        or layer.startswith("f0_predictor.condnet.")
    )


def get_padding(kernel: int, dilation: int = 1) -> int:
    return int((kernel * dilation - dilation) / 2)


class Snake(nn.Module):
    """``x + sin²(αx) / α`` per channel."""

    def __init__(self, channels: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        alpha = self.alpha.unsqueeze(0).unsqueeze(-1)
        return x + (1.0 / (alpha + 1e-9)) * torch.pow(torch.sin(x * alpha), 2)


class ResBlock(nn.Module):
    def __init__(self, channels: int, kernel: int, dilations: tuple[int, ...]):
        super().__init__()
        self.convs1 = nn.ModuleList(
            nn.Conv1d(channels, channels, kernel, 1, dilation=d, padding=get_padding(kernel, d)) for d in dilations
        )
        self.convs2 = nn.ModuleList(
            nn.Conv1d(channels, channels, kernel, 1, dilation=1, padding=get_padding(kernel, 1)) for _ in dilations
        )
        self.activations1 = nn.ModuleList(Snake(channels) for _ in dilations)
        self.activations2 = nn.ModuleList(Snake(channels) for _ in dilations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for c1, c2, a1, a2 in zip(self.convs1, self.convs2, self.activations1, self.activations2, strict=False):
            x = c2(a2(c1(a1(x)))) + x
        return x


class F0Predictor(nn.Module):
    """Mel ``(B, mels, T)`` → pitch ``(B, T)`` in Hz."""

    def __init__(self, in_channels: int, cond_channels: int):
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(5):
            layers += [nn.Conv1d(in_channels if i == 0 else cond_channels, cond_channels, 3, padding=1), nn.ELU()]
        self.condnet = nn.Sequential(*layers)
        self.classifier = nn.Linear(cond_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.abs(self.classifier(self.condnet(x).transpose(1, 2)).squeeze(-1))


class SourceModule(nn.Module):
    """Pitch at the sample rate ``(B, 1, L)`` → excitation ``(B, 1, L)``."""

    def __init__(self, cfg: HiftConfig):
        super().__init__()
        self.cfg = cfg
        self.l_linear = nn.Linear(cfg.nb_harmonics + 1, 1)

    def sine_waves(self, f0: torch.Tensor, cpu_generator: torch.Generator, generator: torch.Generator) -> torch.Tensor:
        cfg = self.cfg
        b, length = f0.shape[0], f0.shape[-1]
        harmonics = torch.zeros(b, cfg.nb_harmonics + 1, length, device=f0.device)
        for i in range(cfg.nb_harmonics + 1):
            harmonics[:, i : i + 1, :] = f0 * (i + 1) / cfg.sampling_rate
        theta = 2 * math.pi * (torch.cumsum(harmonics, dim=-1) % 1)
        low, high = torch.tensor(-math.pi), torch.tensor(math.pi)
        phase = low + torch.rand(b, cfg.nb_harmonics + 1, 1, generator=cpu_generator) * (high - low)
        phase = phase.to(f0.device)
        phase[:, 0, :] = 0
        waves = cfg.nsf_alpha * torch.sin(theta + phase)
        uv = (f0 > cfg.nsf_voiced_threshold).type(torch.float32)
        noise_amp = uv * cfg.nsf_sigma + (1 - uv) * cfg.nsf_alpha / 3
        noise = noise_amp * torch.randn(waves.shape, generator=generator, device=waves.device, dtype=waves.dtype)
        return waves * uv + noise

    def forward(self, f0: torch.Tensor, cpu_generator: torch.Generator, generator: torch.Generator) -> torch.Tensor:
        waves = self.sine_waves(f0, cpu_generator, generator).transpose(1, 2)
        return torch.tanh(self.l_linear(waves)).transpose(1, 2)


class HiFT(nn.Module):
    """The vocoder; ``forward(mel, ...)`` → (waveform ``(B, 256·T)``, excitation ``(B, 1, 256·T)``)."""

    def __init__(self, cfg: HiftConfig):
        super().__init__()
        self.cfg = cfg
        base = cfg.base_channels
        self.m_source = SourceModule(cfg)
        self.conv_pre = nn.Conv1d(cfg.in_channels, base, 7, 1, padding=3)
        self.ups = nn.ModuleList(
            nn.ConvTranspose1d(base // 2**i, base // 2 ** (i + 1), k, u, padding=(k - u) // 2)
            for i, (u, k) in enumerate(zip(cfg.upsample_rates, cfg.upsample_kernel_sizes, strict=False))
        )
        self.source_downs = nn.ModuleList()
        self.source_resblocks = nn.ModuleList()
        rates = [1] + list(cfg.upsample_rates[::-1][:-1])
        cumulative = [math.prod(rates[: i + 1]) for i in range(len(rates))]
        spec = cfg.n_fft + 2
        for i, (u, k, d) in enumerate(
            zip(cumulative[::-1], cfg.source_resblock_kernel_sizes, cfg.source_resblock_dilation_sizes, strict=False)
        ):
            ch = base // 2 ** (i + 1)
            self.source_downs.append(
                nn.Conv1d(spec, ch, 1, 1) if u == 1 else nn.Conv1d(spec, ch, u * 2, u, padding=u // 2)
            )
            self.source_resblocks.append(ResBlock(ch, k, d))
        self.resblocks = nn.ModuleList()
        for i in range(len(self.ups)):
            ch = base // 2 ** (i + 1)
            for k, d in zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes, strict=False):
                self.resblocks.append(ResBlock(ch, k, d))
        self.conv_post = nn.Conv1d(ch, spec, 7, 1, padding=3)
        self.f0_predictor = F0Predictor(cfg.f0_in_channels, cfg.f0_cond_channels)

    def window(self, device: torch.device) -> torch.Tensor:
        """scipy's periodic Hann window, computed in float64 and used as float32, as published."""
        n = torch.arange(self.cfg.n_fft, dtype=torch.float64)
        return (0.5 - 0.5 * torch.cos(2 * math.pi * n / self.cfg.n_fft)).float().to(device)

    def _stft(self, x: torch.Tensor) -> torch.Tensor:
        n = self.cfg.n_fft
        spec = torch.stft(x, n, self.cfg.hop_len, n, window=self.window(x.device), return_complex=True)
        spec = torch.view_as_real(spec)
        return torch.cat([spec[..., 0], spec[..., 1]], dim=1)

    def _istft(self, magnitude: torch.Tensor, phase: torch.Tensor) -> torch.Tensor:
        magnitude = torch.clip(magnitude, max=1e2)
        spec = torch.complex(magnitude * torch.cos(phase), magnitude * torch.sin(phase))
        n = self.cfg.n_fft
        return torch.istft(spec, n, self.cfg.hop_len, n, window=self.window(magnitude.device))

    @torch.inference_mode()
    def forward(
        self,
        mel: torch.Tensor,
        cpu_generator: torch.Generator,
        generator: torch.Generator,
        cache_source: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        f0 = self.f0_predictor(mel)
        f0 = F.interpolate(f0[:, None], scale_factor=float(cfg.samples_per_frame), mode="nearest")
        source = self.m_source(f0, cpu_generator, generator)
        if cache_source is not None and cache_source.shape[2]:
            source[:, :, : cache_source.shape[2]] = cache_source  # continue the previous chunk's excitation
        s_stft = self._stft(source.squeeze(1))
        x = self.conv_pre(mel)
        kernels = len(cfg.resblock_kernel_sizes)
        for i, up in enumerate(self.ups):
            x = up(F.leaky_relu(x, cfg.lrelu_slope))
            if i == len(self.ups) - 1:
                x = F.pad(x, (1, 0), mode="reflect")
            x = x + self.source_resblocks[i](self.source_downs[i](s_stft))
            xs = None
            for j in range(kernels):
                y = self.resblocks[i * kernels + j](x)
                xs = y if xs is None else xs + y
            x = xs / kernels
        x = self.conv_post(F.leaky_relu(x))
        half = cfg.n_fft // 2 + 1
        wave = self._istft(torch.exp(x[:, :half, :]), torch.sin(x[:, half:, :]))
        return torch.clamp(wave, -cfg.audio_limit, cfg.audio_limit), source
