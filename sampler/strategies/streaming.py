"""`--strategy streaming`: StreamingT2V (Henschel et al. 2024; docs/methods.md §6.4).

1. The autoregressive stage: chunks of the StreamingT2V model, each conditioned by CAM on the last
   F_cond latent frames before it and by APM on the anchor (the CLIP image embedding of the
   video's first frame). The first chunk has no past: CAM reads zero latents and APM the
   embedding of a mid-grey frame (the paper makes it with the plain base model instead).
2. The refinement: the whole latent video SDEdit-noised to T' and denoised in overlapping chunks
   with randomised blending (`blending.py`), by --model2 if given, else the StreamingT2V model with
   empty CAM memory. Every rank refines a contiguous block of chunks, exchanging overlap latents
   after every step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial

import torch
from torch import Tensor

from model_zoo.diffusion.samplers import DenoiseFn
from sampler.denoisers import counted, streaming_denoiser, text_denoiser
from sampler.distributed import NeighbourExchange, branch_parallel_guide, chunk_owners
from sampler.job import VideoJob
from sampler.pipeline import Pipeline, anchor_embedding
from sampler.strategies import blending
from sampler.strategies.common import SamplingSetup, clip_noise, run_ddim
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
"""`conditioned(cond_latents (B, C, F_cond, h, w), anchor (B, D)) -> denoise_fn` of the stage's model."""


@dataclass(frozen=True, kw_only=True)
class StreamingConfig(blending.BlendingConfig):
    """StreamingT2V's knobs: the autoregressive stage's chunk length, and the refinement's."""

    clip_frames: int = field(default=16, metadata={"alias": "--N"})
    """Latent frames per chunk of the autoregressive stage (the model's temporal length)."""
    refine_t: int = 600
    """T': SDEdit start timestep of the refinement (it runs the DDIM steps with t <= T')."""
    refine: bool = True
    """Run the randomised-blending refinement after the autoregressive stage."""

    def __post_init__(self) -> None:
        if self.refine:
            super().__post_init__()


def first_anchor(pipeline: Pipeline, height: int, width: int, device: str) -> Tensor:
    """APM's anchor before the first chunk exists: the embedding of a mid-grey frame."""
    return anchor_embedding(pipeline, torch.zeros(1, 3, height, width, device=device))


def anchor_of(pipeline: Pipeline, latent_frame: Tensor) -> Tensor:
    """APM's anchor: the embedding of the decoded first frame (1, C, 1, h, w) of the video."""
    return anchor_embedding(pipeline, pipeline.vae.from_latents(latent_frame)[:, :, 0])  # (1, 3, H, W)


