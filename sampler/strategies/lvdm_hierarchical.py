"""`--strategy lvdm-hierarchical`: LVDM's hierarchical generation (He et al. 2022, §3.4;
docs/methods.md, 'LVDM: autoregressive and hierarchical sampling'). The prediction model makes
sparse keyframes autoregressively, and the interpolation model (--model2) fills each gap between
two consecutive keyframes, both ends masked.

The keyframe stride d (latent frames) is the one the two exports were trained for: the keyframe
model's frame stride over the interpolation model's (model_index.json's 'frame_stride').

On several ranks the first keyframe clip, which nothing else can start before, runs on every rank
in lockstep with the two guidance branches on ranks 0 and 1 (CFG parallelism); the owner then
makes the other keyframe clips alone while, and after, every rank claims the next gap whose
keyframes are saved, or the next piece to VAE-decode.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from common.pipeline_folder import is_pipeline_folder, read_index
from model_zoo.diffusion.guidance import Guide, cfg
from model_zoo.diffusion.objectives import build_mask
from sampler.denoisers import counted, lvdm_predict_fn
from sampler.distributed import World
from sampler.job import VideoJob
from sampler.pipeline import recorded_frame_strides
from sampler.strategies import lvdm_autoregressive
from sampler.strategies.common import SamplingSetup
from sampler.strategies.lvdm import LVDMConfig, MaskedPredictFn, sample_masked_clip
from sampler.strategies.seeding import unit_generator
from sampler.work import (
    UNIT_TIMEOUT,
    OrderedEncoder,
    claim_and_run,
    decode_piece,
    decoded_lengths,
    run_chunks,
)


@dataclass(frozen=True, kw_only=True)
class HierarchicalConfig(LVDMConfig):
    """LVDM's hierarchical knobs: the keyframe stage's autoregressive ones, and the keyframe stride."""

    keyframe_stride: int = field(default=3, metadata={"alias": "--stride", "flag_default": "the exports' recorded stride, else 3"})
    """Latent frames from one keyframe to the next (the interpolation clip is stride + 1 frames).
    When the exports record the strides they were trained for, the default is theirs."""

    @property
    def interp_clip_frames(self) -> int:
        return self.keyframe_stride + 1


@dataclass(frozen=True, kw_only=True)
class HierarchicalPlan:
    """Where keyframes and gaps lie in a hierarchical generation of `num_frames` latent frames."""

    num_frames: int
    """Latent frames asked for (the assembled video is cut to this)."""
    keyframe_stride: int
    """Latent frames from one keyframe to the next."""

    @property
    def num_keyframes(self) -> int:
        return max(2, math.ceil((self.num_frames - 1) / self.keyframe_stride) + 1)

    @property
    def gaps(self) -> list[tuple[int, int]]:
        """(start, end) keyframe indices of each gap: the independent units of interpolation work."""
        return [(index, index + 1) for index in range(self.num_keyframes - 1)]


def trained_keyframe_strides(keyframe: tuple[int, int], interpolation: tuple[int, int]) -> range:
    """Keyframe strides d a pair of exports was trained for, given their (lowest, highest) frame
    strides: the interpolation model runs at its lowest stride s_i and the keyframe model at
    d·s_i, which must be one of its trained strides."""
    low, high = keyframe
    s_i = interpolation[0]
    return range(max(2, -(-low // s_i)), high // s_i + 1)


def export_knobs(knobs: dict[str, Any], model: str | Path, model2: str | Path | None) -> dict[str, Any]:
    """The knobs given on the command line, with the keyframe stride the exports were trained for
    as its default; a --keyframe-stride they were not trained for is an error naming both."""
    if model2 is None or not is_pipeline_folder(Path(model)) or not is_pipeline_folder(Path(model2)):
        return knobs  # a missing folder is reported when the pipelines load
    keyframe = recorded_frame_strides(read_index(model).entries)
    interpolation = recorded_frame_strides(read_index(model2).entries)
    if keyframe is None or interpolation is None:
        return knobs
    trained = trained_keyframe_strides(keyframe, interpolation)
    stride = knobs.get("keyframe_stride", trained[-1] if trained else None)
    if stride not in trained:
        strides = ", ".join(str(value) for value in trained) or "none"
        raise ValueError(
            f"--keyframe-stride {stride}: the models were trained for keyframe stride {strides} "
            f"(--model at frame stride {_span(keyframe)}, --model2 at {_span(interpolation)})"
        )
    return knobs | {"keyframe_stride": stride}


def _span(strides: tuple[int, int]) -> str:
    return str(strides[0]) if strides[0] == strides[1] else f"{strides[0]}..{strides[1]}"


def model_frame_strides(job: VideoJob, config: HierarchicalConfig) -> tuple[int | None, int | None]:
    """Frame strides fed to the keyframe and the interpolation network: the interpolation model
    at its lowest trained stride s_i, the keyframe model at keyframe_stride · s_i (None, None
    when --model2 records no stride: each stride-conditioned network then gets its highest)."""
    assert job.pipeline2 is not None
    if job.pipeline2.frame_strides is None:
        return None, None
    s_i = job.pipeline2.frame_strides[0]
    return config.keyframe_stride * s_i, s_i


def fill_gap(
    predict_fn: MaskedPredictFn,
    key_start: Tensor,
    key_end: Tensor,
    *,
    gap_index: int,
    setup: SamplingSetup,
    config: HierarchicalConfig,
    seed: int,
    guide: Guide = cfg,
) -> Tensor:
    """The stride - 1 latent frames between two keyframes (B, C, 1, h, w) each, by interpolation.

    Depends only on its two keyframes and (seed, gap_index): any rank can compute any gap.
    """
    generator = unit_generator(seed, "lvdm-gap", gap_index)
    given = torch.zeros(setup.clip_shape(config.interp_clip_frames), dtype=setup.dtype, device=setup.device)
    given[:, :, :1], given[:, :, -1:] = key_start, key_end
    mask = build_mask("interpolation", config.interp_clip_frames)
    clip = sample_masked_clip(
        predict_fn, given, mask, setup=setup, config=config, generator=generator, guide=guide
    )
    return clip[:, :, 1:-1]


def assemble_hierarchical(keyframes: Tensor, fills: list[Tensor], plan: HierarchicalPlan) -> Tensor:
    """Interleave keyframes (B, C, K, h, w) and gap fills into (B, C, num_frames, h, w)."""
    pieces = []
    for (start, _), fill in zip(plan.gaps, fills, strict=True):
        pieces += [keyframes[:, :, start : start + 1], fill]
    pieces.append(keyframes[:, :, -1:])
    return torch.cat(pieces, dim=2)[:, :, : plan.num_frames]


def hierarchical(
    predict_fn: MaskedPredictFn,
    interpolate_fn: MaskedPredictFn,
    *,
    num_frames: int,
    setup: SamplingSetup,
    config: HierarchicalConfig,
    seed: int,
) -> Tensor:
    """LVDM's hierarchical generation in one process: keyframes, then every gap in turn."""
    plan = HierarchicalPlan(num_frames=num_frames, keyframe_stride=config.keyframe_stride)
    keyframes = lvdm_autoregressive.autoregressive(
        predict_fn, num_frames=plan.num_keyframes, setup=setup, config=config, seed=seed
    )
    fills = [
        fill_gap(
            interpolate_fn,
            keyframes[:, :, start : start + 1],
            keyframes[:, :, end : end + 1],
            gap_index=index,
            setup=setup,
            config=config,
            seed=seed,
        )
        for index, (start, end) in enumerate(plan.gaps)
    ]
    return assemble_hierarchical(keyframes, fills, plan)


