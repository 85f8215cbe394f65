"""The GLM-4-Voice speech tokenizer network: Whisper's encoder up to the quantizer.

What the published ``WhisperVQEncoder`` adds to Whisper's encoder, and all this module computes:

- convolutions that pad only on the left (``encoder_causal_convolution``), so a frame never
  sees the future;
- a block-causal attention mask: a query attends to every earlier frame and to every frame of
  its own block (``quantize_causal_block_size`` frames; after pooling, that size divided by the
  pooling kernel), never to padding;
- pooling (average or max, kernel ``pooling_kernel_size``) after layer ``pooling_position``;
- nearest-codebook quantization after layer ``quantize_position``: the unit id of a pooled frame
  is the index of the closest codebook row (squared Euclidean distance).

Layers past ``quantize_position`` and the final layer norm do not change the ids and are not built.
The encoder layers are transformers' ``WhisperEncoderLayer`` (same parameter names as the checkpoint).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import WhisperConfig
from transformers.models.whisper.modeling_whisper import WhisperEncoderLayer

from reempathy.speech.tokenizer.config import VQEncoderConfig

CODE_CHUNK = 4096  # pooled frames per distance matrix, to bound memory on long inputs


class CausalConv1d(nn.Conv1d):
    """A 1-D convolution padded ``dilation * (kernel - 1)`` on the left only."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, dilation: int = 1):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, dilation=dilation)
        self.left_padding = dilation * (kernel_size - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(nn.functional.pad(x, (self.left_padding, 0)))


def block_causal_allowed(valid: torch.Tensor, block_size: int) -> torch.Tensor:
    """``(B, T, T)`` bool: query ``i`` may see key ``j`` if ``j <= i`` or both lie in one block, and ``j`` is valid."""
    t = valid.shape[-1]
    pos = torch.arange(t, device=valid.device)
    causal = pos[None, :] <= pos[:, None]
    same_block = (pos[None, :] // block_size) == (pos[:, None] // block_size)
    return (causal | same_block)[None] & valid[:, None, :].bool()


def padding_allowed(valid: torch.Tensor) -> torch.Tensor:
    """``(B, T, T)`` bool: every query may see every valid key (Whisper's plain padding mask)."""
    t = valid.shape[-1]
    return valid[:, None, :].bool().expand(-1, t, t)


def causal_allowed(batch: int, t: int, device: torch.device) -> torch.Tensor:
    """``(B, T, T)`` bool lower-triangular mask; padding is not masked (as in the published causal layers)."""
    return torch.ones(t, t, dtype=torch.bool, device=device).tril()[None].expand(batch, t, t)


def additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``(B, 1, T, T)`` additive mask: 0 where allowed, the dtype's most negative value elsewhere."""
    return ((1.0 - allowed.to(dtype)) * torch.finfo(dtype).min)[:, None]


def pool_frames(
    h: torch.Tensor, valid: torch.Tensor, pooling: nn.Module, kernel: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pool ``h`` ``(B, T, D)`` over time in groups of ``kernel`` (zero-padded at the end); subsample the mask alike."""
    h = h.transpose(1, 2)
    if h.shape[-1] % kernel:
        h = nn.functional.pad(h, (0, kernel - h.shape[-1] % kernel))
    return pooling(h).transpose(1, 2), valid[:, ::kernel]


def nearest_codes(x: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the nearest codebook row for each vector in ``x`` (``(..., D)`` → ``(...)``).

    Distances are ``|c|² + |x|² - 2 x·c`` in one ``addmm``, the published formula, so that near
    ties resolve the same way.
    """
    flat = x.reshape(-1, x.shape[-1])
    c_sqr = codebook.pow(2).sum(dim=1)
    out = torch.empty(flat.shape[0], dtype=torch.long, device=x.device)
    for start in range(0, flat.shape[0], CODE_CHUNK):
        rows = flat[start : start + CODE_CHUNK]
        dist = torch.addmm(c_sqr + rows.pow(2).sum(dim=1, keepdim=True), rows, codebook.t(), alpha=-2.0, beta=1.0)
        out[start : start + CODE_CHUNK] = dist.argmin(dim=1)
    return out.reshape(x.shape[:-1])


class VQEncoder(nn.Module):
    """Log-mel features → unit ids. Parameter names follow the published checkpoint (minus ``model.encoder.``)."""

    def __init__(self, cfg: VQEncoderConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        if cfg.encoder_causal_convolution:
            self.conv1: nn.Conv1d = CausalConv1d(cfg.num_mel_bins, d, 3)
            self.conv2: nn.Conv1d = CausalConv1d(d, d, 3, stride=2)
        else:
            self.conv1 = nn.Conv1d(cfg.num_mel_bins, d, 3, padding=1)
            self.conv2 = nn.Conv1d(d, d, 3, stride=2, padding=1)
        self.embed_positions = nn.Embedding(cfg.max_source_positions, d)
        wcfg = WhisperConfig(
            d_model=d,
            encoder_attention_heads=cfg.encoder_attention_heads,
            encoder_ffn_dim=cfg.encoder_ffn_dim,
            activation_function=cfg.activation_function,
            dropout=0.0,
            attention_dropout=0.0,
            activation_dropout=0.0,
        )
        wcfg._attn_implementation = "sdpa"
        self.layers = nn.ModuleList(WhisperEncoderLayer(wcfg) for _ in range(cfg.quantize_position))
        self.pooling: nn.Module | None = None
        if cfg.pooling_kernel_size is not None:
            pool = nn.AvgPool1d if cfg.pooling_type == "avg" else nn.MaxPool1d
            self.pooling = pool(cfg.pooling_kernel_size)
        self.codebook = nn.Embedding(cfg.quantize_vocab_size, d)

    @property
    def frame_stride(self) -> int:
        """Mel frames per encoder position (the two convolutions' strides)."""
        return self.conv1.stride[0] * self.conv2.stride[0]

    def attention_allowed(self, valid: torch.Tensor, pooled: bool) -> torch.Tensor:
        """The non-causal layers' ``(B, T, T)`` mask: block-causal if configured, else padding only."""
        block = self.cfg.quantize_causal_block_size
        if block is None:
            return padding_allowed(valid)
        return block_causal_allowed(valid, block // self.cfg.pool if pooled else block)

    @torch.inference_mode()
    def forward(self, features: torch.Tensor, frame_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``features`` ``(B, mels, frames)`` and ``frame_mask`` ``(B, frames)`` → ids ``(B, T)`` and their mask."""
        cfg = self.cfg
        valid = frame_mask[:, :: self.frame_stride]
        h = nn.functional.gelu(self.conv1(features))
        h = nn.functional.gelu(self.conv2(h)).transpose(1, 2)
        if h.shape[1] > cfg.max_source_positions:
            raise ValueError(f"{h.shape[1]} encoder positions exceed max_source_positions {cfg.max_source_positions}")
        h = h + self.embed_positions.weight[: h.shape[1]]
        dtype = h.dtype
        masks = self._masks(valid, pooled=False, dtype=dtype)
        for index, layer in enumerate(self.layers):
            h = layer(h, masks[self.cfg.layer_is_causal(index)])
            if self.pooling is not None and index + 1 == cfg.pooling_position:
                h, valid = pool_frames(h, valid, self.pooling, cfg.pool)
                masks = self._masks(valid, pooled=True, dtype=dtype)
        return nearest_codes(h, self.codebook.weight), valid.bool()

    def _masks(self, valid: torch.Tensor, pooled: bool, dtype: torch.dtype) -> dict[bool, torch.Tensor]:
        b, t = valid.shape
        masks = {False: additive(self.attention_allowed(valid, pooled), dtype)}
        if any(self.cfg.layer_is_causal(i) for i in range(len(self.layers))):
            masks[True] = additive(causal_allowed(b, t, valid.device), dtype)
        return masks
