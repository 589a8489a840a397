"""The typed config of `lvd train`: one section per component, every default here.

YAML files in configs/ hold only what differs from these defaults; see common/config.py for the
loader and the dotted command-line overrides.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from data_pipeline.config import DataConfig

Task = Literal[
    "autoencoder",
    "temporal_decoder",
    "diffusion",
    "lvdm_prediction",
    "lvdm_interpolation",
    "videofusion",
    "cmd",
    "streaming",
]


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    dir: str = "runs/default"
    """Run folder: checkpoints, TensorBoard events (tb/), config.yaml, logs. Reusing it resumes."""
    log_every: int = 10
    """Steps between a plain-text log line on stdout and TensorBoard scalars."""
    video_every: int = 0
    """Steps between sampled preview videos in TensorBoard (0: never)."""
    progress: Literal["auto", "bar", "lines", "quiet"] = "auto"
    """Console progress on rank 0: a tqdm bar on a terminal and a line every `log_every` steps
    otherwise (auto), always one of them, or none (quiet; `lvd train --quiet`)."""

    def __post_init__(self) -> None:
        if not self.dir:
            raise ValueError("dir: must not be empty")
        if self.log_every < 1:
            raise ValueError(f"log_every: must be >= 1, got {self.log_every}")
        if self.video_every < 0:
            raise ValueError(f"video_every: must be >= 0, got {self.video_every}")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    task: Task = "diffusion"
    """Which objective trains which networks (see README, 'Tasks')."""
    steps: int = 100
    """Optimizer steps in total (a resumed run continues up to this number)."""
    seed: int = 0
    """Seed of parameters, noise, timesteps and data order (per rank offsets are derived)."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage 0, 1, 2 or 3."""
    checkpoint_every: int = 50
    """Steps between checkpoints (0: only at the end and on preemption)."""
    keep_last: int = 2
    """Checkpoints kept; older ones are deleted after a new one is complete."""
    micro_batch_size: int = 2
    """Clips per rank per micro-step."""
    grad_accum: int = 1
    """Micro-steps accumulated per optimizer step."""
    lr: float = 1.0e-4
    """Peak learning rate (AdamW)."""
    min_lr_ratio: float = 0.1
    """Cosine decay floor as a fraction of `lr`."""
    warmup_steps: int = 10
    """Linear warm-up steps before the cosine decay."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    grad_clip: float = 1.0
    """Global gradient-norm clip (0: off)."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """Training precision (fp16 is not offered: bf16 on GPU, fp32 or bf16 on CPU)."""
    act_ckpt: bool = False
    """Activation checkpointing of the model's blocks, applied from outside the model."""
    compile: bool = False
    """torch.compile each of the model's blocks (regional: one compile serves every block of a
    kind; parameter names and checkpoints do not change). ZeRO stage 0-2 only."""
    ema_decay: float = 0.0
    """EMA decay of the trained weights (0: no EMA). Works under ZeRO-3."""
    max_bad_steps: int = 5
    """Consecutive NaN/inf steps that stop the run with an error."""

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps: must be >= 1, got {self.steps}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage: must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.checkpoint_every < 0:
            raise ValueError(f"checkpoint_every: must be >= 0, got {self.checkpoint_every}")
        if self.keep_last < 1:
            raise ValueError(f"keep_last: must be >= 1, got {self.keep_last}")
        if self.micro_batch_size < 1 or self.grad_accum < 1:
            raise ValueError("micro_batch_size: micro_batch_size and grad_accum must be >= 1")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps: must be >= 0, got {self.warmup_steps}")
        if self.lr <= 0:
            raise ValueError(f"lr: must be > 0, got {self.lr}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay: must be in [0, 1), got {self.ema_decay}")
        if self.compile and self.zero_stage == 3:
            raise ValueError(
                "compile: torch.compile of the blocks is supported with zero_stage 0, 1 or 2, not 3 "
                "(ZeRO-3 gathers parameters in module hooks inside the compiled region)"
            )
        if self.max_bad_steps < 1:
            raise ValueError(f"max_bad_steps: must be >= 1, got {self.max_bad_steps}")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    family: str = "unet3d"
    """The trained network's model-zoo family (see `model_zoo.list_models()`)."""
    flavor: str = "tiny"
    """Named size of the family (tiny, lvdm-256, 1b, ...)."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Fields of the family's config that differ from the flavour (checked by the model zoo)."""
    init_from: str | None = None
    """Exported model folder to start the trained network from (fine-tuning)."""
    vae: str = "video_vae/tiny"
    """Frozen autoencoder of latent tasks: 'family/flavor' (random init) or an exported folder."""
    text_encoder: str = "text_encoder/tiny"
    """Frozen text encoder: 'family/flavor' or an exported folder."""
    base: str | None = None
    """Frozen base U-Net of the `streaming` task: an exported folder or 'family/flavor'."""
    image_encoder: str = "image_encoder/tiny"
    """Frozen image encoder of the `streaming` task (APM's anchor embedding)."""
    discriminator: str = "video_discriminator/tiny"
    """3D patch discriminator of the `autoencoder` task: 'family/flavor'."""


