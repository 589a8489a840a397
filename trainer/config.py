"""The typed config of `lvd train`: one section per component, every default here.

YAML files in configs/ hold only what differs from these defaults; see common/config.py for the
loader and the dotted command-line overrides. The `objective` section is a tagged union: its
`task` picks the task and which terms the section may hold, e.g.

    objective:
      task: lvdm_prediction
      diffusion: {loss_type: l1}
      p_pred: 0.5
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, fields
from typing import Any, Literal, get_args, get_type_hints

from common.config import field_default
from data_pipeline.config import DataConfig
from trainer.lora_config import LoraConfig


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
    sp_size: int = 1
    """Sequence-parallel degree (Ulysses, DiT families): each group of `sp_size` consecutive ranks
    trains on the same clips, each rank on 1/sp_size of the token sequence; the world size must be
    divisible by it and the attention heads by sp_size / sp_ring (data-parallel size = world size /
    sp_size)."""
    sp_ring: int = 1
    """Ring degree R of sequence parallelism: 1 is Ulysses alone, `sp_size` pure ring attention
    (any head count), between them the hybrid: Ulysses over sp_size / R ranks (the heads must be
    divisible by it), a ring over R. Must divide `sp_size`."""
    compile: bool = False
    """torch.compile each of the model's blocks (regional: one compile serves every block of a
    kind; parameter names and checkpoints do not change). ZeRO stage 0-2 only. Where the backend
    does not work (no C compiler, TORCH_COMPILE_DISABLE=1), the run says why in one line and trains
    eager."""
    compile_backend: str = "inductor"
    """The torch.compile backend of `compile` (a name from `torch._dynamo.list_backends`)."""
    ema_decay: float = 0.0
    """EMA decay of the trained weights (0: no EMA). Works under ZeRO-3."""
    max_bad_steps: int = 5
    """Consecutive NaN/inf steps that stop the run with an error."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """Low-rank adapters: when `lora.rank` > 0 only they train, over the frozen network."""

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
        if self.sp_size < 1:
            raise ValueError(f"sp_size: must be >= 1, got {self.sp_size}")
        if self.sp_ring < 1 or self.sp_size % self.sp_ring:
            raise ValueError(f"sp_ring: must be >= 1 and divide sp_size {self.sp_size}, got {self.sp_ring}")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    family: str = "unet3d"
    """The trained network's model-zoo family (see `model_zoo.list_models()`)."""
    flavor: str = "tiny"
    """Named size of the family (tiny, lvdm-256, 1b, ...)."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Fields of the family's config that differ from the flavour (checked by the model zoo)."""
    init_from: str | None = None
    """Folder to start the trained network from (fine-tuning): an lvd export or model folder, a
    diffusers UNet3DConditionModel (ModelScope layout) or UNet2DConditionModel (inflated) folder,
    or a diffusers pipeline folder (its unet). A diffusers U-Net's own config gives the
    architecture."""
    base_init_from: str | None = None
    """`videofusion` task: an `lvd export` (or model folder) of a `unet3d` image network (temporal
    layers off), or a diffusers UNet2DConditionModel folder (Stable Diffusion's U-Net, or a
    pipeline folder: its unet), whose architecture and weights start the base generator."""
    vae: str = "video_vae/tiny"
    """Frozen autoencoder of latent tasks: 'family/flavor' (random init), an exported folder, a
    diffusers AutoencoderKL folder (applied per frame with its scaling_factor) or a pipeline folder.
    The cmd_content and cmd_motion tasks take the trained CMD autoencoder here (`<export>/vae`)."""
    text_encoder: str = "text_encoder/tiny"
    """Frozen text encoder: 'family/flavor', an exported folder, a transformers CLIPTextModel /
    T5EncoderModel folder, an open_clip checkpoint folder (open_clip_config.json + weights) or a
    diffusers pipeline folder (its text_encoder)."""
    tokenizer: str | None = None
    """Tokenizer folder of a transformers text encoder; None looks for `../tokenizer` beside it
    (the diffusers pipeline layout)."""
    text_layer: Literal["last", "penultimate"] = "penultimate"
    """The layer whose tokens an open_clip checkpoint folder's text tower gives the denoiser
    (`text_encoder=<open_clip folder>`): penultimate, as Stable Diffusion 2.x reads OpenCLIP ViT-H,
    or last."""
    content_vae: str | None = None
    """`cmd_content`: an image VAE ('family/flavor', or a diffusers AutoencoderKL / pipeline folder)
    in whose latents the content-frame model, an image `unet3d` (from `init_from`: Stable
    Diffusion's U-Net), generates the CMD autoencoder's content frame; None: the content model is a
    `dit` on the content frame's space-to-depth."""
    base: str | None = None
    """Frozen base U-Net of the `streaming` task: an exported folder or 'family/flavor'."""
    image_encoder: str = "image_encoder/tiny"
    """Frozen image encoder of the `streaming` task (APM's anchor embedding): 'family/flavor', an
    exported folder or a transformers CLIPVisionModelWithProjection folder."""
    discriminator: str = "video_discriminator/tiny"
    """3D patch discriminator of the `autoencoder` task: 'family/flavor'."""


