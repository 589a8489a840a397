"""CMD's three training stages, one task each (Yu et al. 2024, "Efficient Video Diffusion Models
via Content-Frame Motion-Latent Decomposition", §3; docs/methods.md, 'CMD: training in stages'):

- `cmd_autoencoder`: the content-motion autoencoder, on reconstruction;
- `cmd_content`: a text-conditioned image diffusion model of the content frames of the frozen
  autoencoder (`model.vae`), an image `dit` on the frames' space-to-depth as 1-frame clips;
- `cmd_motion`: the motion DiT on the frozen autoencoder's motion latents, conditioned on its
  content frame and the text.

Stages 2 and 3 hold the autoencoder as a frozen helper: it encodes without gradients, has
`requires_grad` off and gets no engine, and its exact weights are saved with the run and exported.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

import model_zoo
from model_zoo.cmd import (
    Motion,
    content_condition,
    content_grid,
    content_model_config,
    motion_grid,
    motion_model_config,
    pack_motion,
    patchify_content,
)
from trainer.config import CMDAutoencoderObjective, CMDContentObjective, CMDMotionObjective, ModelConfig
from trainer.tasks.denoising import build_denoising
from trainer.tasks.encoders import VAE_SEED, text_encoder, text_mask_input
from trainer.tasks.interface import Batch, Engines, StepOutput
from trainer.tasks.losses import reconstruction_loss
from trainer.tasks.networks import build_helper, image_unet, init_from_or_build, trained_model

CONTENT_VAE_SEED = 3
"""Offset from `train.seed` of a random content VAE's initialisation."""


def stage_input_shape(task: str, autoencoder: nn.Module, frames: int, height: int, width: int) -> tuple[int, ...]:
    """The trained network's input (1, C, T, rows, columns) for a clip of frames x height x width:
    the content frame's space-to-depth as one frame (`cmd_content`), the packed motion (`cmd_motion`)."""
    grid, length = (content_grid, 1) if task == "cmd_content" else (motion_grid, frames)
    channels, rows, columns = grid(autoencoder.config, height, width)
    return (1, channels, length, rows, columns)