@dataclass(frozen=True, kw_only=True)
class ObjectiveConfig:
    schedule: Literal["linear", "sqrt_linear", "scaled_linear", "cosine"] = "sqrt_linear"
    """Beta schedule (LVDM's 'linear' is sqrt-linear: linspace of sqrt(beta), squared)."""
    beta_start: float = 0.0015
    """First beta (LVDM 0.0015; SD-based 0.00085)."""
    beta_end: float = 0.0155
    """Last beta (LVDM 0.0155; SD-based 0.012)."""
    num_timesteps: int = 1000
    """Diffusion steps T."""
    parameterization: Literal["eps", "v", "x0"] = "eps"
    """What the denoiser predicts."""
    loss_type: Literal["l2", "l1"] = "l2"
    """Distance between target and prediction (LVDM used l1)."""
    p_pred: float = 0.5
    """LVDM prediction model: probability of a prediction mask (first `cond_frames` latent frames
    known); the other samples have no mask at all (the unconditional branch ε_u)."""
    p_interp: float = 0.9
    """LVDM interpolation model: probability of an interpolation mask (first and last known)."""
    p_no_mask: float = 0.1
    """LVDM interpolation model: probability of no mask at all, which trains the unconditional
    branch ε_u that unconditional guidance uses at sampling; the rest are prediction masks."""
    cond_frames: int = 1
    """LVDM: latent frames given as condition for prediction."""
    s_max: int = 250
    """LVDM conditional latent perturbation: s ~ U{0..s_max}, fed as a class embedding with one
    more class, s_max + 1, for "no condition" (the samples without any mask)."""
    videofusion_lambda: float = 0.5
    """VideoFusion: share of the base noise, eps_i = sqrt(l) b + sqrt(1-l) r_i."""
    kl_weight: float = 1.0e-6
    """Autoencoder: KL weight."""
    adv_weight: float = 0.5
    """Autoencoder: adversarial loss weight after `disc_start`."""
    disc_start: int = 50000
    """Autoencoder: step at which the discriminator starts (LVDM: 50k)."""
    perceptual: str | None = None
    """Autoencoder: path to local perceptual-loss weights (None: no perceptual term)."""
    perceptual_weight: float = 1.0
    """Autoencoder: perceptual loss weight when `perceptual` is set."""

    def __post_init__(self) -> None:
        for name in ("p_pred", "p_interp", "p_no_mask", "videofusion_lambda"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name}: must be in [0, 1], got {value}")
        if self.p_interp + self.p_no_mask > 1.0:
            raise ValueError(f"p_no_mask: p_interp + p_no_mask must be <= 1, got {self.p_interp} + {self.p_no_mask}")
        if not 0 <= self.s_max < self.num_timesteps:
            raise ValueError(f"s_max: must be in [0, num_timesteps), got {self.s_max}")
        if self.beta_start <= 0 or self.beta_end <= self.beta_start:
            raise ValueError(f"beta_end: need 0 < beta_start < beta_end, got {self.beta_start}, {self.beta_end}")
        if self.cond_frames < 1:
            raise ValueError(f"cond_frames: must be >= 1, got {self.cond_frames}")


@dataclass(frozen=True, kw_only=True)
class TrainJobConfig:
    run: RunConfig = field(default_factory=RunConfig)
    """Where the run lives and how often it reports."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimisation, parallelism and checkpointing."""
    data: DataConfig = field(default_factory=DataConfig)
    """The streaming loader."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The trained network and its frozen helpers."""
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    """The loss: diffusion schedule, parameterisation, masks, autoencoder terms."""
