"""`--strategy streaming`: StreamingT2V (Henschel et al. 2024; docs/methods.md, 'StreamingT2V:
sampling and randomised blending').

1. The autoregressive stage. The first chunk comes from the frozen base text-to-video U-Net of
   the StreamingT2V export alone (no CAM, no APM); the decoded first frame of that chunk is the
   anchor, whose CLIP image embedding APM reads for every later chunk. Each later chunk comes
   from the StreamingT2V model, CAM reading the last F_cond latent frames before it.
2. The refinement, by --model2: a text-to-video model trained at the refiner's resolution
   (--refine-size, by default twice --height x --width). The stage-1 video is decoded by --model's
   VAE, bilinearly upsampled to that size and encoded by --model2's VAE; that latent video is
   SDEdit-noised to T' < T and denoised in overlapping chunks with randomised blending
   (`blending.py`). Every rank refines a contiguous block of chunks, exchanging overlap latents
   after every step; --model2's VAE decodes the result, so the mp4 has the refiner's size.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor

from model_zoo.diffusion.samplers import DenoiseFn
from sampler.denoisers import counted, streaming_base_denoiser, streaming_denoiser, text_denoiser
from sampler.distributed import NeighbourExchange, branch_parallel_guide, chunk_owners
from sampler.job import VideoJob
from sampler.pipeline import Pipeline, anchor_embedding, latent_channels, vae_factors
from sampler.strategies import blending
from sampler.strategies.common import SamplingSetup, clip_noise, pipeline_setup, run_sampler, steps_from
from sampler.strategies.seeding import unit_generator
from sampler.work import (
    UNIT_TIMEOUT,
    State,
    Stepper,
    decoded_lengths,
    read_chunks,
    run_chunks,
    run_chunks_to_video,
    write_pieces,
)

ConditionedDenoiser = Callable[[Tensor, Tensor], DenoiseFn]
"""`conditioned(cond_latents (B, C, F_cond, h, w), anchor (B, D)) -> denoise_fn` of the StreamingT2V model."""
REFINE_SCALE = 2
"""The refiner's size when --refine-size is not given: this many times --height and --width."""


@dataclass(frozen=True, kw_only=True)
class StreamingConfig(blending.BlendingConfig):
    """StreamingT2V's knobs: the autoregressive stage's chunk length, and the refinement's."""

    clip_frames: int = field(default=16, metadata={"alias": "--N"})
    """Latent frames per chunk of the autoregressive stage (the model's temporal length)."""
    refine_t: int = 600
    """T': SDEdit start timestep of the refinement (it runs --model2's DDIM steps with t <= T' < T)."""
    refine_size: str | None = field(
        default=None, metadata={"flag_default": f"{REFINE_SCALE}x --height and --width"}
    )
    """HEIGHTxWIDTH pixels of the refined video, e.g. 512x512: the size --model2 was trained at."""
    refine: bool = True
    """Run the refinement by --model2 after the autoregressive stage."""
    apm: bool = True
    """APM: the chunks after the first attend to the anchor frame's image embedding; --no-apm
    samples them with the text context alone (the model without APM, its ablation)."""

    def __post_init__(self) -> None:
        if self.refine:
            super().__post_init__()
        if self.refine_size is not None:
            parse_size(self.refine_size)


def parse_size(text: str) -> tuple[int, int]:
    """'HEIGHTxWIDTH' -> (height, width)."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if match is None or 0 in (int(match[1]), int(match[2])):
        raise ValueError(f"--refine-size {text!r}: give HEIGHTxWIDTH in pixels, e.g. 512x512")
    return int(match[1]), int(match[2])


def refine_size(config: StreamingConfig, height: int, width: int) -> tuple[int, int]:
    """(height, width) of the refined video for a stage-1 video of height x width pixels."""
    if config.refine_size is None:
        return REFINE_SCALE * height, REFINE_SCALE * width
    return parse_size(config.refine_size)


def anchor_of(pipeline: Pipeline, latent_frame: Tensor) -> Tensor:
    """APM's anchor: the embedding of the decoded first frame (1, C, 1, h, w) of the video."""
    return anchor_embedding(pipeline, pipeline.vae.from_latents(latent_frame)[:, :, 0])  # (1, 3, H, W)


