"""`--strategy cmd`: CMD's generation, content frame then motion latent then decoding (Yu et al.
2024, "Efficient Video Diffusion Models via Content-Frame Motion-Latent Decomposition", §3.2;
docs/methods.md, 'CMD: sampling').

A video is made in chunks of `clip_frames` frames (the autoencoder does not downsample time, so
latent and pixel frames are the same). Chunk i:
1. its content frame c_i: the content-frame model's DDIM run with text guidance on the frame's
   space-to-depth (B, 3p², 1, H/p, W/p), from noise for chunk 0; for later chunks from c_{i-1},
   noised to the level of the last ⌈s·S⌉ of the S DDIM steps and denoised through them (SDEdit,
   `content_strength` s), so each chunk's content is conditioned on the previous chunk's (s = 0
   keeps c_{i-1});
2. its motion latent: the motion DiT's DDIM run on the packed motion (B, m, L, 1, h + w) from noise,
   with c_i as its dense condition and text guidance;
3. its pixels: the autoencoder decodes (c_i, unpack_motion(motion)).
The unit of work is a chunk; what `.parts/` keeps of it is its decoded pixels (in the unit's
`latents` slot: CMD has no latent video to decode later, and its chunks need no decoding context)
and its content frame, the state the next chunk starts from.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor, nn

from common.pipeline_folder import read_index
from model_zoo.cmd import content_condition, content_grid, motion_grid, unpack_motion, unpatchify_content
from model_zoo.diffusion.objectives import q_sample
from model_zoo.diffusion.samplers import DenoiseFn
from sampler.denoisers import conditioned_denoiser, counted
from sampler.distributed import branch_parallel_guide
from sampler.job import VideoJob
from sampler.pipeline import vae_factors
from sampler.strategies.common import SamplingSetup, clip_noise, run_sampler
from sampler.strategies.seeding import unit_generator
from sampler.video_io import Mp4Writer, to_uint8_frames
from sampler.work import State, run_chunks

ToImage = Callable[[Tensor], Tensor]
"""What the content model generates (B, 3p², h, w), or with a `content_vae` its latents
(B, c, H/f, W/f) -> the content frame (B, 3, H, W)."""
MotionDenoisers = Callable[[Tensor], DenoiseFn]
"""Content frame (B, 3, H, W) -> the motion DiT's `denoise_fn(x, t)` conditioned on it."""
Decode = Callable[[Tensor, Tensor], Tensor]
"""(content frame (B, 3, H, W), packed motion (B, m, L, 1, h + w)) -> clip (B, 3, L, H, W)."""


@dataclass(frozen=True, kw_only=True)
class CMDSamplingConfig:
    """CMD's chunked sampling knobs."""

    clip_frames: int | None = field(default=None, metadata={"alias": "--N"})
    """Frames per chunk; None: the clip length the motion DiT was trained on (the export's)."""
    content_strength: float = 0.5
    """s in [0, 1]: share of the content model's DDIM steps rerun, from the previous chunk's content
    frame noised to that level, for each chunk after the first (0 keeps that content frame)."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.content_strength <= 1.0:
            raise ValueError(f"content_strength: must be in [0, 1], got {self.content_strength}")
        if self.clip_frames is not None and self.clip_frames < 1:
            raise ValueError(f"clip_frames: must be >= 1, got {self.clip_frames}")


def content_frame(
    content_fn: DenoiseFn, index: int, previous: Tensor | None, *, setup: SamplingSetup, strength: float, seed: int
) -> Tensor:
    """The content model's sample (B, 3p², 1, h, w) for chunk `index`: from noise, or from `previous` (SDEdit)."""
    generator = unit_generator(seed, "cmd-content", index)
    noise = clip_noise(setup, 1, generator)
    if previous is None:
        return run_sampler(content_fn, noise, setup, generator)
    rerun = math.ceil(strength * setup.num_steps)
    if rerun == 0:
        return previous
    timesteps = setup.timesteps[-rerun:]
    start = q_sample(previous, int(timesteps[0]), noise, setup.alphas_cumprod)
    return run_sampler(content_fn, start, replace(setup, timesteps=timesteps), generator)


def chunk(
    content_fn: DenoiseFn,
    to_image: ToImage,
    motion_fns: MotionDenoisers,
    decode: Decode,
    index: int,
    previous: Tensor | None,
    num_frames: int,
    *,
    content_setup: SamplingSetup,
    setup: SamplingSetup,
    config: CMDSamplingConfig,
    seed: int,
) -> tuple[Tensor, Tensor]:
    """Chunk `index`: its decoded clip (B, 3, num_frames, H, W) in [-1, 1] and the content model's sample."""
    content = content_frame(content_fn, index, previous, setup=content_setup, strength=config.content_strength, seed=seed)
    image = to_image(content[:, :, 0])  # (B, 3, H, W)
    generator = unit_generator(seed, "cmd-motion", index)
    motion = run_sampler(motion_fns(image), clip_noise(setup, num_frames, generator), setup, generator)
    return decode(image, motion).clamp(-1, 1), content