@dataclass(frozen=True, kw_only=True)
class DiffusionConfig:
    """The diffusion process a denoiser trains against, and its loss."""

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

    def __post_init__(self) -> None:
        if self.beta_start <= 0 or self.beta_end <= self.beta_start:
            raise ValueError(f"beta_end: need 0 < beta_start < beta_end, got {self.beta_start}, {self.beta_end}")
        if self.num_timesteps < 1:
            raise ValueError(f"num_timesteps: must be >= 1, got {self.num_timesteps}")


@dataclass(frozen=True, kw_only=True)
class FlowMatchingConfig:
    """Rectified-flow training: x_t = (1-t) x_0 + t ε, target v = ε - x_0 (docs/methods.md, 'Flow matching')."""

    time_sampling: Literal["logit_normal", "uniform"] = "logit_normal"
    """How training draws t: sigmoid of N(logit_mean, logit_std) (SD3), or uniform on (0, 1)."""
    logit_mean: float = 0.0
    """m of the logit-normal time draw."""
    logit_std: float = 1.0
    """s of the logit-normal time draw."""
    shift: float = 1.0
    """SD3's timestep shift s, t' = s t / (1 + (s-1) t), in training and sampling (1: none).
    Ignored when `shift_from_tokens`."""
    shift_from_tokens: bool = False
    """Derive s from the latent token count n: log s linear in n between (base_tokens,
    base_log_shift) and (max_tokens, max_log_shift) (the resolution/length-dependent shift)."""
    base_tokens: int = 256
    """Token count at which log s = base_log_shift."""
    max_tokens: int = 4096
    """Token count at which log s = max_log_shift."""
    base_log_shift: float = 0.5
    """log s at `base_tokens`."""
    max_log_shift: float = 1.15
    """log s at `max_tokens`."""
    loss_weighting: Literal["none", "cosmap"] = "none"
    """Per-sample loss weight w(t): none, or SD3's cosmap 2 / (π (1 - 2t + 2t²))."""

    def __post_init__(self) -> None:
        if self.logit_std <= 0:
            raise ValueError(f"logit_std: must be > 0, got {self.logit_std}")
        if self.shift <= 0:
            raise ValueError(f"shift: must be > 0, got {self.shift}")
        if self.max_tokens <= self.base_tokens:
            raise ValueError(f"max_tokens: must exceed base_tokens, got {self.max_tokens} <= {self.base_tokens}")