def content_latent_shape(content_vae: nn.Module, height: int, width: int) -> tuple[int, ...]:
    """The SD-style content model's input (1, c, 1, H/f, W/f): the image VAE's latents of an
    H x W content frame as a 1-frame clip."""
    _, fh, fw = content_vae.downsample_factors
    return (1, int(content_vae.config.latent_channels), 1, height // fh, width // fw)


class CMDAutoencoderTask:
    """Stage 1: the content-motion autoencoder ("model"), on reconstruction."""

    components = {"model": "vae"}

    def __init__(self, objective: CMDAutoencoderObjective, model: ModelConfig, *, latent: bool, seed: int, device: torch.device):
        self.objective = objective
        self.device = device
        self.frozen: dict[str, nn.Module] = {}
        self.trained: dict[str, nn.Module] = {"model": trained_model(model)}

    def tokenizer(self) -> None:
        return None

    def losses(self, engines: Engines, batch: Batch, generator: torch.Generator, step: int) -> StepOutput:
        video = batch.pixels().to(self.device)
        recon, _, _ = engines["model"](video)
        rec = reconstruction_loss(recon, video, self.objective.loss_type)
        return StepOutput([("model", rec)], {"rec": rec.item()})

    def preview(self, engines: Engines, batch: Batch, generator: torch.Generator) -> Tensor | None:
        return None


def check_family(model: ModelConfig, family: str, task: str) -> None:
    """The stage's network is of `family`; a clear error otherwise."""
    if model.family != family:
        raise ValueError(f"model.family: the {task} task trains a {family!r} network, not {model.family!r}")


class FrozenAutoencoder:
    """The frozen helpers of stages 2 and 3: the CMD autoencoder (`model.vae`) and the text encoder."""

    def __init__(self, model: ModelConfig, *, seed: int, device: torch.device) -> None:
        self.autoencoder = build_helper(model.vae, seed=seed + VAE_SEED, device=device)
        if self.autoencoder.family != "cmd":
            raise ValueError(
                f"model.vae={model.vae}: the CMD stages need the CMD autoencoder (an export of the "
                f"cmd_autoencoder task, <export>/vae, or 'cmd/<flavor>'), not a {self.autoencoder.family!r} network"
            )
        self.text_encoder = text_encoder(model, seed=seed, device=device)
        self.device = device

    def helpers(self) -> dict[str, nn.Module]:
        return {"text_encoder": self.text_encoder, "vae": self.autoencoder}

    def context_dim(self) -> int:
        return int(self.text_encoder.config.context_dim)

    @torch.no_grad()
    def encode(self, batch: Batch) -> tuple[Tensor, Motion, Tensor]:
        """Content frames (B, 3, H, W), motion latents and text context (B, 77, D) of the batch."""
        content, motion = self.autoencoder.encode(batch.pixels().to(self.device))
        return content, motion, self.text_encoder(batch.tokens.to(self.device))

    def mask_input(self, batch: Batch) -> dict[str, Tensor]:
        """The denoiser's `context_mask` keyword for the batch's captions ({} for CLIP prompts)."""
        return text_mask_input(self.text_encoder, batch.tokens, self.device)


class CMDContentTask:
    """Stage 2: the content-frame model ("model") on the frozen autoencoder's content frames."""

    components = {"model": "content_denoiser"}

    def __init__(self, objective: CMDContentObjective, model: ModelConfig, *, latent: bool, seed: int, device: torch.device):
        self.device = device
        self.encoders = FrozenAutoencoder(model, seed=seed, device=device)
        self.diffusion = build_denoising(objective.diffusion, device)
        self.frozen = self.encoders.helpers()
        self.patch_size = self.encoders.autoencoder.config.patch_size
        self.content_vae: nn.Module | None = None
        if model.content_vae is not None:
            self.trained: dict[str, nn.Module] = {"model": self._latent_content_model(model, seed)}
            return
        check_family(model, "dit", objective.task)
        config = content_model_config(
            self.encoders.autoencoder.config, model.flavor, **{"context_dim": self.encoders.context_dim(), **model.overrides}
        )
        self.trained = {"model": init_from_or_build(model, config)}

    def _latent_content_model(self, model: ModelConfig, seed: int) -> nn.Module:
        """With `model.content_vae`: an image `unet3d` on the image VAE's latents of the content
        frame, from `model.init_from` (Stable Diffusion's U-Net) or built from scratch."""
        check_family(model, "unet3d", "cmd_content with model.content_vae")
        self.content_vae = build_helper(model.content_vae, seed=seed + CONTENT_VAE_SEED, device=self.device, role="vae")
        self.frozen = {**self.frozen, "content_vae": self.content_vae}
        channels = int(self.content_vae.config.latent_channels)
        sizes = {"in_channels": channels, "out_channels": channels, "context_dim": self.encoders.context_dim()}
        if model.init_from:
            return image_unet(model.init_from, "model.init_from", sizes, role="the content-frame model")
        image = {"temporal_conv": False, "temporal_attention": False, "input_temporal": None}
        return model_zoo.build_model("unet3d", model.flavor, **{**model.overrides, **image, **sizes})

    def content_target(self, content: Tensor, generator: torch.Generator) -> Tensor:
        """What the content model denoises, as a 1-frame clip: the content frame (B, 3, H, W)'s
        space-to-depth (B, 3p², 1, h, w), or its image-VAE latents (B, c, 1, H/f, W/f)."""
        if self.content_vae is None:
            return patchify_content(content, self.patch_size)[:, :, None]
        with torch.no_grad():
            return self.content_vae.to_latents(content[:, :, None], generator=generator)

    def tokenizer(self) -> Callable[[list[str]], Tensor]:
        return self.encoders.text_encoder.tokenize

    def losses(self, engines: Engines, batch: Batch, generator: torch.Generator, step: int) -> StepOutput:
        content, _, context = self.encoders.encode(batch)
        x0 = self.content_target(content, generator)  # (B, C, 1, h, w): a 1-frame clip
        t, noise = self.diffusion.draw(x0, generator)
        return self.diffusion.loss(engines["model"], x0, t, noise, context=context, **self.encoders.mask_input(batch))

    def preview(self, engines: Engines, batch: Batch, generator: torch.Generator) -> Tensor | None:
        return None


class CMDMotionTask:
    """Stage 3: the motion DiT ("model") on the frozen autoencoder's motion latents, conditioned
    on its content frame (dense, at the input) and the text (cross-attention)."""

    components = {"model": "denoiser"}

    def __init__(self, objective: CMDMotionObjective, model: ModelConfig, *, latent: bool, seed: int, device: torch.device):
        check_family(model, "dit", objective.task)
        self.device = device
        self.encoders = FrozenAutoencoder(model, seed=seed, device=device)
        self.diffusion = build_denoising(objective.diffusion, device)
        self.frozen = self.encoders.helpers()
        config = motion_model_config(
            self.encoders.autoencoder.config, model.flavor, **{"context_dim": self.encoders.context_dim(), **model.overrides}
        )
        self.trained: dict[str, nn.Module] = {"model": init_from_or_build(model, config)}

    def tokenizer(self) -> Callable[[list[str]], Tensor]:
        return self.encoders.text_encoder.tokenize

    def losses(self, engines: Engines, batch: Batch, generator: torch.Generator, step: int) -> StepOutput:
        content, motion, context = self.encoders.encode(batch)
        x0 = pack_motion(motion)  # (B, m, L, 1, h + w)
        cond_frame = content_condition(content, self.encoders.autoencoder.config.patch_size)  # (B, 3p², 1, h + w)
        t, noise = self.diffusion.draw(x0, generator)
        return self.diffusion.loss(
            engines["model"], x0, t, noise, context=context, cond_frame=cond_frame, **self.encoders.mask_input(batch)
        )

    def preview(self, engines: Engines, batch: Batch, generator: torch.Generator) -> Tensor | None:
        return None
