"""`--strategy lvdm-autoregressive`: LVDM's autoregressive prediction (He et al. 2022, §3.4;
docs/methods.md §6.1). The first clip of l latent frames unconditionally (or, with --image,
conditioned on the image's latent in its first k frames), then each clip conditioned on the last k
frames of the clip before; every clip adds l - k frames.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import Tensor

from model_zoo.diffusion.guidance import Guide, cfg
from model_zoo.diffusion.objectives import build_mask
from sampler.denoisers import counted, lvdm_predict_fn
from sampler.distributed import branch_parallel_guide
from sampler.job import VideoJob
from sampler.strategies.common import SamplingSetup
from sampler.strategies.lvdm import LVDMConfig, MaskedPredictFn, sample_masked_clip
from sampler.strategies.seeding import unit_generator
from sampler.work import State, Stepper, run_chunks_to_video


def autoregressive_clip(
    predict_fn: MaskedPredictFn,
    context: Tensor | None,
    clip_index: int,
    *,
    setup: SamplingSetup,
    config: LVDMConfig,
    seed: int,
    guide: Guide = cfg,
) -> Tensor:
    """Clip `clip_index` (B, C, l, h, w): unconditional if `context` is None, else conditioned
    (mask 1) on the last k frames of `context`. Its first k frames are the model's outputs at the
    conditioned positions; the new frames are the last l - k (all l for the first clip)."""
    clip_frames, cond_frames = config.clip_frames, config.cond_frames
    if not 0 < cond_frames < clip_frames:
        raise ValueError(f"need 0 < k < l, got k={cond_frames}, l={clip_frames}")
    generator = unit_generator(seed, "lvdm-clip", clip_index)
    given = torch.zeros(setup.clip_shape(clip_frames), dtype=setup.dtype, device=setup.device)
    mask = torch.zeros(clip_frames)
    if context is not None:
        given[:, :, :cond_frames] = context[:, :, -cond_frames:]
        mask = build_mask("prediction", clip_frames, cond_frames)
    return sample_masked_clip(
        predict_fn, given, mask, setup=setup, config=config, generator=generator, guide=guide
    )


def autoregressive_clips(
    predict_fn: MaskedPredictFn,
    *,
    setup: SamplingSetup,
    config: LVDMConfig,
    seed: int,
    context: Tensor | None = None,
    start_clip: int = 0,
) -> Iterator[Tensor]:
    """Endless new latent frames, clip by clip: l for the first clip, then l - k per clip.

    Resume by passing the previous clip (at least its last k frames) as `context` with the
    index of the next clip as `start_clip`.
    """
    clip_index = start_clip
    while True:
        clip = autoregressive_clip(predict_fn, context, clip_index, setup=setup, config=config, seed=seed)
        new_frames = clip if context is None else clip[:, :, config.cond_frames :]
        context = clip
        clip_index += 1
        yield new_frames


def autoregressive(
    predict_fn: MaskedPredictFn, *, num_frames: int, setup: SamplingSetup, config: LVDMConfig, seed: int
) -> Tensor:
    """A long latent video (B, C, num_frames, h, w) by LVDM's autoregressive prediction, in one process."""
    clips = autoregressive_clips(predict_fn, setup=setup, config=config, seed=seed)
    frames, total = [], 0
    while total < num_frames:
        frames.append(next(clips))
        total += frames[-1].shape[2]
    return torch.cat(frames, dim=2)[:, :, :num_frames]


def num_clips(config: LVDMConfig, num_frames: int) -> int:
    """Clips of LVDM autoregressive prediction for `num_frames` latent frames: l, then l - k per clip."""
    new_per_clip = config.clip_frames - config.cond_frames
    return 1 + math.ceil(max(0, num_frames - config.clip_frames) / new_per_clip)


def first_context(job: VideoJob, config: LVDMConfig) -> Tensor | None:
    """The first clip's condition: --image's latent held still over the k conditioning frames
    (B, C, k, h, w), or None (the first clip unconditional). The video starts with these k given
    frames, then the first clip's l - k new ones."""
    if job.image_latent is None:
        return None
    return job.image_latent[:, :, None].expand(-1, -1, config.cond_frames, -1, -1)


def stepper(job: VideoJob, config: LVDMConfig, frame_stride: int | None = None) -> Stepper:
    """--model's clips one by one; the state is the last k frames (the next clip's condition). A
    stride-conditioned network is told `frame_stride` (default: its highest trained stride)."""
    predict = counted(lvdm_predict_fn(job.pipeline, job.prompt, job.config.guidance, frame_stride), job.tick_steps())
    guide = branch_parallel_guide(job.world)

    def step(index: int, state: State | None) -> tuple[Tensor, State]:
        context = first_context(job, config) if state is None else state["context"]
        clip = autoregressive_clip(predict, context, index, setup=job.setup, config=config, seed=job.seed, guide=guide)
        if context is None:
            new_frames = clip
        elif index == 0:  # --image: its k given frames start the video (the network's output there is untrained)
            new_frames = torch.cat([context.to(clip), clip[:, :, config.cond_frames :]], dim=2)
        else:
            new_frames = clip[:, :, config.cond_frames :]
        return new_frames, {"context": clip[:, :, -config.cond_frames :]}

    return step


def run(job: VideoJob, config: LVDMConfig) -> None:
    """The clips in order, each a resumable unit, into the mp4."""
    run_chunks_to_video(job, "chunk", stepper(job, config), num_clips(config, job.latent_frames))
