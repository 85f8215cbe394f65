"""The flow's encoder over unit embeddings: a conformer without convolution or macaron modules.

Each layer is pre-norm self-attention with relative positions (Transformer-XL style: content
bias ``u``, position bias ``v``, ESPnet's relative-position table and shift) followed by a
pre-norm feed-forward block. In the published decoder the attention is block-causal: unit ``i``
sees every earlier unit and the rest of its own block of ``block_size`` units, which is what
lets the decoder start speaking after a few units. Parameter names follow ``flow.pt``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from reempathy.speech.decoder.config import EncoderConfig

_ACTIVATIONS = {"swish": nn.SiLU, "relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}


def block_causal_grid(length: int, block_size: int, device: torch.device | None = None) -> torch.Tensor:
    """``(T, T)`` bool: query ``i`` sees key ``j`` if ``j <= i`` or ``j`` lies in ``i``'s block."""
    pos = torch.arange(length, device=device)
    return (pos[None, :] <= pos[:, None]) | ((pos[None, :] // block_size) == (pos[:, None] // block_size))


def relative_positions(length: int, d_model: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``(1, 2T-1, D)`` sinusoidal table for relative distances ``T-1 … -(T-1)`` (ESPnet's layout)."""
    position = torch.arange(length, dtype=torch.float32).unsqueeze(1)
    div = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * -(math.log(10000.0) / d_model))
    pos = torch.zeros(length, d_model)
    neg = torch.zeros(length, d_model)
    pos[:, 0::2] = torch.sin(position * div)
    pos[:, 1::2] = torch.cos(position * div)
    neg[:, 0::2] = torch.sin(-1 * position * div)
    neg[:, 1::2] = torch.cos(-1 * position * div)
    table = torch.cat([torch.flip(pos, [0]), neg[1:]], dim=0)
    return table.unsqueeze(0).to(device=device, dtype=dtype)


def shift_relative(scores: torch.Tensor) -> torch.Tensor:
    """``(B, H, T, 2T-1)`` scores over relative distances → ``(B, H, T, T)`` over key positions."""
    b, h, t, n = scores.shape
    padded = torch.cat([scores.new_zeros(b, h, t, 1), scores], dim=-1).view(b, h, n + 1, t)
    return padded[:, :, 1:].view(b, h, t, n)[:, :, :, : n // 2 + 1]


class RelPositionAttention(nn.Module):
    """Multi-head self-attention with relative positions; ``allowed`` ``(B, T, T)`` masks keys."""

    def __init__(self, heads: int, dim: int, key_bias: bool = True):
        super().__init__()
        self.h, self.d_k = heads, dim // heads
        self.linear_q = nn.Linear(dim, dim)
        self.linear_k = nn.Linear(dim, dim, bias=key_bias)
        self.linear_v = nn.Linear(dim, dim)
        self.linear_out = nn.Linear(dim, dim)
        self.linear_pos = nn.Linear(dim, dim, bias=False)
        self.pos_bias_u = nn.Parameter(torch.zeros(self.h, self.d_k))
        self.pos_bias_v = nn.Parameter(torch.zeros(self.h, self.d_k))

    def forward(self, x: torch.Tensor, allowed: torch.Tensor, pos_emb: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.linear_q(x).view(b, t, self.h, self.d_k)
        k = self.linear_k(x).view(b, t, self.h, self.d_k).transpose(1, 2)
        v = self.linear_v(x).view(b, t, self.h, self.d_k).transpose(1, 2)
        p = self.linear_pos(pos_emb).view(pos_emb.shape[0], -1, self.h, self.d_k).transpose(1, 2)
        content = torch.matmul((q + self.pos_bias_u).transpose(1, 2), k.transpose(-2, -1))
        position = torch.matmul((q + self.pos_bias_v).transpose(1, 2), p.transpose(-2, -1))
        if position.shape != content.shape:
            position = shift_relative(position)
        scores = (content + position) / math.sqrt(self.d_k)
        blocked = ~allowed.unsqueeze(1)
        attn = torch.softmax(scores.masked_fill(blocked, -float("inf")), dim=-1).masked_fill(blocked, 0.0)
        out = torch.matmul(attn, v).transpose(1, 2).reshape(b, t, self.h * self.d_k)
        return self.linear_out(out)


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int, activation: str):
        super().__init__()
        self.w_1 = nn.Linear(dim, hidden)
        self.activation = _ACTIVATIONS[activation]()
        self.w_2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_2(self.activation(self.w_1(x)))


class ConformerLayer(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        d = cfg.output_size
        self.self_attn = RelPositionAttention(cfg.attention_heads, d, cfg.key_bias)
        self.feed_forward = FeedForward(d, cfg.linear_units, cfg.activation_type)
        self.norm_ff = nn.LayerNorm(d, eps=1e-5)
        self.norm_mha = nn.LayerNorm(d, eps=1e-5)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor, pos_emb: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.norm_mha(x), allowed, pos_emb)
        return x + self.feed_forward(self.norm_ff(x))


class LinearEmbed(nn.Module):
    """Linear + LayerNorm input layer (``embed.out.0`` / ``embed.out.1`` in the checkpoint)."""

    def __init__(self, idim: int, odim: int):
        super().__init__()
        self.out = nn.Sequential(nn.Linear(idim, odim), nn.LayerNorm(odim, eps=1e-5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(x)


class FlowEncoder(nn.Module):
    """Unit embeddings ``(B, T, input_size)`` → ``(B, T, output_size)``."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = LinearEmbed(cfg.input_size, cfg.output_size)
        self.encoders = nn.ModuleList(ConformerLayer(cfg) for _ in range(cfg.num_blocks))
        self.after_norm = nn.LayerNorm(cfg.output_size, eps=1e-5)

    def allowed(self, lengths: torch.Tensor, t: int) -> torch.Tensor:
        """``(B, T, T)`` attention mask: valid keys, block-causal if configured."""
        valid = torch.arange(t, device=lengths.device)[None, :] < lengths[:, None]
        allowed = valid[:, None, :].expand(-1, t, t)
        if self.cfg.block_size is not None:
            allowed = allowed & block_causal_grid(t, self.cfg.block_size, lengths.device)[None]
        return allowed

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        x = self.embed(x) * math.sqrt(self.cfg.output_size)
        pos_emb = relative_positions(t, self.cfg.output_size, x.device, x.dtype)
        allowed = self.allowed(lengths, t)
        for layer in self.encoders:
            x = layer(x, allowed, pos_emb)
        return self.after_norm(x)