def cmd_video(
    content_fn: DenoiseFn,
    to_image: ToImage,
    motion_fns: MotionDenoisers,
    decode: Decode,
    *,
    num_frames: int,
    clip_frames: int,
    content_setup: SamplingSetup,
    setup: SamplingSetup,
    config: CMDSamplingConfig,
    seed: int,
) -> Tensor:
    """The whole video (B, 3, num_frames, H, W) in one process: the reference of `run`."""
    clips, previous = [], None
    for index in range(math.ceil(num_frames / clip_frames)):
        clip, previous = chunk(
            content_fn, to_image, motion_fns, decode, index, previous, clip_frames,
            content_setup=content_setup, setup=setup, config=config, seed=seed,
        )
        clips.append(clip)
    return torch.cat(clips, dim=2)[:, :, :num_frames]


def sampling_setups(job: VideoJob) -> tuple[SamplingSetup, SamplingSetup]:
    """The content model's DDIM run (its own schedule, on (B, 3p², 1, h, w)) and the motion DiT's
    (on the packed motion's frames), with the job's steps and η."""
    schedule, config = job.pipeline.content_schedule, job.pipeline.vae.config
    if schedule is None:
        raise ValueError(f"{job.pipeline.path}: a cmd export has a content_scheduler; this one has none")
    height, width, batch = job.config.height, job.config.width, job.setup.frame_shape[0]
    content_vae = job.pipeline.networks.get("content_vae")
    grid = content_grid(config, height, width) if content_vae is None else image_latent_grid(content_vae, height, width)
    content = replace(
        job.setup,
        timesteps=schedule.timesteps(job.config.steps),
        alphas_cumprod=schedule.alphas_cumprod,
        parameterization=schedule.parameterization,
        final_alpha_cumprod=schedule.final_alpha_cumprod,
        frame_shape=(batch, *grid),
    )
    return content, replace(job.setup, frame_shape=(batch, *motion_grid(config, height, width)))


def chunk_frames(job: VideoJob, config: CMDSamplingConfig) -> int:
    """Frames per chunk: the config's, else the export's training clip length."""
    if config.clip_frames is not None:
        return config.clip_frames
    return int(read_index(job.pipeline.path).entries["sample_size"]["frames"])


def pipeline_parts(job: VideoJob) -> tuple[DenoiseFn, ToImage, MotionDenoisers, Decode]:
    """The job's content denoiser, content-to-image map, motion denoisers and decoder, with the
    prompt and guidance bound."""
    pipeline, guide, tick = job.pipeline, branch_parallel_guide(job.world), job.tick_steps()
    patch, rows = pipeline.vae.config.patch_size, job.config.height // pipeline.vae.config.patch_size
    content_fn = conditioned_denoiser(pipeline.networks["content_denoiser"], pipeline, job.prompt, job.config.guidance, guide)

    def motion_fns(content: Tensor) -> DenoiseFn:
        cond_frame = content_condition(content, patch)  # (B, 3p², 1, h + w)
        return counted(conditioned_denoiser(pipeline.denoiser, pipeline, job.prompt, job.config.guidance, guide, cond_frame=cond_frame), tick)

    def decode(content: Tensor, motion: Tensor) -> Tensor:
        return pipeline.vae.decode(content, unpack_motion(motion, rows))

    content_vae = pipeline.networks.get("content_vae")
    if content_vae is None:
        return counted(content_fn, tick), lambda patches: unpatchify_content(patches, patch), motion_fns, decode
    return counted(content_fn, tick), lambda latent: content_vae.from_latents(latent[:, :, None])[:, :, 0], motion_fns, decode


def image_latent_grid(vae: nn.Module, height: int, width: int) -> tuple[int, int, int]:
    """(channels, rows, columns) of an image VAE's latents of an H x W content frame."""
    factor = vae_factors(vae)[1]
    return (int(vae.config.latent_channels), height // factor, width // factor)


def run(job: VideoJob, config: CMDSamplingConfig) -> None:
    """The chunks in order, each a resumable unit (its pixels and content frame); the owner writes
    each chunk's frames into the mp4 as it comes, cut to `frames`."""
    content_fn, to_image, motion_fns, decode = pipeline_parts(job)
    (content_setup, motion_setup), frames = sampling_setups(job), chunk_frames(job, config)
    writer = Mp4Writer(job.out, job.config.fps) if job.is_owner else None
    remaining = job.config.frames

    def step(index: int, state: State | None) -> tuple[Tensor, State]:
        previous = None if state is None else state["content"]
        clip, content = chunk(
            content_fn, to_image, motion_fns, decode, index, previous, frames,
            content_setup=content_setup, setup=motion_setup, config=config, seed=job.seed,
        )
        return clip, {"content": content}

    def sink(clip: Tensor) -> None:
        nonlocal remaining
        if writer is not None and remaining > 0:
            with job.timed("encode"):
                writer.write(to_uint8_frames(clip[:, :, :remaining]))
        remaining -= clip.shape[2]

    run_chunks(job, "chunk", step, math.ceil(job.config.frames / frames), sink)
    if writer is not None:
        writer.close()
