"""Flow matching as the reference trainers do it (diffusers' train_dreambooth_lora_{flux,sd3,qwen_image,flux2,
z_image}.py, kohya's and SimpleTuner's shift options), for the diffusion-transformer families.

A step: latents x0, noise n, a noise level sigma in (0, 1] per sample, the noisy input
x_t = (1 - sigma) * x0 + sigma * n and the velocity target n - x0. Sigma comes from u in [0, 1) drawn by
`weighting_scheme` (uniform, logit-normal, mode), put on the scheduler's grid of num_train_timesteps levels
(sigma = 1 - floor(u * N) / N, so u = 0 is pure noise), then shifted: statically as the scheduler config's
`shift` says (or `timestep_shift`), or by image size as the scheduler does at inference (`resolution_shift`).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch

from ..adapters import autocast
from ..distributed import BatchRandom
from .base import Conditioning, ModelFamily, sample_posterior

# the scheduler config's resolution-dependent shift, where a config leaves them out (FluxPipeline's defaults)
DYNAMIC_SHIFT_DEFAULTS = {"base_image_seq_len": 256, "max_image_seq_len": 4096, "base_shift": 0.5, "max_shift": 1.15}


def sample_u(scheme: str, cfg, draws: BatchRandom) -> torch.Tensor:
    """u in [0, 1] for each sample, as diffusers' compute_density_for_timestep_sampling draws it."""
    from diffusers.training_utils import compute_density_for_timestep_sampling

    u = compute_density_for_timestep_sampling(
        scheme,
        draws.total,
        logit_mean=cfg.logit_mean,
        logit_std=cfg.logit_std,
        mode_scale=cfg.mode_scale,
        device=draws.device,
        generator=draws.generator,
    )
    return draws.cut(u)  # drawn for the whole global batch, as every draw is


def grid_sigmas(u: torch.Tensor, num_train_timesteps: int) -> torch.Tensor:
    """The scheduler's training grid: index floor(u * N) (clamped: u can be exactly 1) counts down from 1."""
    index = (u * num_train_timesteps).long().clamp(0, num_train_timesteps - 1)
    return (num_train_timesteps - index).float() / num_train_timesteps


def static_shift(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def resolution_mu(image_seq_len: int, config: dict[str, Any]) -> float:
    """diffusers' calculate_shift: mu linear in the number of image tokens, between the config's two points."""
    c = {**DYNAMIC_SHIFT_DEFAULTS, **{k: v for k, v in config.items() if k in DYNAMIC_SHIFT_DEFAULTS and v is not None}}
    slope = (c["max_shift"] - c["base_shift"]) / (c["max_image_seq_len"] - c["base_image_seq_len"])
    return image_seq_len * slope + c["base_shift"] - slope * c["base_image_seq_len"]


def dynamic_shift(sigmas: torch.Tensor, mu: float, kind: str = "exponential") -> torch.Tensor:
    """The scheduler's time_shift at inference: exponential (FLUX) or linear."""
    scale = math.exp(mu) if kind == "exponential" else mu
    return scale / (scale + (1 / sigmas - 1))


class FlowMatchingFamily(ModelFamily):
    """The velocity objective of the diffusion transformers; subclasses say how latents are normalized and
    how the transformer is called (packing, ids, guidance, timestep convention)."""

    default_weighting: ClassVar[str] = "none"
    posterior_mode: ClassVar[bool] = False  # FLUX.2 and Z-Image train on the VAE's mean, not a sample

    # -- latents
    def latents(self, params: torch.Tensor, draws: BatchRandom) -> torch.Tensor:
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        dist = DiagonalGaussianDistribution(params.to(self.device))
        raw = dist.mode() if self.posterior_mode else sample_posterior(dist, draws)
        return self.normalize(raw.float())

    def normalize(self, latents: torch.Tensor) -> torch.Tensor:
        """The VAE's latents as the transformer sees them: (z - shift_factor) * scaling_factor by default."""
        config = self.parts.vae.config
        return (latents - (config.shift_factor or 0.0)) * config.scaling_factor

    # -- noise levels
    @property
    def weighting_scheme(self) -> str:
        return self.cfg.weighting_scheme or self.default_weighting

    def sample_sigmas(self, latents: torch.Tensor, draws: BatchRandom) -> torch.Tensor:
        """(B,) noise levels in (0, 1]."""
        config = self.parts.scheduler.config
        sigmas = grid_sigmas(sample_u(self.weighting_scheme, self.cfg, draws), config.num_train_timesteps)
        if self.cfg.resolution_shift:
            mu = resolution_mu(self.image_seq_len(latents), dict(config))
            return dynamic_shift(sigmas, mu, config.get("time_shift_type", "exponential"))
        shift = self.cfg.timestep_shift or (None if config.get("use_dynamic_shifting") else config.get("shift"))
        return static_shift(sigmas, shift) if shift and shift != 1.0 else sigmas

    def image_seq_len(self, latents: torch.Tensor) -> int:
        """Image tokens the transformer sees: 2x2 latent patches."""
        return (latents.shape[-2] // 2) * (latents.shape[-1] // 2)

    # -- the objective
    def loss(
        self, latents: torch.Tensor, cond: Conditioning, batch: dict[str, Any], draws: BatchRandom
    ) -> torch.Tensor:
        from diffusers.training_utils import compute_loss_weighting_for_sd3

        noise = draws.randn(tuple(latents.shape[1:])).to(latents.device)
        sigmas = self.sample_sigmas(latents, draws).to(latents.device)  # (B,)
        s = sigmas.view(-1, *[1] * (latents.dim() - 1))
        noisy = (1 - s) * latents + s * noise
        with autocast(self.device, self.cfg.mixed_precision):
            pred = self.predict(noisy, sigmas, {k: v.to(self.device) for k, v in cond.items()}).float()
        pred, target = self.objective(pred, noisy, noise, latents, s)
        weighting = compute_loss_weighting_for_sd3(self.weighting_scheme, s)
        return (weighting.float() * (pred - target) ** 2).reshape(latents.shape[0], -1).mean(1).mean()

    def objective(
        self, pred: torch.Tensor, noisy: torch.Tensor, noise: torch.Tensor, latents: torch.Tensor, s: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(prediction, target) the loss compares: the velocity noise - x0 by default."""
        return pred, noise - latents

    def predict(self, noisy: torch.Tensor, sigmas: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The transformer's velocity for noisy latents at noise levels sigmas, in the latents' layout."""
        raise NotImplementedError

    # -- sampling
    def prepare_sampling(self, prompts: list[str]) -> None:
        """Embeds the validation prompts (and the empty prompt, the negative of guided sampling) while the text
        encoders are loaded: sampling later uses only the transformer and the VAE."""
        self.sampling_cond: dict[str, Conditioning] = {}
        if prompts:
            texts = list(dict.fromkeys([*prompts, ""]))
            with torch.no_grad():
                entries = self.split_prompts(self.encode_prompts(self.prompt_batch(texts)), len(texts))
            self.sampling_cond = {t: {k: v.cpu() for k, v in e.items()} for t, e in zip(texts, entries)}
