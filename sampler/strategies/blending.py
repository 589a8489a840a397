"""StreamingT2V's randomised blending for the refinement stage (Henschel et al. 2024, §5;
docs/methods.md §6.4): the refinement math of `--strategy streaming` (`streaming.py`).

The long latent video (L frames, SDEdit-noised to T' < T) is split into chunks of F = 24 frames
overlapping by O = 8. Overlapping frames share their noise (noise is drawn per global frame).
After every denoising step, each overlap takes frames 0..f_thr-1 from chunk i-1 and frames
f_thr..O-1 from chunk i, with f_thr ~ U{0..O} drawn anew per step; both chunks keep the blend.

Work is per chunk so ranks can own chunks: `refine_step` advances the chunks one rank owns and
calls an `OverlapExchange` hook to obtain the neighbours' overlap latents (the sampler program
plugs torch.distributed in there; `local_exchange` serves one process owning every chunk).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from model_zoo.diffusion.samplers import DenoiseFn
from sampler.strategies.common import SamplingSetup, denoise_step, noised_to_first_step
from sampler.strategies.seeding import unit_generator

Overlaps = tuple[dict[int, Tensor], dict[int, Tensor]]
OverlapExchange = Callable[[Mapping[int, Tensor], Mapping[int, Tensor]], Callable[[], Overlaps]]
"""`exchange(tails, heads)` is called as soon as this rank's boundary chunks (those with a
neighbour on another rank) have taken the step, with their last-O (tails) and first-O (heads)
frames keyed by chunk index; it starts sending them and returns `finish()`, which the rank calls
after stepping its interior chunks and which returns the neighbours' overlaps it needs: the tail
of chunk i - 1 and the head of chunk i + 1 for every owned chunk i whose neighbour is elsewhere.
So the transfer overlaps the interior chunks' denoising, and a rank only waits if a neighbour is
more than its interior work behind."""


@dataclass(frozen=True, kw_only=True)
class BlendingConfig:
    """Randomised blending knobs (StreamingT2V's refiner defaults)."""

    blend_frames: int = field(default=24, metadata={"alias": "--F"})
    """F: latent frames per refinement chunk."""
    blend_overlap: int = field(default=8, metadata={"alias": "--O"})
    """O: latent frames shared by consecutive refinement chunks (0 < O, 2·O < F so a chunk's head and tail are apart)."""
    blend: bool = True
    """Randomised blending of the overlaps, whose frames share their noise; --no-blend refines
    every chunk on its own noise, unblended, and concatenates them (the paper's naive-concatenation
    ablation)."""

    def __post_init__(self) -> None:
        if not 0 < 2 * self.blend_overlap < self.blend_frames:
            raise ValueError(f"need 0 < 2*O < F, got O={self.blend_overlap}, F={self.blend_frames}")

    @property
    def blend_stride(self) -> int:
        return self.blend_frames - self.blend_overlap


def num_chunks(num_frames: int, config: BlendingConfig) -> int:
    """Chunks needed to cover `num_frames` (the last chunk may reach past the end: see `split_chunks`)."""
    return max(1, math.ceil((num_frames - config.blend_overlap) / config.blend_stride))


def chunk_span(index: int, config: BlendingConfig) -> tuple[int, int]:
    """[start, end) of chunk `index` in (padded) global frame coordinates."""
    start = index * config.blend_stride
    return start, start + config.blend_frames


def split_chunks(latents: Tensor, config: BlendingConfig) -> list[Tensor]:
    """(B, C, L, h, w) -> overlapping chunks (B, C, F, h, w); the last frame is repeated as padding."""
    padded_length = chunk_span(num_chunks(latents.shape[2], config) - 1, config)[1]
    padding = latents[:, :, -1:].expand(-1, -1, padded_length - latents.shape[2], -1, -1)
    padded = torch.cat([latents, padding], dim=2)  # (B, C, L, h, w) -> (B, C, L_padded, h, w)
    return [padded[:, :, slice(*chunk_span(i, config))] for i in range(num_chunks(latents.shape[2], config))]


def merge_chunks(chunks: Sequence[Tensor], num_frames: int, config: BlendingConfig) -> Tensor:
    """Chunks whose overlaps agree -> (B, C, num_frames, h, w): chunk 0, then each chunk past its overlap."""
    pieces = [chunks[0]] + [chunk[:, :, config.blend_overlap :] for chunk in chunks[1:]]
    return torch.cat(pieces, dim=2)[:, :, :num_frames]


def shared_noise_chunk(index: int, setup: SamplingSetup, config: BlendingConfig, seed: int) -> Tensor:
    """N(0, I) noise of chunk `index`, drawn per global frame: overlapping chunks get the same
    noise (with --no-blend every chunk draws its own)."""
    start, end = chunk_span(index, config)
    stream = "blend-noise" if config.blend else f"blend-noise-chunk-{index}"
    frames = [
        torch.randn(setup.frame_shape, generator=unit_generator(seed, stream, frame), dtype=setup.dtype)
        for frame in range(start, end)
    ]
    return torch.stack(frames, dim=2).to(setup.device)  # F x (B, C, h, w) -> (B, C, F, h, w)


def noised_chunk(
    latents_chunk: Tensor, index: int, setup: SamplingSetup, config: BlendingConfig, seed: int
) -> Tensor:
    """SDEdit start of one chunk: taken to the first step of `setup` by the model's forward process
    (q_sample, or the flow's (1 - t) x_0 + t ε) with the shared noise."""
    noise = shared_noise_chunk(index, setup, config, seed)
    return noised_to_first_step(latents_chunk, noise, setup)


def draw_f_thr(seed: int, step_index: int, config: BlendingConfig) -> int:
    """f_thr ~ U{0..O} for denoising step `step_index`, a pure function of (seed, step)."""
    generator = unit_generator(seed, "blend-fthr", step_index)
    return int(torch.randint(0, config.blend_overlap + 1, (), generator=generator))


def blend_overlap(left_tail: Tensor, right_head: Tensor, f_thr: int) -> Tensor:
    """The overlap after blending: frames [0, f_thr) of chunk i-1's tail, [f_thr, O) of chunk i's head."""
    return torch.cat([left_tail[:, :, :f_thr], right_head[:, :, f_thr:]], dim=2)


def local_exchange(tails: Mapping[int, Tensor], heads: Mapping[int, Tensor]) -> Callable[[], Overlaps]:
    """The exchange of a single process that owns every chunk: it has no boundary chunks and
    nothing to receive."""
    if tails or heads:
        raise ValueError(
            f"one process owns every chunk, yet chunks {sorted({*tails, *heads})} have a neighbour elsewhere"
        )
    return lambda: ({}, {})


def boundary_chunks(owned: Sequence[int], total_chunks: int) -> list[int]:
    """The owned chunks with a neighbour (i - 1 or i + 1, within the video) that is not owned."""
    mine = set(owned)
    return [
        index
        for index in owned
        if (index > 0 and index - 1 not in mine) or (index < total_chunks - 1 and index + 1 not in mine)
    ]


def refine_step(
    denoise_fn: DenoiseFn,
    chunks: Mapping[int, Tensor],
    step_index: int,
    *,
    total_chunks: int,
    setup: SamplingSetup,
    config: BlendingConfig,
    seed: int,
    exchange: OverlapExchange = local_exchange,
) -> tuple[dict[int, Tensor], int]:
    """One denoising step of the owned `chunks` {index: (B, C, F, h, w)}, then randomised blending.

    Returns the new chunks and the f_thr used (drawn, but not applied, with --no-blend). Step noise (η > 0) comes from a per-(chunk, step)
    generator, so the result does not depend on which rank owns which chunk.
    """
    overlap = config.blend_overlap

    def step(index: int) -> Tensor:
        generator = unit_generator(seed, f"blend-step-{step_index}", index)
        return denoise_step(denoise_fn, chunks[index], step_index, setup, generator)

    boundary = boundary_chunks(list(chunks), total_chunks)
    stepped = {index: step(index) for index in boundary}  # first: the neighbours wait for these
    finish = exchange(
        {i: x[:, :, -overlap:] for i, x in stepped.items()},
        {i: x[:, :, :overlap] for i, x in stepped.items()},
    )
    stepped.update({index: step(index) for index in chunks if index not in stepped})
    far_tails, far_heads = finish()
    tails = {**{i: x[:, :, -overlap:] for i, x in stepped.items()}, **far_tails}
    heads = {**{i: x[:, :, :overlap] for i, x in stepped.items()}, **far_heads}
    f_thr = draw_f_thr(seed, step_index, config)
    if not config.blend:
        return {index: stepped[index] for index in chunks}, f_thr
    blended = {}
    for index in chunks:  # in the caller's order
        chunk = stepped[index]
        head = blend_overlap(tails[index - 1], heads[index], f_thr) if index > 0 else chunk[:, :, :overlap]
        tail = (
            blend_overlap(tails[index], heads[index + 1], f_thr)
            if index < total_chunks - 1
            else chunk[:, :, -overlap:]
        )
        blended[index] = torch.cat([head, chunk[:, :, overlap:-overlap], tail], dim=2)
    return blended, f_thr


def randomized_blending(
    denoise_fn: DenoiseFn,
    latents: Tensor,
    *,
    setup: SamplingSetup,
    config: BlendingConfig,
    seed: int,
    callback: Callable[[int, int, dict[int, Tensor]], None] | None = None,
) -> Tensor:
    """Refine a long latent video (B, C, L, h, w) in one process: SDEdit from `setup.timesteps[0]`.

    Pass the tail of a DDIM schedule as `setup.timesteps` (e.g. the steps with t <= T') to start
    the refinement from T'.
    `callback(step_index, f_thr, chunks)` sees the chunks after each step's blending.
    """
    pieces = split_chunks(latents, config)
    chunks = {i: noised_chunk(piece, i, setup, config, seed) for i, piece in enumerate(pieces)}
    for step_index in range(setup.num_steps):
        chunks, f_thr = refine_step(
            denoise_fn, chunks, step_index, total_chunks=len(pieces), setup=setup, config=config, seed=seed
        )
        if callback is not None:
            callback(step_index, f_thr, chunks)
    return merge_chunks([chunks[i] for i in range(len(pieces))], latents.shape[2], config)