def check_lengths(config: StreamingConfig, cond_frames: int) -> None:
    """CAM reads the last F_cond frames of one chunk: a chunk must have them."""
    if config.clip_frames < cond_frames:
        raise ValueError(
            f"--clip-frames {config.clip_frames} is shorter than the model's F_cond = {cond_frames}"
        )


def stage_step(
    base: DenoiseFn,
    conditioned: ConditionedDenoiser,
    anchor_from: Callable[[Tensor], Tensor],
    index: int,
    state: State | None,
    *,
    cond_frames: int,
    setup: SamplingSetup,
    config: StreamingConfig,
    seed: int,
) -> tuple[Tensor, State]:
    """Chunk `index` of the autoregressive stage, and the next chunk's state: CAM's `cond` latents
    and APM's `anchor`. Chunk 0 (no state) comes from the `base` alone and sets the anchor."""
    generator = unit_generator(seed, "streaming-chunk", index)
    x_T = clip_noise(setup, config.clip_frames, generator)
    if state is None:
        chunk = run_sampler(base, x_T, setup, generator)
        anchor = anchor_from(chunk[:, :, :1])
    else:
        anchor = state["anchor"]
        chunk = run_sampler(conditioned(state["cond"], anchor), x_T, setup, generator)
    return chunk, {"cond": chunk[:, :, -cond_frames:], "anchor": anchor}


def stream(
    base: DenoiseFn,
    conditioned: ConditionedDenoiser,
    anchor_from: Callable[[Tensor], Tensor],
    *,
    cond_frames: int,
    num_frames: int,
    setup: SamplingSetup,
    config: StreamingConfig,
    seed: int,
) -> Tensor:
    """The autoregressive stage's latent video (B, C, num_frames, h, w) in one process."""
    check_lengths(config, cond_frames)
    state: State | None = None
    chunks = []
    for index in range(math.ceil(num_frames / config.clip_frames)):
        chunk, state = stage_step(
            base,
            conditioned,
            anchor_from,
            index,
            state,
            cond_frames=cond_frames,
            setup=setup,
            config=config,
            seed=seed,
        )
        chunks.append(chunk)
    return torch.cat(chunks, dim=2)[:, :, :num_frames]


def upsample_latents(
    pipeline: Pipeline, pipeline2: Pipeline, latents: Tensor, *, frames: int, size: tuple[int, int], seed: int
) -> Tensor:
    """The stage-1 latents (1, C, L, h, w) as --model2's latents of the video upsampled to `size`:
    decoded by --model's VAE to `frames` pixel frames, bilinearly resized frame by frame, encoded
    by --model2's VAE (the last frame repeated up to a multiple of its time factor)."""
    video = pipeline.vae.from_latents(latents)[:, :, :frames].clamp(-1, 1)  # (1, 3, frames, H, W)
    batch = video.shape[0]
    pictures = video.transpose(1, 2).flatten(0, 1)  # (frames, 3, H, W)
    pictures = F.interpolate(pictures, size=size, mode="bilinear", align_corners=False)  # (frames, 3, H', W')
    video = pictures.unflatten(0, (batch, frames)).transpose(1, 2)  # (1, 3, frames, H', W')
    padding = -frames % vae_factors(pipeline2.vae)[0]
    video = torch.cat([video, video[:, :, -1:].expand(-1, -1, padding, -1, -1)], dim=2)
    seeded = unit_generator(seed, "refine-encode").initial_seed()
    generator = torch.Generator(device=video.device).manual_seed(seeded)  # to_latents samples there
    return pipeline2.vae.to_latents(video, generator)  # (1, C2, ceil(frames / f_t), H' / f_h, W' / f_w)


def refinement_steps(setup: SamplingSetup, refine_t: int) -> SamplingSetup:
    """The refinement's run: the steps with t <= T' (a flow-matching model's t' · T <= T')."""
    return steps_from(setup, int((setup.timesteps > refine_t).sum()))


