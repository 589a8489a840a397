"""Tasks `lvdm_prediction` and `lvdm_interpolation`: LVDM's mask conditioning and conditional
latent perturbation (He et al. 2022, "Latent Video Diffusion Models for High-Fidelity Long
Video Generation", §3.3; docs/methods.md, 'LVDM: mask conditioning' and 'LVDM: conditional latent perturbation').

The network sees concat[z_t ⊙ (1-m) + z_cond ⊙ m, m], with z_cond the clean latents perturbed
to level s; the loss counts only the frames to predict (weight 1 - m). A network with a
frame-stride embedding (`model.overrides.num_strides`) is told each clip's stride, the batch's
'frame_stride' (docs/methods.md, 'LVDM: keyframes at a frame stride').
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from model_zoo.diffusion import objectives
from trainer.config import LVDMConditioning, LVDMInterpolationObjective, LVDMPredictionObjective, ModelConfig
from trainer.tasks.denoising import build_denoising, text_to_video_preview
from trainer.tasks.encoders import latent_encoders
from trainer.tasks.images import image_denoiser
from trainer.tasks.interface import Batch, Engines, StepOutput
from trainer.tasks.networks import trained_model

LVDMObjective = LVDMPredictionObjective | LVDMInterpolationObjective


def no_condition_level(conditioning: LVDMConditioning) -> int:
    """The perturbation-level class of LVDM samples without any mask: one past s_max."""
    return conditioning.s_max + 1


def mask_probabilities(objective: LVDMObjective) -> tuple[float, float]:
    """(p_pred, p_interp); the remaining samples get no mask (the unconditional branch)."""
    if isinstance(objective, LVDMInterpolationObjective):
        return max(0.0, 1.0 - objective.p_interp - objective.p_no_mask), objective.p_interp
    return objective.p_pred, 0.0


class LVDMTask:
    """LVDM's prediction or interpolation model, as the objective it is given says."""

    components = {"model": "denoiser"}

    def __init__(self, objective: LVDMObjective, model: ModelConfig, *, latent: bool, seed: int, device: torch.device):
        self.objective = objective
        self.device = device
        self.encoders = latent_encoders(model, vae=not latent, seed=seed, device=device)
        self.diffusion = build_denoising(objective.diffusion, device)
        channels = self.encoders.latent_channels(model)
        self.frozen = self.encoders.helpers()
        self.trained: dict[str, nn.Module] = {
            "model": trained_model(
                model,
                in_channels=channels + 1,  # + the mask channel
                out_channels=channels,
                context_dim=self.encoders.context_dim(),
                num_levels=no_condition_level(objective.conditioning) + 1,
            )
        }

    def stride_input(self, batch: Batch) -> dict[str, Tensor]:
        """{'stride': (B,) long} of the batch's clips for a stride-conditioned network, else {}."""
        if not getattr(self.trained["model"].config, "num_strides", 0):
            return {}
        if batch.frame_stride is None:
            raise ValueError("a stride-conditioned network, but the batch carries no 'frame_stride'")
        return {"stride": batch.frame_stride.to(self.device)}

    def tokenizer(self) -> Callable[[list[str]], Tensor]:
        return self.encoders.tokenizer()

    def draw_conditioning(self, generator: torch.Generator, batch_size: int, num_frames: int) -> tuple[Tensor, Tensor]:
        """Masks (B, T) and perturbation levels (B,): s ~ U{0..s_max} where a mask conditions,
        the no-condition class where it is all zero (the encoding the sampler's ε_u uses)."""
        conditioning = self.objective.conditioning
        p_pred, p_interp = mask_probabilities(self.objective)
        mask = objectives.draw_masks(
            generator, batch_size, num_frames, num_cond_frames=conditioning.cond_frames, p_pred=p_pred, p_interp=p_interp
        )
        levels = objectives.draw_perturbation_levels(generator, batch_size, conditioning.s_max)
        levels = torch.where(mask.any(dim=1), levels, torch.full_like(levels, no_condition_level(conditioning)))
        return mask.to(self.device), levels.to(self.device)

    def losses(self, engines: Engines, batch: Batch, generator: torch.Generator, step: int) -> StepOutput:
        latents, context = self.encoders.encode(batch, generator, self.device)
        t, noise = self.diffusion.draw(latents, generator)
        mask, levels = self.draw_conditioning(generator, latents.shape[0], latents.shape[2])  # (B, T), (B,)
        model = engines["model"]
        if batch.modality == "image":  # an image has no frame to condition on: the unconditional branch
            mask, levels = torch.zeros_like(mask), torch.full_like(levels, no_condition_level(self.objective.conditioning))
            model = image_denoiser(self.trained["model"], model)
        cond_noise = torch.randn(latents.shape, generator=generator).to(latents)
        z_cond = objectives.perturb_condition(latents, levels, cond_noise, self.diffusion.alphas_cumprod)

        def denoise(z_t: Tensor, t: Tensor, **cond: Tensor) -> Tensor:
            return model(objectives.apply_mask_conditioning(z_t, z_cond, mask), t, **cond)  # input (B, c+1, T, h, w)

        out = self.diffusion.loss(
            denoise, latents, t, noise, frame_weight=1.0 - mask, context=context, level=levels,
            **self.stride_input(batch), **self.encoders.mask_input(batch, self.device),
        )
        out.metrics["mask_frac"] = float(mask.mean())
        return out

    def unconditional_input(self, z_t: Tensor) -> tuple[Tensor, Tensor]:
        """The network input and level of sampling without any frame condition (ε_u)."""
        no_mask = torch.zeros(z_t.shape[0], z_t.shape[2], device=z_t.device)
        level = torch.full((z_t.shape[0],), no_condition_level(self.objective.conditioning), dtype=torch.long, device=z_t.device)
        return objectives.apply_mask_conditioning(z_t, torch.zeros_like(z_t), no_mask), level

    def preview(self, engines: Engines, batch: Batch, generator: torch.Generator) -> Tensor | None:
        """An unconditional sample (ε_u's input: no mask, the no-condition level)."""
        model, stride = engines["model"], self.stride_input(batch.head(1))

        def denoise(x: Tensor, t: Tensor, context: Tensor) -> Tensor:
            model_input, level = self.unconditional_input(x)
            return model(model_input, t, context=context, level=level, **stride)

        return text_to_video_preview(self.diffusion, self.encoders, denoise, batch, generator, self.device)