def hierarchical_tasks(num_gaps: int, num_pieces: int, num_ranks: int) -> list[tuple[str, int]]:
    """The order in which ranks claim lvdm-hierarchical work: ("gap", i) at position i, and
    ("decode", i), the VAE decoding of piece i (keyframe i + gap i, which also needs gap i - 1 as
    its decoder's context), `num_ranks` gaps later, so that the gaps it needs are usually finished
    when it is claimed and the owner's mp4 can take the pieces in order."""
    keyed = [((index, 0), ("gap", index)) for index in range(num_gaps)]
    keyed += [((index + num_ranks, 1), ("decode", index)) for index in range(num_pieces)]
    return [task for _, task in sorted(keyed)]


class KeyframeReader:
    """Keyframes from the keyframe stage's chunk files, read as the owner saves them."""

    def __init__(self, job: VideoJob, num_chunks: int, timeout: float) -> None:
        self.job, self.num_chunks, self.timeout = job, num_chunks, timeout
        self.frames: list[Tensor] = []
        self.chunks_read = 0

    def frame(self, index: int) -> Tensor:
        """Keyframe `index` (1, C, 1, h, w), waiting for the chunk that holds it."""
        while len(self.frames) <= index:
            if self.chunks_read == self.num_chunks:
                raise IndexError(f"keyframe {index} is past the {self.num_chunks} keyframe chunks")
            name = f"keyframes-{self.chunks_read:05d}"
            with self.job.timed("wait"):
                self.job.store.wait_for(name, timeout=self.timeout)
            latents = self.job.store.read(name)["latents"].to(self.job.setup.device)
            self.frames += list(latents.split(1, dim=2))
            self.chunks_read += 1
        return self.frames[index]