def refiner_setup(job: VideoJob, config: StreamingConfig) -> SamplingSetup:
    """--model2's DDIM steps with t <= T' on latents of the refiner's size; refuses a missing or
    unfit --model2 with the flags and values that do not fit."""
    pipeline2 = job.pipeline2
    if pipeline2 is None:
        raise ValueError(
            "--strategy streaming refines with --model2, a text-to-video export trained at the refiner's "
            "size: give --model2 PATH, or --no-refine"
        )
    height, width = size = refine_size(config, job.config.height, job.config.width)
    given = f"--refine-size {height}x{width}" + (
        "" if config.refine_size else f" ({REFINE_SCALE}x --height and --width)"
    )
    if pipeline2.trained_size not in (None, size):
        trained = "x".join(map(str, pipeline2.trained_size))
        raise ValueError(
            f"--model2 {pipeline2.path} was trained at {trained}, but the refiner runs at {given}"
        )
    _, factor_h, factor_w = vae_factors(pipeline2.vae)
    if height % factor_h or width % factor_w:
        raise ValueError(f"{given}: not a multiple of --model2's VAE factors ({factor_h}, {factor_w})")
    channels, wanted = latent_channels(pipeline2.vae), pipeline2.denoiser.config.in_channels
    if channels != wanted:
        raise ValueError(
            f"--model2 {pipeline2.path}: its denoiser takes {wanted} latent channels, its VAE gives {channels}"
        )
    num_train_timesteps = pipeline2.num_train_timesteps
    if not 0 <= config.refine_t < num_train_timesteps:
        raise ValueError(
            f"--refine-t {config.refine_t}: T' must be in [0, T) with T = {num_train_timesteps} (--model2)"
        )
    setup = pipeline_setup(
        pipeline2,
        height=height,
        width=width,
        steps=job.config.steps,
        eta=job.config.eta,
        device=job.setup.device,
    )
    steps = refinement_steps(setup, config.refine_t)
    if steps.num_steps == 0:
        raise ValueError(
            f"--refine-t {config.refine_t}: no DDIM step of --steps {job.config.steps} is at or below it"
        )
    return steps


def refiner_job(job: VideoJob, config: StreamingConfig) -> VideoJob:
    """The video's job as the refinement sees it: --model2's pipeline, DDIM steps and latent length."""
    setup = refiner_setup(job, config)
    assert job.pipeline2 is not None  # refiner_setup refuses a missing --model2
    latent_frames = math.ceil(job.config.frames / vae_factors(job.pipeline2.vae)[0])
    return replace(job, pipeline=job.pipeline2, setup=setup, latent_frames=latent_frames)


def stepper(job: VideoJob, config: StreamingConfig) -> Stepper:
    """The autoregressive stage's chunks one by one; the state is CAM's latents and APM's anchor."""
    pipeline, prompt, guidance = job.pipeline, job.prompt, job.config.guidance
    tick = job.tick_steps()
    guide = branch_parallel_guide(job.world)
    base = counted(streaming_base_denoiser(pipeline, prompt, guidance, guide), tick)

    def conditioned(cond: Tensor, anchor: Tensor) -> DenoiseFn:
        denoise = streaming_denoiser(
            pipeline, prompt, guidance, cond_latents=cond, anchor=anchor if config.apm else None, guide=guide
        )
        return counted(denoise, tick)

    return partial(
        stage_step,
        base,
        conditioned,
        partial(anchor_of, pipeline),
        cond_frames=pipeline.denoiser.config.cond_frames,
        setup=job.setup,
        config=config,
        seed=job.seed,
    )


def upsampled(job: VideoJob, refiner: VideoJob, config: StreamingConfig, latents: Tensor) -> Tensor:
    """The stage-1 video as --model2's latents at the refiner's size (`upsample_latents`), made
    once by the video's owner and saved as a unit."""
    if job.is_owner and not job.store.has("upsampled"):
        size = refine_size(config, job.config.height, job.config.width)
        with job.timed("upsample"):
            video = upsample_latents(
                job.pipeline, refiner.pipeline, latents, frames=job.config.frames, size=size, seed=job.seed
            )
        job.store.save("upsampled", {"latents": video})
    job.world.barrier()
    return job.store.read("upsampled")["latents"].to(job.setup.device)


