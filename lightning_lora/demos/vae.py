"""One training step of a demo base's VAE (the SD and LBM digit bases train theirs as a codec first)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def vae_step(vae: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Encode ``x``, decode a latent sampled with ``g``, and step on L1 reconstruction + 1e-4·KL; returns the loss."""
    dist = vae.encode(x).latent_dist
    recon = vae.decode(dist.mean + dist.std * torch.randn(dist.mean.shape, generator=g)).sample
    kl = 0.5 * (dist.mean.pow(2) + dist.var - 1.0 - dist.logvar).mean()
    loss = F.l1_loss(recon, x) + 1e-4 * kl
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss
