"""The training objectives (SPEC §3), one small class per task.

A task builds its networks, keeps the frozen ones (VAE, text encoder, base U-Net) outside the
DeepSpeed engines, and turns a batch into losses: `losses(engines, batch, generator, step)`
returns `[(engine_name, loss)]` in the order the loop must step them, plus scalar metrics.
Randomness (timesteps, noise, masks, perturbation levels) comes only from `generator`, whose
state is checkpointed, so a resumed run draws exactly what an uninterrupted run would.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import model_zoo
from model_zoo.diffusion import objectives
from model_zoo.diffusion.samplers import ddim
from model_zoo.diffusion.schedules import alphas_cumprod, ddim_timesteps, make_betas
from trainer.config import ObjectiveConfig, TrainJobConfig

Engines = dict[str, Callable[..., Any]]
TIMESTEP_BUCKETS = 4
"""Loss is also logged per quarter of the timestep range (loss/t_q0 .. loss/t_q3)."""
PREVIEW_STEPS = 10
"""DDIM steps of the TensorBoard preview video."""


def build_helper(spec: str, *, seed: int, device: torch.device) -> nn.Module:
    """A frozen helper network from 'family/flavor' (seeded random init) or an exported folder."""
    if Path(spec).is_dir():
        module = model_zoo.from_pretrained(spec)
    else:
        family, _, flavor = spec.partition("/")
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            module = model_zoo.build_model(family, flavor or "tiny")
    module.requires_grad_(False).eval()
    return module.to(device)


@dataclass
class StepOutput:
    losses: list[tuple[str, Tensor]]
    """(engine name, scalar loss) in the order the engines are stepped."""
    metrics: dict[str, float] = field(default_factory=dict)
    """Extra scalars for the log (per-bucket losses, KL, ...)."""


class Task:
    """Base: `trained` holds the modules that get an engine each; `frozen` those that do not."""

    trained: dict[str, nn.Module]
    frozen: dict[str, nn.Module]
    components: dict[str, str] = {"model": "denoiser"}
    """Name of each trained module in an exported pipeline folder."""

    def __init__(self, cfg: TrainJobConfig, device: torch.device):
        self.cfg = cfg
        self.device = device
        self.frozen = {}

    def tokenizer(self) -> Callable[[list[str]], Tensor] | None:
        return None

    def losses(self, engines: Engines, batch: dict[str, Any], generator: torch.Generator, step: int) -> StepOutput:
        raise NotImplementedError

    def preview(self, engines: Engines, batch: dict[str, Any], generator: torch.Generator) -> Tensor | None:
        """A short video (B, 3, T, H, W) in [-1, 1] for TensorBoard, or None."""
        return None


def _trained_model(cfg: TrainJobConfig, **forced: Any) -> nn.Module:
    """The trained network: built from family/flavor + overrides, or loaded from `model.init_from`,
    whose own config then gives the architecture: every override the YAML or the task sets
    must already hold in it (no override is silently dropped)."""
    overrides = {**cfg.model.overrides, **forced}
    if not cfg.model.init_from:
        return model_zoo.build_model(cfg.model.family, cfg.model.flavor, **overrides)
    model = model_zoo.from_pretrained(cfg.model.init_from)
    _check_init_config(cfg.model.init_from, model.config, overrides)
    return model


def _normalised(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: _normalised(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return tuple(_normalised(v) for v in value)
    if isinstance(value, dict):
        return {k: _normalised(v) for k, v in value.items()}
    return value


def _check_init_config(init_from: str, config: Any, wanted: dict[str, Any]) -> None:
    """Refuse, naming each one, the settings a checkpoint's config does not have or holds otherwise."""
    names = {f.name for f in dataclasses.fields(config)}
    unknown = sorted(set(wanted) - names)
    if unknown:
        raise ValueError(f"model.init_from={init_from}: its {type(config).__name__} has no field(s) {unknown}")
    differing = [
        f"{key} (checkpoint {getattr(config, key)!r}, asked {value!r})"
        for key, value in wanted.items()
        if _normalised(getattr(config, key)) != _normalised(value)
    ]
    if differing:
        raise ValueError(
            f"model.init_from={init_from}: the checkpoint's architecture differs from what this run sets: "
            + "; ".join(differing) + " (drop these overrides, or train from scratch)"
        )