def refine(refiner: VideoJob, config: StreamingConfig, latents: Tensor) -> int:
    """Randomised blending by --model2 over the chunks this rank owns; each refined chunk goes to
    `.parts/`. Returns the number of chunks of the whole video."""
    total = blending.num_chunks(latents.shape[2], config)
    if all(refiner.store.has(f"refined-{index:05d}") for index in range(total)):
        return total
    setup, world, seed = refiner.setup, refiner.world, refiner.seed
    pieces = blending.split_chunks(latents, config)
    chunks = {i: blending.noised_chunk(pieces[i], i, setup, config, seed) for i in world.block(total)}
    denoise = counted(
        text_denoiser(refiner.pipeline, refiner.prompt, refiner.config.guidance), refiner.tick_steps()
    )
    exchange = (
        NeighbourExchange(world, chunk_owners(world, total)) if world.size > 1 else blending.local_exchange
    )
    bar = refiner.progress("refine steps", setup.num_steps)
    with refiner.timed("refine"):
        for step_index in range(setup.num_steps):
            chunks, _ = blending.refine_step(
                denoise,
                chunks,
                step_index,
                total_chunks=total,
                setup=setup,
                config=config,
                seed=seed,
                exchange=exchange,
            )
            bar.update()
    bar.close()
    for index, chunk in chunks.items():
        refiner.store.save(f"refined-{index:05d}", {"latents": chunk})
    return total


def write_refined(refiner: VideoJob, config: StreamingConfig, total: int) -> None:
    """The refined chunks into the mp4 by --model2's VAE, claimed piece by piece by every rank."""
    overlap = config.blend_overlap

    def chunk(index: int) -> Tensor:
        """Refined chunk `index`; a rank that goes on to another rank's chunks may wait for the file."""
        name = f"refined-{index:05d}"
        if not refiner.store.has(name):
            with refiner.timed("wait"):
                refiner.store.wait_for(name, timeout=UNIT_TIMEOUT)
        return refiner.store.read(name)["latents"].to(refiner.setup.device)

    def piece(index: int) -> Tensor:
        """Refined chunk `index` without the overlap it shares with the chunk before."""
        return chunk(index) if index == 0 else chunk(index)[:, :, overlap:]

    def context(index: int) -> Tensor:
        """The end of piece index - 1, which is the blended overlap chunk `index` begins with (with
        --no-blend, chunk `index`'s own head): a rank starts decoding its own chunks without
        waiting for its neighbour's file."""
        if refiner.config.decode_context > overlap:
            return piece(index - 1)[:, :, : kept[index - 1]]
        return chunk(index)[:, :, :overlap]

    lengths = [config.blend_frames] + [config.blend_stride] * (total - 1)
    kept = decoded_lengths(lengths, refiner.latent_frames)
    write_pieces(refiner, piece, lengths, context=context, first=refiner.world.block(total).start)


def run(job: VideoJob, config: StreamingConfig) -> None:
    """The autoregressive stage in lockstep on every rank, then the upsampling by the owner, the
    refinement split over the ranks, and the refined chunks' VAE decoding claimed piece by piece
    by every rank."""
    check_lengths(config, job.pipeline.denoiser.config.cond_frames)
    num_chunks = math.ceil(job.latent_frames / config.clip_frames)
    if not config.refine:
        run_chunks_to_video(job, "stream", stepper(job, config), num_chunks)
        return
    refiner = refiner_job(job, config)
    run_chunks(job, "stream", stepper(job, config), num_chunks, lambda _: None)
    job.world.barrier()
    latents = upsampled(job, refiner, config, read_chunks(job, "stream", num_chunks, job.latent_frames))
    write_refined(refiner, config, refine(refiner, config, latents))