@dataclass(frozen=True, kw_only=True)
class DiffusionObjective:
    """Text-to-video latent diffusion (any denoiser family: unet3d, dit, ...)."""

    task: Literal["diffusion"] = "diffusion"
    """Which task trains (the tag of the objective)."""
    name: Literal["diffusion", "flow_matching"] = "diffusion"
    """The training process: DDPM diffusion with `diffusion.parameterization` (eps, v, x0), or
    flow matching (`flow`; of `diffusion` only `num_timesteps`, the network's time scale, and
    `loss_type` apply)."""
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    """Noise schedule, parameterisation and loss of the denoiser."""
    flow: FlowMatchingConfig = field(default_factory=FlowMatchingConfig)
    """Time draws, shift and loss weighting of `name: flow_matching`."""
    image_rate: float = 0.0
    """Image-to-video training: the fraction of samples given their clean first latent frame as a
    condition (concatenated channels plus a mask channel; the network's input grows by C + 1).
    0: text-to-video only, no extra channels."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.image_rate <= 1.0:
            raise ValueError(f"image_rate: must be in [0, 1], got {self.image_rate}")


@dataclass(frozen=True, kw_only=True)
class LVDMConditioning:
    """LVDM's frame conditioning, shared by its prediction and interpolation models."""

    cond_frames: int = 1
    """Latent frames given as condition: the first ones (prediction), or the first and the last
    ones (interpolation)."""
    s_max: int = 250
    """Conditional latent perturbation: s ~ U{0..s_max}, fed as a class embedding with one more
    class, s_max + 1, for "no condition" (the samples without any mask)."""

    def __post_init__(self) -> None:
        if self.cond_frames < 1:
            raise ValueError(f"cond_frames: must be >= 1, got {self.cond_frames}")
        if self.s_max < 0:
            raise ValueError(f"s_max: must be >= 0, got {self.s_max}")


def _check_lvdm(conditioning: LVDMConditioning, diffusion: DiffusionConfig) -> None:
    if conditioning.s_max >= diffusion.num_timesteps:
        raise ValueError(
            f"conditioning: s_max must be < diffusion.num_timesteps, got {conditioning.s_max} >= {diffusion.num_timesteps}"
        )


def _check_probability(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name}: must be in [0, 1], got {value}")


@dataclass(frozen=True, kw_only=True)
class LVDMPredictionObjective:
    """LVDM's prediction model: the first frames given, the rest denoised."""

    task: Literal["lvdm_prediction"] = "lvdm_prediction"
    """Which task trains (the tag of the objective)."""
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    """Noise schedule, parameterisation and loss of the denoiser."""
    conditioning: LVDMConditioning = field(default_factory=LVDMConditioning)
    """Conditioning frames and their perturbation."""
    p_pred: float = 0.5
    """Probability of a prediction mask (the first `cond_frames` latent frames known); the other
    samples have no mask at all (the unconditional branch ε_u)."""

    def __post_init__(self) -> None:
        _check_probability("p_pred", self.p_pred)
        _check_lvdm(self.conditioning, self.diffusion)


@dataclass(frozen=True, kw_only=True)
class LVDMInterpolationObjective:
    """LVDM's interpolation model: the first and last frames given, the in-between ones denoised."""

    task: Literal["lvdm_interpolation"] = "lvdm_interpolation"
    """Which task trains (the tag of the objective)."""
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    """Noise schedule, parameterisation and loss of the denoiser."""
    conditioning: LVDMConditioning = field(default_factory=LVDMConditioning)
    """Conditioning frames and their perturbation."""
    p_interp: float = 0.9
    """Probability of an interpolation mask (first and last `cond_frames` known)."""
    p_no_mask: float = 0.1
    """Probability of no mask at all, which trains the unconditional branch ε_u that
    unconditional guidance uses at sampling; the rest are prediction masks."""

    def __post_init__(self) -> None:
        _check_probability("p_interp", self.p_interp)
        _check_probability("p_no_mask", self.p_no_mask)
        if self.p_interp + self.p_no_mask > 1.0:
            raise ValueError(f"p_no_mask: p_interp + p_no_mask must be <= 1, got {self.p_interp} + {self.p_no_mask}")
        _check_lvdm(self.conditioning, self.diffusion)


@dataclass(frozen=True, kw_only=True)
class VideoFusionObjective:
    """VideoFusion: decomposed noise, base and residual generators trained jointly. The base-noise
    share λ is the model's (`model.overrides.lam`), which the sampler reads from the export."""

    task: Literal["videofusion"] = "videofusion"
    """Which task trains (the tag of the objective)."""
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    """Noise schedule, parameterisation and loss of the generators."""