def _init_from_or_build(cfg: TrainJobConfig, config: Any) -> nn.Module:
    """A network of `config`, or `model.init_from`'s weights when given (its config must equal `config`)."""
    if not cfg.model.init_from:
        return model_zoo.build_from_config(config)
    model = model_zoo.from_pretrained(cfg.model.init_from)
    _check_init_config(cfg.model.init_from, model.config, {f.name: getattr(config, f.name) for f in dataclasses.fields(config)})
    return model


class DiffusionTask(Task):
    """Text-to-video latent diffusion (ε/v/x0, caption dropout done by the loader), SPEC §3."""

    def __init__(self, cfg: TrainJobConfig, device: torch.device):
        super().__init__(cfg, device)
        self.setup_diffusion(vae=not cfg.data.latent)
        self.trained = {"model": _trained_model(cfg, **self.model_overrides())}

    def setup_diffusion(self, *, vae: bool, image_encoder: bool = False) -> None:
        """The frozen helpers (seeded when random) and the noise schedule ᾱ_t."""
        model, seed = self.cfg.model, self.cfg.train.seed
        self.frozen["text_encoder"] = build_helper(model.text_encoder, seed=seed + 1, device=self.device)
        if vae:
            self.frozen["vae"] = build_helper(model.vae, seed=seed + 2, device=self.device)
        if image_encoder:
            self.frozen["image_encoder"] = build_helper(model.image_encoder, seed=seed + 3, device=self.device)
        obj = self.cfg.objective
        betas = make_betas(obj.schedule, obj.num_timesteps, beta_start=obj.beta_start, beta_end=obj.beta_end)
        self.alphas_cumprod = alphas_cumprod(betas).float().to(self.device)

    def latent_channels(self) -> int:
        if self.cfg.data.latent:
            return int(self.cfg.model.overrides.get("out_channels", 4))
        return int(self.frozen["vae"].config.latent_channels)

    def context_dim(self) -> int:
        return int(self.frozen["text_encoder"].config.context_dim)

    def model_overrides(self) -> dict[str, Any]:
        c = self.latent_channels()
        return {"in_channels": c, "out_channels": c, "context_dim": self.context_dim()}

    def tokenizer(self) -> Callable[[list[str]], Tensor] | None:
        return self.frozen["text_encoder"].tokenize

    @torch.no_grad()
    def encode(self, batch: dict[str, Any], generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Latents (B, c, t, h, w) and text context (B, 77, D), both from the frozen helpers."""
        if "latents" in batch:
            latents = batch["latents"].to(self.device)
        else:
            latents = self.frozen["vae"].to_latents(batch["video"].to(self.device), generator=generator)
        context = batch.get("text_emb")
        if context is None:
            return latents, self.frozen["text_encoder"](batch["tokens"].to(self.device))
        # A latent cache holds each clip's own caption embedding; a caption the loader dropped
        # (classifier-free guidance's p_uncond) must train the empty prompt's context instead,
        # the one the sampler's unconditional branch uses.
        context = context.to(self.device)
        dropped = [i for i, caption in enumerate(batch.get("caption", ())) if caption == ""]
        if dropped:
            context = context.clone()
            context[dropped] = self.frozen["text_encoder"](batch["tokens"][dropped].to(self.device)).to(context.dtype)
        return latents, context

    def draw(self, latents: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        t = torch.randint(0, self.cfg.objective.num_timesteps, (latents.shape[0],), generator=generator).to(self.device)
        noise = torch.randn(latents.shape, generator=generator).to(latents)
        return t, noise

    def denoising_loss(
        self, model: Callable[..., Tensor], z_input: Tensor, x0: Tensor, t: Tensor, noise: Tensor, frame_weight: Tensor | None, **cond: Any
    ) -> StepOutput:
        """‖target − model(z_input, t)‖ per sample (weighted over frames), logged per timestep bucket."""
        obj = self.cfg.objective
        prediction = model(z_input, t, **cond)
        wanted = objectives.target(obj.parameterization, x0=x0, noise=noise, t=t, alphas_cumprod=self.alphas_cumprod)
        per_frame = objectives.frame_losses(prediction.float(), wanted.float(), obj.loss_type)  # (B, T)
        weight = torch.ones_like(per_frame) if frame_weight is None else frame_weight.to(per_frame).expand_as(per_frame)
        per_sample = (per_frame * weight).sum(1) / weight.sum(1).clamp_min(1.0)  # (B,)
        return StepOutput([("model", per_sample.mean())], _bucket_metrics(per_sample, t, obj.num_timesteps))

    def losses(self, engines: Engines, batch: dict[str, Any], generator: torch.Generator, step: int) -> StepOutput:
        latents, context = self.encode(batch, generator)
        t, noise = self.draw(latents, generator)
        z_t = objectives.q_sample(latents, t, noise, self.alphas_cumprod)
        return self.denoising_loss(engines["model"], z_t, latents, t, noise, None, context=context)

    def unconditional_input(self, z_t: Tensor) -> tuple[Tensor, dict[str, Any]]:
        """The denoiser input and extra kwargs for sampling without any frame condition."""
        return z_t, {}

    @torch.no_grad()
    def preview(self, engines: Engines, batch: dict[str, Any], generator: torch.Generator) -> Tensor | None:
        """A DDIM sample for the first caption of the batch, decoded by the frozen VAE."""
        if "vae" not in self.frozen:
            return None
        latents, context = self.encode({k: v[:1] for k, v in batch.items()}, generator)
        model = engines["model"]

        def denoise(x: Tensor, t: Tensor) -> Tensor:
            model_input, extra = self.unconditional_input(x)
            return model(model_input, t, context=context, **extra)

        x_T = torch.randn(latents.shape, generator=generator).to(latents)
        timesteps = ddim_timesteps(self.cfg.objective.num_timesteps, PREVIEW_STEPS)
        sample = ddim(denoise, x_T, timesteps, alphas_cumprod=self.alphas_cumprod, parameterization=self.cfg.objective.parameterization)
        return self.frozen["vae"].from_latents(sample).clamp(-1, 1)


def no_condition_level(obj: ObjectiveConfig) -> int:
    """The perturbation-level class of LVDM samples without any mask: one past s_max."""
    return obj.s_max + 1


class LVDMTask(DiffusionTask):
    """LVDM prediction / interpolation: mask conditioning and conditional latent perturbation (SPEC §3)."""

    def model_overrides(self) -> dict[str, Any]:
        base = super().model_overrides()
        return {**base, "in_channels": base["in_channels"] + 1, "num_levels": no_condition_level(self.cfg.objective) + 1}

    def mask_probabilities(self) -> tuple[float, float]:
        """(p_pred, p_interp); the remaining samples get no mask (the unconditional branch)."""
        obj = self.cfg.objective
        if self.cfg.train.task == "lvdm_interpolation":
            return max(0.0, 1.0 - obj.p_interp - obj.p_no_mask), obj.p_interp
        return obj.p_pred, 0.0

    def draw_conditioning(self, generator: torch.Generator, batch_size: int, num_frames: int) -> tuple[Tensor, Tensor]:
        """Masks (B, T) and perturbation levels (B,): s ~ U{0..s_max} where a mask conditions,
        the no-condition class where it is all zero (the encoding the sampler's ε_u uses)."""
        obj = self.cfg.objective
        p_pred, p_interp = self.mask_probabilities()
        mask = objectives.draw_masks(generator, batch_size, num_frames, num_cond_frames=obj.cond_frames, p_pred=p_pred, p_interp=p_interp)
        levels = objectives.draw_perturbation_levels(generator, batch_size, obj.s_max)
        levels = torch.where(mask.any(dim=1), levels, torch.full_like(levels, no_condition_level(obj)))
        return mask.to(self.device), levels.to(self.device)

    def unconditional_input(self, z_t: Tensor) -> tuple[Tensor, dict[str, Any]]:
        no_mask = torch.zeros(z_t.shape[0], z_t.shape[2], device=z_t.device)
        level = torch.full((z_t.shape[0],), no_condition_level(self.cfg.objective), dtype=torch.long, device=z_t.device)
        return objectives.apply_mask_conditioning(z_t, torch.zeros_like(z_t), no_mask), {"level": level}

    def losses(self, engines: Engines, batch: dict[str, Any], generator: torch.Generator, step: int) -> StepOutput:
        latents, context = self.encode(batch, generator)
        t, noise = self.draw(latents, generator)
        mask, levels = self.draw_conditioning(generator, latents.shape[0], latents.shape[2])  # (B, T), (B,)
        cond_noise = torch.randn(latents.shape, generator=generator).to(latents)
        z_cond = objectives.perturb_condition(latents, levels, cond_noise, self.alphas_cumprod)
        z_t = objectives.q_sample(latents, t, noise, self.alphas_cumprod)
        z_input = objectives.apply_mask_conditioning(z_t, z_cond, mask)  # (B, c+1, T, h, w)
        out = self.denoising_loss(engines["model"], z_input, latents, t, noise, 1.0 - mask, context=context, level=levels)
        out.metrics["mask_frac"] = float(mask.mean())
        return out


class AutoencoderTask(Task):
    """LVDM's video VAE: reconstruction + KL + adversarial after `disc_start` (SPEC §2.1)."""

    components = {"model": "vae", "disc": "discriminator"}

    def __init__(self, cfg: TrainJobConfig, device: torch.device):
        super().__init__(cfg, device)
        if cfg.objective.perceptual is not None:
            raise ValueError(
                f"objective.perceptual: {cfg.objective.perceptual!r} was given, but no perceptual network "
                "can be loaded from it (LPIPS weights are not supported yet); set objective.perceptual=null"
            )
        family, _, flavor = cfg.model.discriminator.partition("/")
        self.trained = {"model": _trained_model(cfg), "disc": model_zoo.build_model(family, flavor or "tiny")}

    def losses(self, engines: Engines, batch: dict[str, Any], generator: torch.Generator, step: int) -> StepOutput:
        obj = self.cfg.objective
        video = batch["video"].to(self.device)
        recon, posterior = engines["model"](video, True, generator)
        rec = F.l1_loss(recon, video) if obj.loss_type == "l1" else F.mse_loss(recon, video)
        kl = posterior.kl().mean()
        loss = rec + obj.kl_weight * kl
        metrics = {"rec": rec.item(), "kl": kl.item()}
        adversarial = step >= obj.disc_start
        if adversarial:
            # The plain module, not the engine: this backward belongs to the VAE's engine.
            with _frozen(self.trained["disc"]):
                g_adv = -self.trained["disc"](recon).mean()
            loss = loss + obj.adv_weight * g_adv
            metrics["g_adv"] = g_adv.item()
        out = [("model", loss)]
        if adversarial:
            d_loss = _hinge_d_loss(engines["disc"](video), engines["disc"](recon.detach()))
            out.append(("disc", d_loss))
            metrics["d_loss"] = d_loss.item()
        return StepOutput(out, metrics)

    def preview(self, engines: Engines, batch: dict[str, Any], generator: torch.Generator) -> Tensor | None:
        with torch.no_grad():
            video = batch["video"][:1].to(self.device)
            recon, _ = engines["model"](video, False, None)
        return torch.cat([video, recon.clamp(-1, 1)], dim=-1)  # side by side (1, 3, T, H, 2W)


class TemporalDecoderTask(Task):
    """VidRD's temporal-aware decoder: only the new temporal layers train, on reconstruction (SPEC §2.2)."""

    components = {"model": "vae"}

    def __init__(self, cfg: TrainJobConfig, device: torch.device):
        super().__init__(cfg, device)
        self.trained = {"model": _trained_model(cfg)}
        trainable = set(self.trained["model"].trainable_parameter_names())
        for name, param in self.trained["model"].named_parameters():
            param.requires_grad_(name in trainable)

    def losses(self, engines: Engines, batch: dict[str, Any], generator: torch.Generator, step: int) -> StepOutput:
        video = batch["video"].to(self.device)
        vae = self.trained["model"]  # its decode, not the engine's forward; the engine still owns backward
        with torch.no_grad():
            z = vae.encode(video).sample(generator)  # the encoder is frozen
        recon = vae.decode(z)
        rec = F.l1_loss(recon, video) if self.cfg.objective.loss_type == "l1" else F.mse_loss(recon, video)
        frame_diff = F.l1_loss(recon.diff(dim=2), video.diff(dim=2))
        return StepOutput([("model", rec)], {"rec": rec.item(), "frame_diff_err": frame_diff.item()})


class VideoFusionTask(DiffusionTask):
    """VideoFusion: decomposed noise, base + residual generators trained jointly (SPEC §2.6)."""

    def __init__(self, cfg: TrainJobConfig, device: torch.device):
        Task.__init__(self, cfg, device)
        self.setup_diffusion(vae=not cfg.data.latent)
        obj = cfg.objective
        config = model_zoo.make_config(cfg.model.family, cfg.model.flavor, **cfg.model.overrides)
        c, d = self.latent_channels(), self.context_dim()
        generators = {name: dataclasses.replace(getattr(config, name), in_channels=c, out_channels=c, context_dim=d) for name in ("base", "residual")}
        config = dataclasses.replace(config, lam=obj.videofusion_lambda, **generators)
        self.trained = {"model": _init_from_or_build(cfg, config)}

    def losses(self, engines: Engines, batch: dict[str, Any], generator: torch.Generator, step: int) -> StepOutput:
        latents, context = self.encode(batch, generator)
        t = torch.randint(0, self.cfg.objective.num_timesteps, (latents.shape[0],), generator=generator).to(self.device)
        noise, _, _ = self.trained["model"].noise.sample(latents.shape, generator)  # eps_i = √λ b + √(1-λ) r_i
        noise = noise.to(latents)
        z_t = objectives.q_sample(latents, t, noise, self.alphas_cumprod)
        return self.denoising_loss(engines["model"], z_t, latents, t, noise, None, context=context)


class StreamingTask(DiffusionTask):
    """StreamingT2V: CAM + APM over a frozen `unet3d` base (SPEC §2.7).

    A training clip of T latent frames is split: the first `cond_frames` are the previous
    chunk (CAM's input, clean), the rest is the chunk to denoise; the clip's first frame is the
    anchor of APM (its image embedding from the frozen image encoder).
    """

    def __init__(self, cfg: TrainJobConfig, device: torch.device):
        Task.__init__(self, cfg, device)
        self.setup_diffusion(vae=True, image_encoder=True)
        if cfg.model.base is None or not Path(cfg.model.base).is_dir():
            raise ValueError(
                f"model.base: {cfg.model.base!r} is not a model folder; the streaming task trains CAM/APM over a "
                "trained text-to-video unet3d (e.g. <export>/denoiser). A freshly initialised U-Net has a "
                "zero output layer, so CAM and APM would receive no gradient at all"
            )
        base = build_helper(cfg.model.base, seed=cfg.train.seed + 4, device=torch.device("cpu"))
        config = model_zoo.make_config(cfg.model.family, cfg.model.flavor, **cfg.model.overrides)
        config = dataclasses.replace(config, base=base.config, image_embed_dim=int(self.frozen["image_encoder"].config.context_dim))
        model = _init_from_or_build(cfg, config)
        if not cfg.model.init_from:  # a fine-tuned CAM/APM checkpoint already holds its base
            model.load_base_state_dict(base.state_dict())
        trainable = {id(p) for p in model.trainable_parameters()}
        for param in model.parameters():
            param.requires_grad_(id(param) in trainable)
        self.trained = {"model": model}
        self.cond_frames = config.cond_frames

    def losses(self, engines: Engines, batch: dict[str, Any], generator: torch.Generator, step: int) -> StepOutput:
        latents, context = self.encode(batch, generator)
        if latents.shape[2] <= self.cond_frames:
            raise ValueError(f"data.frames: clips give {latents.shape[2]} latent frames, need more than cond_frames={self.cond_frames}")
        cond, chunk = latents[:, :, : self.cond_frames], latents[:, :, self.cond_frames :]
        with torch.no_grad():
            anchor = self.frozen["image_encoder"](batch["video"][:, :, 0].to(self.device))[:, 0]  # (B, D_img)
        t, noise = self.draw(chunk, generator)
        z_t = objectives.q_sample(chunk, t, noise, self.alphas_cumprod)
        return self.denoising_loss(engines["model"], z_t, chunk, t, noise, None, context=context, cond_latents=cond, anchor=anchor)

    def preview(self, engines: Engines, batch: dict[str, Any], generator: torch.Generator) -> Tensor | None:
        return None


class CMDTask(DiffusionTask):
    """CMD: the content-motion autoencoder (reconstruction) and, on its detached latents, the
    motion DiT conditioned on the content frame (diffusion), trained side by side (SPEC §2.5).

    The paper trains them one after the other; here both engines step every iteration and the
    DiT only ever sees detached autoencoder outputs, so neither objective leaks into the other.
    """

    components = {"model": "autoencoder", "motion": "motion_denoiser"}

    def __init__(self, cfg: TrainJobConfig, device: torch.device):
        Task.__init__(self, cfg, device)
        self.setup_diffusion(vae=False)
        autoencoder = _trained_model(cfg)
        from model_zoo.cmd import motion_model_config

        motion = model_zoo.build_from_config(motion_model_config(autoencoder.config, "tiny" if cfg.model.flavor == "tiny" else "S", context_dim=self.context_dim()))
        self.trained = {"model": autoencoder, "motion": motion}

    def losses(self, engines: Engines, batch: dict[str, Any], generator: torch.Generator, step: int) -> StepOutput:
        from model_zoo.cmd import content_condition, pack_motion

        video = batch["video"].to(self.device)
        recon, content, motion = engines["model"](video)
        rec = F.l1_loss(recon, video) if self.cfg.objective.loss_type == "l1" else F.mse_loss(recon, video)
        with torch.no_grad():
            context = self.frozen["text_encoder"](batch["tokens"].to(self.device))
            x0 = pack_motion(type(motion)(*(z.detach() for z in motion)))  # (B, 2m, L, h, w)
            cond_frame = content_condition(content.detach(), self.trained["model"].config.patch_size)
        t, noise = self.draw(x0, generator)
        z_t = objectives.q_sample(x0, t, noise, self.alphas_cumprod)
        diffusion = self.denoising_loss(engines["motion"], z_t, x0, t, noise, None, context=context, cond_frame=cond_frame)
        motion_loss = diffusion.losses[0][1]
        return StepOutput([("model", rec), ("motion", motion_loss)], {"rec": rec.item(), "motion_loss": motion_loss.item(), **diffusion.metrics})

    def preview(self, engines: Engines, batch: dict[str, Any], generator: torch.Generator) -> Tensor | None:
        return None


class _frozen:
    """Parameters of `module` receive no gradient inside the block (the generator's pass through D)."""

    def __init__(self, module: nn.Module):
        self.params = [p for p in module.parameters() if p.requires_grad]

    def __enter__(self) -> None:
        for p in self.params:
            p.requires_grad_(False)

    def __exit__(self, *exc: object) -> None:
        for p in self.params:
            p.requires_grad_(True)


def _hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def _bucket_metrics(per_sample: Tensor, t: Tensor, num_timesteps: int) -> dict[str, float]:
    buckets = (t * TIMESTEP_BUCKETS // num_timesteps).clamp(max=TIMESTEP_BUCKETS - 1)
    metrics = {}
    for b in range(TIMESTEP_BUCKETS):
        chosen = per_sample[buckets == b]
        if chosen.numel():
            metrics[f"loss/t_q{b}"] = chosen.mean().item()
    return metrics


TASKS: dict[str, type[Task]] = {
    "diffusion": DiffusionTask,
    "lvdm_prediction": LVDMTask,
    "lvdm_interpolation": LVDMTask,
    "autoencoder": AutoencoderTask,
    "temporal_decoder": TemporalDecoderTask,
    "videofusion": VideoFusionTask,
    "streaming": StreamingTask,
    "cmd": CMDTask,
}


def build_task(cfg: TrainJobConfig, device: torch.device) -> Task:
    if cfg.train.task not in TASKS:
        raise ValueError(f"train.task: {cfg.train.task!r} has no trainer yet; implemented: {', '.join(TASKS)}")
    with torch.random.fork_rng():
        torch.manual_seed(cfg.train.seed)
        return TASKS[cfg.train.task](cfg, device)