def stage_step(
    conditioned: ConditionedDenoiser,
    anchor_from: Callable[[Tensor], Tensor],
    index: int,
    cond: Tensor,
    anchor: Tensor,
    *,
    setup: SamplingSetup,
    config: StreamingConfig,
    seed: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """Chunk `index` of the autoregressive stage, given CAM's `cond` latents and APM's `anchor`;
    returns the chunk and the next chunk's `cond` and `anchor` (set from chunk 0's first frame)."""
    denoise = conditioned(cond, anchor)
    generator = unit_generator(seed, "streaming-chunk", index)
    x_T = clip_noise(setup, config.clip_frames, generator)
    chunk = run_ddim(denoise, x_T, setup, generator)
    if index == 0:
        anchor = anchor_from(chunk[:, :, :1])
    return chunk, torch.cat([cond, chunk], dim=2)[:, :, -cond.shape[2] :], anchor


def refine_setup(setup: SamplingSetup, config: StreamingConfig) -> SamplingSetup:
    """The refinement's DDIM run: the steps with t <= T'."""
    return replace(setup, timesteps=setup.timesteps[setup.timesteps <= config.refine_t])


def streaming(
    conditioned: ConditionedDenoiser,
    anchor_from: Callable[[Tensor], Tensor],
    refiner_for: Callable[[Tensor], DenoiseFn],
    *,
    start_anchor: Tensor,
    cond_frames: int,
    num_frames: int,
    setup: SamplingSetup,
    config: StreamingConfig,
    seed: int,
) -> Tensor:
    """A long latent video (B, C, num_frames, h, w) in one process: the autoregressive stage,
    then (if `config.refine`) the refinement by `refiner_for(anchor)`."""
    cond = torch.zeros(setup.clip_shape(cond_frames), dtype=setup.dtype, device=setup.device)
    anchor, chunks = start_anchor, []
    for index in range(math.ceil(num_frames / config.clip_frames)):
        chunk, cond, anchor = stage_step(
            conditioned, anchor_from, index, cond, anchor, setup=setup, config=config, seed=seed
        )
        chunks.append(chunk)
    latents = torch.cat(chunks, dim=2)[:, :, :num_frames]
    if not config.refine:
        return latents
    return blending.randomized_blending(
        refiner_for(anchor), latents, setup=refine_setup(setup, config), config=config, seed=seed
    )


def stepper(job: VideoJob, config: StreamingConfig) -> Stepper:
    """The autoregressive stage's chunks one by one; the state is CAM's latents and APM's anchor."""
    pipeline, setup = job.pipeline, job.setup
    cond_frames = pipeline.denoiser.config.cond_frames
    tick = job.tick_steps()
    guide = branch_parallel_guide(job.world)

    def conditioned(cond: Tensor, anchor: Tensor) -> DenoiseFn:
        denoise = streaming_denoiser(
            pipeline, job.prompt, job.config.guidance, cond_latents=cond, anchor=anchor, guide=guide
        )
        return counted(denoise, tick)

    def step(index: int, state: State | None) -> tuple[Tensor, State]:
        if state is None:
            cond = torch.zeros(setup.clip_shape(cond_frames), dtype=setup.dtype, device=setup.device)
            anchor = first_anchor(pipeline, job.config.height, job.config.width, setup.device)
        else:
            cond, anchor = state["cond"], state["anchor"]
        chunk, cond, anchor = stage_step(
            conditioned, partial(anchor_of, pipeline), index, cond, anchor, setup=setup, config=config, seed=job.seed
        )
        return chunk, {"cond": cond, "anchor": anchor}

    return step


def refiner_denoiser(job: VideoJob, anchor: Tensor) -> DenoiseFn:
    """--model2 (a text-to-video pipeline) if given, else the StreamingT2V model with empty CAM memory."""
    if job.pipeline2 is not None:
        return text_denoiser(job.pipeline2, job.prompt, job.config.guidance)
    cond_frames = job.pipeline.denoiser.config.cond_frames
    empty = torch.zeros(job.setup.clip_shape(cond_frames), dtype=job.setup.dtype, device=job.setup.device)
    return streaming_denoiser(job.pipeline, job.prompt, job.config.guidance, cond_latents=empty, anchor=anchor)


def refine(job: VideoJob, config: StreamingConfig, latents: Tensor, anchor: Tensor) -> int:
    """Randomised blending over the chunks this rank owns; each refined chunk goes to `.parts/`.
    Returns the number of chunks of the whole video."""
    total = blending.num_chunks(latents.shape[2], config)
    if all(job.store.has(f"refined-{index:05d}") for index in range(total)):
        return total
    setup = refine_setup(job.setup, config)
    pieces = blending.split_chunks(latents, config)
    chunks = {i: blending.noised_chunk(pieces[i], i, setup, config, job.seed) for i in job.world.block(total)}
    denoise = counted(refiner_denoiser(job, anchor), job.tick_steps())
    exchange = (
        NeighbourExchange(job.world, chunk_owners(job.world, total)) if job.world.size > 1 else blending.local_exchange
    )
    bar = job.progress("refine steps", setup.num_steps)
    with job.timed("refine"):
        for step_index in range(setup.num_steps):
            chunks, _ = blending.refine_step(
                denoise, chunks, step_index, total_chunks=total, setup=setup, config=config, seed=job.seed, exchange=exchange
            )
            bar.update()
    bar.close()
    for index, chunk in chunks.items():
        job.store.save(f"refined-{index:05d}", {"latents": chunk})
    return total


def run(job: VideoJob, config: StreamingConfig) -> None:
    """The autoregressive stage in lockstep on every rank, then the refinement split over the
    ranks, then the refined chunks' VAE decoding claimed piece by piece by every rank."""
    num_chunks = math.ceil(job.latent_frames / config.clip_frames)
    if not config.refine:
        run_chunks_to_video(job, "stream", stepper(job, config), num_chunks)
        return
    run_chunks(job, "stream", stepper(job, config), num_chunks, lambda _: None)
    job.world.barrier()
    latents = read_chunks(job, "stream", num_chunks, job.latent_frames)
    anchor = job.store.read(f"stream-{num_chunks - 1:05d}")["anchor"].to(job.setup.device)
    total = refine(job, config, latents, anchor)
    overlap = config.blend_overlap

    def chunk(index: int) -> Tensor:
        """Refined chunk `index`; a rank that goes on to another rank's chunks may wait for the file."""
        name = f"refined-{index:05d}"
        if not job.store.has(name):
            with job.timed("wait"):
                job.store.wait_for(name, timeout=UNIT_TIMEOUT)
        return job.store.read(name)["latents"].to(job.setup.device)

    def piece(index: int) -> Tensor:
        """Refined chunk `index` without the overlap it shares with the chunk before."""
        return chunk(index) if index == 0 else chunk(index)[:, :, overlap:]

    def context(index: int) -> Tensor:
        """The end of piece index - 1, which is the blended overlap chunk `index` begins with: a
        rank starts decoding its own chunks without waiting for its neighbour's file."""
        if job.config.decode_context > overlap:
            return piece(index - 1)[:, :, : kept[index - 1]]
        return chunk(index)[:, :, :overlap]

    lengths = [config.blend_frames] + [config.blend_stride] * (total - 1)
    kept = decoded_lengths(lengths, job.latent_frames)
    write_pieces(job, piece, lengths, context=context, first=job.world.block(total).start)