class GapStore:
    """The gaps of one video: filled on this rank (and saved), or read as another rank saves them."""

    def __init__(self, job: VideoJob, config: HierarchicalConfig, keyframes: KeyframeReader, timeout: float) -> None:
        assert job.pipeline2 is not None
        self.job, self.config, self.keyframes, self.timeout = job, config, keyframes, timeout
        self.plan = HierarchicalPlan(num_frames=job.latent_frames, keyframe_stride=config.keyframe_stride)
        stride = model_frame_strides(job, config)[1]
        self.interpolate = counted(
            lvdm_predict_fn(job.pipeline2, job.prompt, job.config.guidance, stride), job.tick_steps()
        )
        self.gaps: dict[int, Tensor] = {}

    def gap(self, index: int) -> Tensor:
        if index not in self.gaps:
            name = f"gap-{index:05d}"
            with self.job.timed("wait"):
                self.job.store.wait_for(name, timeout=self.timeout)
            self.gaps[index] = self.job.store.read(name)["latents"].to(self.job.setup.device)
        return self.gaps[index]

    def fill(self, index: int) -> None:
        """Gap `index` as a unit of work (reused if an earlier run of the command saved it)."""
        job = self.job
        if job.store.has(f"gap-{index:05d}"):
            job.store.reused += 1
            return
        start, end = self.plan.gaps[index]
        with job.timed("gaps"):
            latents = fill_gap(
                self.interpolate,
                self.keyframes.frame(start),
                self.keyframes.frame(end),
                gap_index=index,
                setup=job.setup,
                config=self.config,
                seed=job.seed,
            )
        job.store.save(f"gap-{index:05d}", {"latents": latents})
        self.gaps[index] = latents


def run(job: VideoJob, config: HierarchicalConfig) -> None:
    """The first keyframe clip on every rank in lockstep (guidance branches split), the other
    keyframes on the owner alone; meanwhile, and after, every rank claims the next unit of
    work in `hierarchical_tasks` order (`PartsStore.claim`): a gap, as soon as its two keyframes
    are saved, or the VAE decoding of a piece, as soon as its gaps are. The owner encodes the
    decoded pieces in video order as they appear.

    No rank waits for a keyframe stage it cannot help with, and no
    static split of the gaps decides who finishes last: a rank that runs slower simply claims
    fewer units. Gaps depend only on their keyframes and (seed, gap index), and each piece's
    decoder starts from the last latent frames of the piece before it, exactly as one decoder
    running through the video, so the video does not depend on the ranks or on who claimed what.
    """
    timeout = UNIT_TIMEOUT
    plan = HierarchicalPlan(num_frames=job.latent_frames, keyframe_stride=config.keyframe_stride)
    num_chunks = lvdm_autoregressive.num_clips(config, plan.num_keyframes)
    keyframe_stride = model_frame_strides(job, config)[0]
    if job.world.size > 1:
        # The first keyframe clip: no gap can start before it, so every rank steps it in lockstep,
        # the conditional branch on rank 0 and the unconditional one on rank 1
        # (`branch_parallel_guide`, bitwise the one-rank result); the owner saves it.
        shared = lvdm_autoregressive.stepper(job, config, frame_stride=keyframe_stride)
        run_chunks(job, "keyframes", shared, min(1, num_chunks), lambda _: None)
    if job.is_owner:
        alone = replace(job, world=World())  # the other keyframe clips: the owner, both guidance branches
        stepper = lvdm_autoregressive.stepper(alone, config, frame_stride=keyframe_stride)
        run_chunks(alone, "keyframes", stepper, num_chunks, lambda _: None)  # from the saved first clip on
        if job.world.size > 1 and num_chunks > 0:
            job.store.reused -= 1  # the first clip was re-read from this run's own shared stage, not reused
    keyframes = KeyframeReader(job, num_chunks, timeout)
    gaps = GapStore(job, config, keyframes, timeout)
    # Piece i < len(gaps): keyframe i and the stride - 1 frames of gap i; the last piece: the last keyframe.
    kept = decoded_lengths([config.keyframe_stride] * len(plan.gaps) + [1], job.latent_frames)
    num_gaps = min(len(plan.gaps), len(kept))  # gaps of pieces past the end of the video are not needed

    def piece(index: int) -> Tensor:
        """Keyframe `index` and its gap, cut to the kept frames (the last piece: the last keyframe)."""
        if index == len(plan.gaps):
            return keyframes.frame(index)[:, :, : kept[index]]
        return torch.cat([keyframes.frame(plan.gaps[index][0]), gaps.gap(index)], dim=2)[:, :, : kept[index]]

    encoder = OrderedEncoder(job, len(kept), timeout) if job.is_owner else None

    def decode_unit(index: int) -> None:
        decode_piece(job, index, piece(index), piece(index - 1) if index > 0 else None, kept, encoder)

    work = {"gap": gaps.fill, "decode": decode_unit}
    tasks = hierarchical_tasks(num_gaps, len(kept), job.world.size)
    claim_and_run(job, [(f"{kind}-{index:05d}", partial(work[kind], index)) for kind, index in tasks], encoder)