@dataclass(frozen=True, kw_only=True)
class StreamingObjective:
    """StreamingT2V: CAM and APM trained over a frozen text-to-video base (`model.base`)."""

    task: Literal["streaming"] = "streaming"
    """Which task trains (the tag of the objective)."""
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    """Noise schedule, parameterisation and loss of the denoiser."""


@dataclass(frozen=True, kw_only=True)
class CMDAutoencoderObjective:
    """CMD stage 1: the content-motion autoencoder, on reconstruction."""

    task: Literal["cmd_autoencoder"] = "cmd_autoencoder"
    """Which task trains (the tag of the objective)."""
    loss_type: Literal["l2", "l1"] = "l2"
    """The autoencoder's reconstruction distance."""


@dataclass(frozen=True, kw_only=True)
class CMDContentObjective:
    """CMD stage 2: the text-conditioned content-frame image model, on the content frames of the
    frozen autoencoder (`model.vae`)."""

    task: Literal["cmd_content"] = "cmd_content"
    """Which task trains (the tag of the objective)."""
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    """Noise schedule, parameterisation and loss of the content model."""


@dataclass(frozen=True, kw_only=True)
class CMDMotionObjective:
    """CMD stage 3: the motion DiT, on the motion latents of the frozen autoencoder (`model.vae`),
    conditioned on the content frame and the text."""

    task: Literal["cmd_motion"] = "cmd_motion"
    """Which task trains (the tag of the objective)."""
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    """Noise schedule, parameterisation and loss of the motion DiT."""


@dataclass(frozen=True, kw_only=True)
class AutoencoderObjective:
    """LVDM's video VAE: reconstruction (+ perceptual) + KL + adversarial, with an adaptive
    weight, after `disc_start`."""

    task: Literal["autoencoder"] = "autoencoder"
    """Which task trains (the tag of the objective)."""
    loss_type: Literal["l2", "l1"] = "l2"
    """Reconstruction distance."""
    kl_weight: float = 1.0e-6
    """KL weight."""
    adv_weight: float = 0.5
    """Factor of the adaptive adversarial weight after `disc_start` (the whole weight under ZeRO-3)."""
    disc_start: int = 50000
    """Step at which the discriminator starts (LVDM: 50k)."""
    perceptual: str | None = None
    """Folder of the perceptual (LPIPS) weights: `vgg16.pth` and the lpips package's `vgg.pth`
    (None: no perceptual term, said once in the run log)."""
    perceptual_weight: float = 1.0
    """Perceptual loss weight when `perceptual` is set."""


@dataclass(frozen=True, kw_only=True)
class TemporalDecoderObjective:
    """VidRD's temporal-aware decoder: only its temporal layers train, on the autoencoder's losses
    (reconstruction (+ perceptual) + KL + adversarial with an adaptive weight after `disc_start`);
    every weight defaults to the `autoencoder` task's."""

    task: Literal["temporal_decoder"] = "temporal_decoder"
    """Which task trains (the tag of the objective)."""
    loss_type: Literal["l2", "l1"] = "l2"
    """Reconstruction distance."""
    kl_weight: float = field_default(AutoencoderObjective, "kl_weight")
    """KL (regularisation) weight; the frozen encoder makes the term a constant of the run."""
    adv_weight: float = field_default(AutoencoderObjective, "adv_weight")
    """Factor of the adaptive adversarial weight after `disc_start` (the whole weight under ZeRO-3)."""
    disc_start: int = field_default(AutoencoderObjective, "disc_start")
    """Step at which the discriminator starts."""
    perceptual: str | None = None
    """Folder of the perceptual (LPIPS) weights, as the `autoencoder` task's (None: no perceptual term)."""
    perceptual_weight: float = field_default(AutoencoderObjective, "perceptual_weight")
    """Perceptual loss weight when `perceptual` is set."""


