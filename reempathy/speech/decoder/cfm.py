"""Conditional flow matching inference: Euler steps from noise to mel, with classifier-free guidance.

The published schedule: ``n + 1`` times evenly spaced in [0, 1], bent by ``1 - cos(t·π/2)``
when ``t_scheduler`` is ``cosine`` (small steps first); ``t`` and the step are carried in
float32 exactly as the published loop does (``t += dt``; ``dt = t_span[k+1] - t``). At each
step the velocity is ``(1 + w)·v(x | mu, spk, cond) - w·v(x | 0, 0, 0)`` with ``w =
inference_cfg_rate`` (0.7). The conditional and unconditional estimates are computed in one
batch of two rows (the published code makes two calls; the results agree to float rounding).
"""

from __future__ import annotations

import torch

from reempathy.speech.decoder.estimator import Estimator


def time_schedule(n_steps: int, kind: str = "cosine", device: torch.device | str = "cpu") -> torch.Tensor:
    """The ``n_steps + 1`` flow times from 0 to 1 (float32)."""
    t = torch.linspace(0, 1, n_steps + 1, device=device)
    if kind == "cosine":
        t = 1 - torch.cos(t * 0.5 * torch.pi)
    return t


def solve_euler(
    estimator: Estimator,
    noise: torch.Tensor,
    t_span: torch.Tensor,
    mu: torch.Tensor,
    mask: torch.Tensor,
    spks: torch.Tensor,
    cond: torch.Tensor,
    cfg_rate: float,
) -> torch.Tensor:
    """Integrate the estimated velocity from ``noise`` (t = 0) to t = 1; returns the last sample."""
    x = noise
    t, dt = t_span[0], t_span[1] - t_span[0]
    guided = cfg_rate > 0
    if guided:
        mask2 = torch.cat([mask, mask])
        mu2 = torch.cat([mu, torch.zeros_like(mu)])
        spks2 = torch.cat([spks, torch.zeros_like(spks)])
        cond2 = torch.cat([cond, torch.zeros_like(cond)])
    for step in range(1, len(t_span)):
        if guided:
            both = estimator(torch.cat([x, x]), mask2, mu2, t, spks2, cond2)
            n = x.shape[0]
            v = (1.0 + cfg_rate) * both[:n] - cfg_rate * both[n:]
        else:
            v = estimator(x, mask, mu, t, spks, cond)
        x = x + dt * v
        t = t + dt
        if step < len(t_span) - 1:
            dt = t_span[step + 1] - t
    return x