Objective = (
    DiffusionObjective
    | LVDMPredictionObjective
    | LVDMInterpolationObjective
    | VideoFusionObjective
    | StreamingObjective
    | CMDAutoencoderObjective
    | CMDContentObjective
    | CMDMotionObjective
    | AutoencoderObjective
    | TemporalDecoderObjective
)
"""The objective of each task, a tagged union: `objective.task` picks the member."""


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
    objective: Objective = field(default_factory=DiffusionObjective)
    """The task and its loss (`objective.task` picks which; each task has its own terms)."""

    def __post_init__(self) -> None:
        if self.train.sp_size > 1 and self.model.family not in SEQUENCE_PARALLEL_FAMILIES:
            raise ValueError(
                f"train.sp_size: sequence parallelism needs a DiT (model.family {' or '.join(SEQUENCE_PARALLEL_FAMILIES)}), "
                f"got model.family={self.model.family}"
            )
        if not self.data.image_shards:
            return
        if self.objective.task not in IMAGE_TASKS:
            raise ValueError(
                f"data.image_shards: the {self.objective.task} task cannot train on images "
                f"(joint image + video training: {', '.join(IMAGE_TASKS)}); remove data.image_shards"
            )
        if self.model.family not in IMAGE_FAMILIES:
            raise ValueError(
                f"data.image_shards: a {self.model.family} network cannot train on images "
                f"(joint image + video training: {', '.join(IMAGE_FAMILIES)}); remove data.image_shards"
            )


SEQUENCE_PARALLEL_FAMILIES = ("dit", "video_dit")
"""Model families whose self-attention can run Ulysses sequence parallelism."""
IMAGE_TASKS = ("diffusion", "lvdm_prediction", "lvdm_interpolation")
"""Tasks that train on the image batches of `data.image_shards` as well as on videos."""
IMAGE_FAMILIES = ("unet3d", "dit", "video_dit")
"""Network families that take image batches: the U-Net with its temporal layers skipped, the
DiTs as one-frame videos."""


LEGACY_VIDEOFUSION_LAMBDA = 0.5
"""`objective.videofusion_lambda` of the older flat objective when not set: the same λ the
VideoFusion model has by default, so an upgraded config only overrides λ when it was changed."""


def upgrade_resolved_config(raw: dict[str, Any]) -> dict[str, Any]:
    """A resolved config as an older `lvd train` wrote it into a checkpoint (`train.task` and one
    flat `objective` section holding every task's terms), in today's shape: `objective.task`,
    only that task's terms, the diffusion terms under `objective.diffusion`, LVDM's under
    `objective.conditioning`, VideoFusion's λ in `model.overrides.lam`. A config already in
    today's shape comes back unchanged, so `lvd export` reads runs of either version."""
    if "task" not in raw.get("train", {}):
        return raw
    upgraded = copy.deepcopy(raw)
    task = upgraded["train"].pop("task")
    old = upgraded.get("objective") or {}
    members = {get_args(get_type_hints(cls)["task"])[0]: cls for cls in get_args(Objective)}
    if task not in members:
        raise ValueError(f"train.task: {task!r} of an older lvd has no objective today (valid: {', '.join(members)})")
    member = members[task]
    names = {spec.name for spec in fields(member)}
    objective: dict[str, Any] = {"task": task, **{name: old[name] for name in names if name in old}}
    if "diffusion" in names:
        objective["diffusion"] = {spec.name: old[spec.name] for spec in fields(DiffusionConfig) if spec.name in old}
    if "conditioning" in names:
        objective["conditioning"] = {spec.name: old[spec.name] for spec in fields(LVDMConditioning) if spec.name in old}
    if task == "videofusion" and old.get("videofusion_lambda", LEGACY_VIDEOFUSION_LAMBDA) != LEGACY_VIDEOFUSION_LAMBDA:
        model = upgraded.setdefault("model", {})
        model["overrides"] = {**(model.get("overrides") or {}), "lam": old["videofusion_lambda"]}
    upgraded["objective"] = objective
    return upgraded
