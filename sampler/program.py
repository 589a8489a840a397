"""`lvd sample`: long videos from exported pipelines, split over ranks, resumable, streamed to mp4.

One video per prompt. Video i (seed + i) is owned by rank i mod R, which writes
`<stem>-<i:03d>.mp4` (just `out` for one prompt), its `.json` and its state folder `.parts/`.
- Sequential strategies (ddim, lvdm-autoregressive, vidrd, videofusion): ranks split the prompts,
  one rank per video in full rounds; the videos left over (number of prompts mod R, so the one
  video of a single prompt) run on all ranks in lockstep, see below.
- lvdm-hierarchical: the keyframes on the owner; meanwhile and after, every rank claims the next
  gap whose keyframes are saved, or the next piece to VAE-decode (`run_hierarchical`).
- streaming: the autoregressive CAM + APM stage, then every rank refines a contiguous block of
  blending chunks, exchanging overlap latents after every step.
- Lockstep: a sequential stage (CAM + APM chunks, a leftover video's chunks) runs on
  all ranks with the two guidance branches on ranks 0 and 1 (`distributed.branch_parallel_guide`),
  and the final VAE decoding is claimed piece by piece by every rank (`write_pieces`).
Every unit of work (chunk, keyframe clip, gap, refined chunk) is saved to `.parts/` when it
finishes and reused by a rerun of the same command, and all randomness is keyed by unit
(`strategies.seeding`), so R ranks, one rank and a resumed run give the same video.
A video on one rank is decoded chunk by chunk (`video_io.ChunkDecoder`) into the mp4 as chunks
become final.
"""

from __future__ import annotations

import json
import math
import resource
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from common.progress import Progress, ProgressMode
from sampler.config import PARALLEL_STRATEGIES, SampleConfig
from sampler.denoisers import counted, lvdm_predict_fn, streaming_denoiser, text_denoiser
from sampler.distributed import (
    COLLECTIVE_TIMEOUT,
    NeighbourExchange,
    World,
    branch_parallel_guide,
    chunk_owners,
    close_world,
    init_world,
)
from sampler.pipeline import Pipeline, anchor_embedding, load_pipeline, vae_factors
from sampler.state import PartsStore
from sampler.strategies import blending, lvdm, videofusion, vidrd
from sampler.strategies.common import SamplingSetup, clip_noise, run_ddim
from sampler.strategies.seeding import unit_generator
from sampler.video_io import ChunkDecoder, Mp4Writer

PROGRESS_INTERVAL = 5.0
"""Seconds between plain progress lines when stdout is not a terminal."""
DEFAULT_CLIP_FRAMES = {
    "lvdm-autoregressive": 4,
    "lvdm-hierarchical": 4,
    "vidrd": 8,
    "videofusion": 16,
    "streaming": 16,
    "ddim": 0,
}
"""Latent frames per clip when --clip-frames is not given (ddim: the whole video in one window)."""

State = dict[str, Tensor]
Stepper = Callable[[int, State | None], tuple[Tensor, State]]
"""`step(chunk_index, previous_state) -> (new latent frames (1, C, t, h, w), state for the next chunk)`."""


def video_paths(out: str, num_prompts: int) -> list[Path]:
    """`out` for one prompt, else `<stem>-000.mp4`, `<stem>-001.mp4`, ... beside it."""
    path = Path(out)
    if num_prompts == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{index:03d}{path.suffix}") for index in range(num_prompts)]


def parts_folder(video: Path) -> Path:
    return video.with_suffix(".parts")


@dataclass(kw_only=True)
class VideoJob:
    """Everything one video's generation needs on this rank."""

    config: SampleConfig
    """The command."""
    index: int
    """Prompt index."""
    prompt: str
    """The prompt."""
    out: Path
    """The mp4 to write."""
    world: World
    """The ranks."""
    pipeline: Pipeline
    """--model."""
    pipeline2: Pipeline | None
    """--model2."""
    setup: SamplingSetup
    """DDIM run and latent geometry."""
    latent_frames: int
    """Latent frames needed for `config.frames` pixel frames."""
    store: PartsStore
    """The video's `.parts/` folder."""
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds per stage."""
    counters: list[Progress] = field(default_factory=list)
    """The denoising-call counters of this video, closed (a last line each) when it is done."""

    @property
    def seed(self) -> int:
        return self.config.seed + self.index

    @property
    def owner(self) -> int:
        return self.index % self.world.size

    @property
    def is_owner(self) -> bool:
        return self.world.rank == self.owner

    @property
    def clip_frames(self) -> int:
        return self.config.clip_frames or DEFAULT_CLIP_FRAMES[self.config.strategy] or self.latent_frames

    @contextmanager
    def timed(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.timings[stage] = self.timings.get(stage, 0.0) + time.perf_counter() - start

    def progress(self, desc: str, total: int) -> Progress:
        """Progress over `total` units of one stage, on the owner only: a tqdm bar on a terminal,
        otherwise a plain `lvd sample: <desc> n/total | rate | ETA` line every few seconds."""
        return Progress("lvd sample", desc, total=total, mode=self.progress_mode, interval=PROGRESS_INTERVAL)

    def tick_steps(self) -> Callable[[], object]:
        """A counter's `update`, for `denoisers.counted` (one tick per model call)."""
        counter = Progress("lvd sample", "denoising calls", mode=self.progress_mode, interval=PROGRESS_INTERVAL)
        self.counters.append(counter)
        return counter.update

    @property
    def progress_mode(self) -> ProgressMode:
        return "auto" if self.config.progress and self.is_owner else "quiet"


class VideoSink:
    """The owner's mp4: latent chunks in video order -> decoded frames -> h264, trimmed to `frames`."""

    def __init__(self, job: VideoJob) -> None:
        vae = job.pipeline.vae
        self.time_factor = vae_factors(vae)[0]
        self.remaining = job.latent_frames
        self.decoder = ChunkDecoder(vae, self.time_factor, job.config.frames, job.config.decode_context)
        self.writer = Mp4Writer(job.out, job.config.fps)
        self.job = job

    def add(self, latents: Tensor) -> None:
        latents = latents[:, :, : self.remaining]
        if latents.shape[2] == 0:
            return
        self.remaining -= latents.shape[2]
        with self.job.timed("decode_and_encode"):
            self.writer.write(self.decoder.decode(latents))

    def close(self) -> Path:
        return self.writer.close()


def kept_lengths(lengths: list[int], latent_frames: int) -> list[int]:
    """Latent frames of each piece that make it into the video (the video is cut to `latent_frames`)."""
    kept, total = [], 0
    for length in lengths:
        kept.append(max(0, min(length, latent_frames - total)))
        total += kept[-1]
    return kept


def decoded_lengths(lengths: list[int], latent_frames: int) -> list[int]:
    """`kept_lengths` without the pieces wholly past the end of the video: the pieces that are decoded."""
    kept = kept_lengths(lengths, latent_frames)
    return kept[: sum(1 for length in kept if length > 0)]


UNIT_TIMEOUT = COLLECTIVE_TIMEOUT.total_seconds()
"""Seconds a rank waits for a unit (keyframe chunk, gap, decoded piece) another rank is to save."""


class OrderedEncoder:
    """The owner's mp4 of `num_pieces` decoded pieces that arrive in any order: its own, handed
    over in memory, and other ranks', as `.parts/frames-*` files (deleted once encoded)."""

    def __init__(self, job: VideoJob, num_pieces: int, timeout: float) -> None:
        self.job, self.num_pieces, self.timeout = job, num_pieces, timeout
        self.writer = Mp4Writer(job.out, job.config.fps)
        self.mine: dict[int, Any] = {}
        self.next = 0
        self.bar = job.progress("pieces", num_pieces)

    def add(self, index: int, frames: Any) -> None:
        self.mine[index] = frames

    def flush(self, *, wait: bool) -> None:
        """Encode the pieces that are next in video order and available; with `wait`, all of them."""
        store = self.job.store
        while self.next < self.num_pieces:
            name = f"frames-{self.next:05d}"
            if self.next in self.mine:
                frames = self.mine.pop(self.next)
            elif store.has(name) or wait:
                with self.job.timed("wait"):
                    store.wait_for(name, timeout=self.timeout)
                frames = store.read(name)["frames"].numpy()
                store.path(name).unlink()
            else:
                return
            with self.job.timed("encode"):
                self.writer.write(frames)
            self.next += 1
            self.bar.update()

    def close(self) -> None:
        with self.job.timed("encode"):
            self.writer.close()
        self.bar.close()


def decode_piece(
    job: VideoJob,
    index: int,
    latents: Tensor,
    context: Tensor | None,
    kept: list[int],
    encoder: OrderedEncoder | None,
) -> None:
    """VAE-decode piece `index` (its kept latent frames) with `context`, the last latent frames of
    the piece before it, exactly as one `ChunkDecoder` running through the video would; hand the
    frames to the owner's `encoder`, or (other ranks) save them as `.parts/frames-<index>`."""
    vae = job.pipeline.vae
    time_factor = vae_factors(vae)[0]
    decoder = ChunkDecoder(
        vae, time_factor, job.config.frames - time_factor * sum(kept[:index]), job.config.decode_context
    )
    decoder.previous = context
    with job.timed("decode"):
        frames = decoder.decode(latents[:, :, : kept[index]])
    if encoder is not None:
        encoder.add(index, frames)
    else:
        job.store.save(f"frames-{index:05d}", {"frames": torch.from_numpy(frames)}, unit=False)


def clear_claims(job: VideoJob) -> None:
    """The owner's clean-up of claims and decoded frames a killed earlier run left (before the
    ranks start claiming, and after they are done)."""
    if job.is_owner:
        job.store.clear("*.claim")
        job.store.clear("frames-*.safetensors")


def write_pieces(
    job: VideoJob,
    piece: Callable[[int], Tensor],
    lengths: list[int],
    *,
    context: Callable[[int], Tensor] | None = None,
    first: int = 0,
) -> None:
    """The final latents, given piece by piece (piece i has `lengths[i]` latent frames), into the mp4.

    Every rank claims pieces to VAE-decode (`PartsStore.claim`), starting at piece `first` (its
    own part of the video, whose latents it holds) and going round the whole video, so a rank
    that is done with its own part takes on the pieces of slower ones. The owner encodes the
    pieces in order as they appear (`OrderedEncoder`). `context(i)` gives the last latent frames
    of piece i - 1 (by default from `piece(i - 1)`): the decoder of piece i starts from them.
    """
    kept = decoded_lengths(lengths, job.latent_frames)
    context = context or (lambda index: piece(index - 1)[:, :, : kept[index - 1]])
    encoder = OrderedEncoder(job, len(kept), UNIT_TIMEOUT) if job.is_owner else None
    first = min(first, len(kept))

    def decode(index: int) -> None:
        decode_piece(job, index, piece(index), context(index) if index > 0 else None, kept, encoder)

    units = [
        (f"decode-{index:05d}", partial(decode, index)) for index in [*range(first, len(kept)), *range(first)]
    ]
    claim_and_run(job, units, encoder)


def claim_and_run(
    job: VideoJob, units: list[tuple[str, Callable[[], None]]], encoder: OrderedEncoder | None
) -> None:
    """Run each unit of `units` (name, work) that this rank claims first (`PartsStore.claim`), in
    order; the owner's `encoder` takes the decoded pieces between units and all of them at the end.
    Returns when every rank is done (or a rank failed: the barrier says so)."""
    for name, work in units:
        if job.store.claim(name):
            work()
            if encoder is not None:
                encoder.flush(wait=False)
    if encoder is not None:
        encoder.flush(wait=True)
        encoder.close()
    job.world.barrier()
    clear_claims(job)


# ---- sequential chunk loop: resumable, one chunk at a time ----------------------------------


def finished_prefix(job: VideoJob, name: str, num_chunks: int) -> int:
    """How many leading chunks of a stage an earlier run saved, as the owner sees it (every rank of
    a lockstep stage must agree on where computing starts)."""
    done = 0
    while done < num_chunks and job.store.has(f"{name}-{done:05d}"):
        done += 1
    return job.world.broadcast(done, src=job.owner)


def run_chunks(
    job: VideoJob, name: str, stepper: Stepper, num_chunks: int, sink: Callable[[Tensor], None]
) -> None:
    """Chunks 0..num_chunks-1 in order; a finished chunk is loaded from `.parts/` instead of computed.

    With several ranks in `job.world` every rank runs the loop in lockstep (the stepper's guidance
    splits its branches over them, `distributed.branch_parallel_guide`); the owner saves.
    """
    state: State | None = None
    bar = job.progress(name, num_chunks)
    resume_at = finished_prefix(job, name, num_chunks)
    for index in range(num_chunks):
        if index >= resume_at:
            with job.timed(name):
                latents, state = stepper(index, state)
            if job.is_owner:
                job.store.save(f"{name}-{index:05d}", {"latents": latents, **state})
        else:
            saved = job.store.load(f"{name}-{index:05d}")
            assert saved is not None
            latents, state = saved.pop("latents"), saved
        sink(latents.to(job.setup.device))
        bar.update()
    bar.close()


def read_chunks(job: VideoJob, name: str, num_chunks: int, num_frames: int) -> Tensor:
    """A stage's finished chunks, concatenated and cut to `num_frames` latent frames."""
    chunks = [job.store.read(f"{name}-{index:05d}")["latents"] for index in range(num_chunks)]
    return torch.cat(chunks, dim=2)[:, :, :num_frames].to(job.setup.device)


def text_denoiser_for(job: VideoJob) -> Callable[[Tensor, Tensor], Tensor]:
    """--model with the prompt and text guidance, the branches split over `job.world`'s ranks."""
    return text_denoiser(job.pipeline, job.prompt, job.config.guidance, branch_parallel_guide(job.world))


def ddim_stepper(job: VideoJob) -> tuple[Stepper, int]:
    """Plain DDIM windows of `clip_frames` latent frames, each from its own noise (no long-video method)."""
    denoise = counted(text_denoiser_for(job), job.tick_steps())

    def step(index: int, state: State | None) -> tuple[Tensor, State]:
        generator = unit_generator(job.seed, "ddim-window", index)
        x_T = clip_noise(job.setup, job.clip_frames, generator)
        return run_ddim(denoise, x_T, job.setup, generator), {}

    return step, math.ceil(job.latent_frames / job.clip_frames)


def lvdm_config(job: VideoJob) -> lvdm.LVDMConfig:
    cfg = job.config
    return lvdm.LVDMConfig(
        clip_frames=job.clip_frames,
        cond_frames=cfg.cond_frames,
        interp_clip_frames=cfg.keyframe_stride + 1,
        perturb_level=cfg.perturb_level,
        guidance_weight=cfg.uncond_weight,
    )


def lvdm_stepper(job: VideoJob, num_frames: int) -> tuple[Stepper, int]:
    """LVDM autoregressive prediction: l frames, then l - k per clip; the state is the last k frames."""
    config = lvdm_config(job)
    predict = counted(lvdm_predict_fn(job.pipeline, job.prompt, job.config.guidance), job.tick_steps())
    guide = branch_parallel_guide(job.world)

    def step(index: int, state: State | None) -> tuple[Tensor, State]:
        context = None if state is None else state["context"]
        clip = lvdm.autoregressive_clip(
            predict, context, index, setup=job.setup, config=config, seed=job.seed, guide=guide
        )
        new_frames = clip if context is None else clip[:, :, config.cond_frames :]
        return new_frames, {"context": clip[:, :, -config.cond_frames :]}

    return step, lvdm_num_clips(config, num_frames)


def lvdm_num_clips(config: lvdm.LVDMConfig, num_frames: int) -> int:
    """Clips of LVDM autoregressive prediction for `num_frames` latent frames: l, then l - k per clip."""
    new_per_clip = config.clip_frames - config.cond_frames
    return 1 + math.ceil(max(0, num_frames - config.clip_frames) / new_per_clip)


def vidrd_stepper(job: VideoJob) -> tuple[Stepper, int]:
    """VidRD clips of N frames; the state is the previous clip's z_T and DSG guide trajectory."""
    cfg = job.config
    config = vidrd.VidRDConfig(
        clip_frames=job.clip_frames, overlap_frames=cfg.overlap, noise_alpha=cfg.alpha, guidance_beta=cfg.beta
    )
    if not 0 < config.overlap_frames <= config.clip_frames:
        raise ValueError(f"need 0 < M <= N, got M={config.overlap_frames}, N={config.clip_frames}")
    denoise = counted(text_denoiser_for(job), job.tick_steps())

    def step(index: int, state: State | None) -> tuple[Tensor, State]:
        previous = (
            None
            if state is None
            else vidrd.VidRDState(
                clip_index=index,
                initial_noise=state["initial_noise"],
                guide_trajectory=state["guide_trajectory"],
            )
        )
        clip, new = vidrd.vidrd_clip(denoise, previous, setup=job.setup, config=config, seed=job.seed)
        return clip, {"initial_noise": new.initial_noise, "guide_trajectory": new.guide_trajectory}

    return step, math.ceil(job.latent_frames / config.clip_frames)


def videofusion_stepper(job: VideoJob) -> tuple[Stepper, int]:
    """VideoFusion windows of N frames sharing one base noise b (recomputed from the seed)."""
    model_lam = getattr(job.pipeline.denoiser.config, "lam", 0.5)
    config = videofusion.VideoFusionWindowsConfig(
        window_frames=job.clip_frames, base_ratio=model_lam if job.config.lam is None else job.config.lam
    )
    denoise = counted(text_denoiser_for(job), job.tick_steps())
    base = videofusion.base_noise(job.setup, job.seed)

    def step(index: int, state: State | None) -> tuple[Tensor, State]:
        window = videofusion.sample_window(
            denoise, base, index, setup=job.setup, config=config, seed=job.seed
        )
        return window, {}

    return step, math.ceil(job.latent_frames / config.window_frames)


def streaming_stepper(job: VideoJob) -> tuple[Stepper, int]:
    """StreamingT2V's autoregressive stage: chunks conditioned by CAM on the last F_cond latent frames
    and by APM on the anchor (the CLIP embedding of the first frame).

    The first chunk has no past: CAM reads zero latents and APM the embedding of a mid-grey frame
    (the paper makes it with the plain base model instead).
    """
    cfg, setup, pipeline = job.config, job.setup, job.pipeline
    cond_frames = pipeline.denoiser.config.cond_frames
    tick = job.tick_steps()
    guide = branch_parallel_guide(job.world)

    def step(index: int, state: State | None) -> tuple[Tensor, State]:
        if state is None:
            cond = torch.zeros(setup.clip_shape(cond_frames), dtype=setup.dtype, device=setup.device)
            grey = torch.zeros(1, 3, cfg.height, cfg.width, device=setup.device)
            anchor = anchor_embedding(pipeline, grey)
        else:
            cond, anchor = state["cond"], state["anchor"]
        denoise = streaming_denoiser(
            pipeline, job.prompt, cfg.guidance, cond_latents=cond, anchor=anchor, guide=guide
        )
        generator = unit_generator(job.seed, "streaming-chunk", index)
        x_T = clip_noise(setup, job.clip_frames, generator)
        chunk = run_ddim(counted(denoise, tick), x_T, setup, generator)
        if state is None:
            first_frame = pipeline.vae.from_latents(chunk[:, :, :1])[:, :, 0]  # (1, 3, H, W)
            anchor = anchor_embedding(pipeline, first_frame)
        cond = torch.cat([cond, chunk], dim=2)[:, :, -cond_frames:]
        return chunk, {"cond": cond, "anchor": anchor}

    return step, math.ceil(job.latent_frames / job.clip_frames)


SEQUENTIAL: dict[str, Callable[[VideoJob], tuple[Stepper, int]]] = {
    "ddim": ddim_stepper,
    "lvdm-autoregressive": lambda job: lvdm_stepper(job, job.latent_frames),
    "vidrd": vidrd_stepper,
    "videofusion": videofusion_stepper,
}


def run_chunks_to_video(job: VideoJob, name: str, stepper: Stepper, num_chunks: int) -> None:
    """A stage of chunks that are the video. One rank: each chunk is decoded into the mp4 as it
    comes. Several ranks: the chunks in lockstep (guidance branches split), then the decoding split
    (`write_pieces`), so no rank waits for another's decoding inside the lockstep loop."""
    if job.world.size == 1:
        sink = VideoSink(job)
        run_chunks(job, name, stepper, num_chunks, sink.add)
        sink.close()
        return
    run_chunks(job, name, stepper, num_chunks, lambda _: None)
    job.world.barrier()

    def piece(index: int) -> Tensor:
        return job.store.read(f"{name}-{index:05d}")["latents"]

    lengths = [piece(index).shape[2] for index in range(num_chunks)]
    write_pieces(job, piece, lengths, first=job.world.block(num_chunks).start)


def run_sequential(job: VideoJob) -> None:
    """One video of a sequential strategy (on all ranks if it is left over after full rounds)."""
    stepper, num_chunks = SEQUENTIAL[job.config.strategy](job)
    run_chunks_to_video(job, "chunk", stepper, num_chunks)


# ---- LVDM hierarchical: keyframes on the owner, gaps and decoding claimed by every rank -----


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


def run_hierarchical(job: VideoJob) -> None:
    """The keyframes on the owner alone; meanwhile, and after, every rank claims the next unit of
    work in `hierarchical_tasks` order (`PartsStore.claim`): a gap, as soon as its two keyframes
    are saved, or the VAE decoding of a piece, as soon as its gaps are. The owner encodes the
    decoded pieces in video order as they appear.

    No rank waits for a keyframe stage it cannot help with beyond the first keyframe clip, and no
    static split of the gaps decides who finishes last: a rank that runs slower simply claims
    fewer units. Gaps depend only on their keyframes and (seed, gap index), and each piece's
    decoder starts from the last latent frames of the piece before it, exactly as one decoder
    running through the video, so the video does not depend on the ranks or on who claimed what.
    """
    assert job.pipeline2 is not None
    timeout = UNIT_TIMEOUT
    config = lvdm_config(job)
    plan = lvdm.HierarchicalPlan(num_frames=job.latent_frames, keyframe_stride=config.keyframe_stride)
    alone = replace(job, world=World())  # the keyframe stage: the owner, both guidance branches
    num_chunks = lvdm_num_clips(config, plan.num_keyframes)
    if job.is_owner:
        stepper, _ = lvdm_stepper(alone, plan.num_keyframes)
        run_chunks(alone, "keyframes", stepper, num_chunks, lambda _: None)
    keyframes = KeyframeReader(job, num_chunks, timeout)
    interpolate = counted(lvdm_predict_fn(job.pipeline2, job.prompt, job.config.guidance), job.tick_steps())
    # Piece i < len(gaps): keyframe i and the stride - 1 frames of gap i; the last piece: the last keyframe.
    kept = decoded_lengths([config.keyframe_stride] * len(plan.gaps) + [1], job.latent_frames)
    num_gaps = min(len(plan.gaps), len(kept))  # gaps of pieces past the end of the video are not needed
    gaps: dict[int, Tensor] = {}

    def gap(index: int) -> Tensor:
        if index not in gaps:
            name = f"gap-{index:05d}"
            with job.timed("wait"):
                job.store.wait_for(name, timeout=timeout)
            gaps[index] = job.store.read(name)["latents"].to(job.setup.device)
        return gaps[index]

    def piece(index: int) -> Tensor:
        """Keyframe `index` and its gap, cut to the kept frames (the last piece: the last keyframe)."""
        if index == len(plan.gaps):
            return keyframes.frame(index)[:, :, : kept[index]]
        return torch.cat([keyframes.frame(plan.gaps[index][0]), gap(index)], dim=2)[:, :, : kept[index]]

    def fill(index: int) -> None:
        start, end = plan.gaps[index]
        key_start, key_end = keyframes.frame(start), keyframes.frame(end)
        with job.timed("gaps"):
            latents = lvdm.fill_gap(
                interpolate,
                key_start,
                key_end,
                gap_index=index,
                setup=job.setup,
                config=config,
                seed=job.seed,
            )
        job.store.save(f"gap-{index:05d}", {"latents": latents})
        gaps[index] = latents

    encoder = OrderedEncoder(job, len(kept), timeout) if job.is_owner else None

    def gap_unit(index: int) -> None:
        if job.store.has(f"gap-{index:05d}"):
            job.store.reused += 1  # filled by an earlier run of the command
        else:
            fill(index)

    def decode_unit(index: int) -> None:
        decode_piece(job, index, piece(index), piece(index - 1) if index > 0 else None, kept, encoder)

    work = {"gap": gap_unit, "decode": decode_unit}
    tasks = hierarchical_tasks(num_gaps, len(kept), job.world.size)
    claim_and_run(
        job, [(f"{kind}-{index:05d}", partial(work[kind], index)) for kind, index in tasks], encoder
    )


# ---- StreamingT2V: autoregressive stage on the owner, blending refinement on every rank -----


def refiner_denoiser(job: VideoJob, anchor: Tensor) -> Callable[[Tensor, Tensor], Tensor]:
    """--model2 (a text-to-video pipeline) if given, else the StreamingT2V model with empty CAM memory."""
    if job.pipeline2 is not None:
        return text_denoiser(job.pipeline2, job.prompt, job.config.guidance)
    cond_frames = job.pipeline.denoiser.config.cond_frames
    empty = torch.zeros(job.setup.clip_shape(cond_frames), dtype=job.setup.dtype, device=job.setup.device)
    return streaming_denoiser(
        job.pipeline, job.prompt, job.config.guidance, cond_latents=empty, anchor=anchor
    )


def refine(job: VideoJob, latents: Tensor, anchor: Tensor) -> tuple[int, blending.BlendingConfig]:
    """Randomised blending over the chunks this rank owns; each refined chunk goes to `.parts/`."""
    config = blending.BlendingConfig(
        chunk_frames=job.config.blend_frames, overlap_frames=job.config.blend_overlap
    )
    total = blending.num_chunks(latents.shape[2], config)
    if all(job.store.has(f"refined-{index:05d}") for index in range(total)):
        return total, config
    setup = replace(job.setup, timesteps=job.setup.timesteps[job.setup.timesteps <= job.config.refine_t])
    pieces = blending.split_chunks(latents, config)
    chunks = {i: blending.noised_chunk(pieces[i], i, setup, config, job.seed) for i in job.world.block(total)}
    denoise = counted(refiner_denoiser(job, anchor), job.tick_steps())
    exchange = (
        NeighbourExchange(job.world, chunk_owners(job.world, total))
        if job.world.size > 1
        else blending.local_exchange
    )
    bar = job.progress("refine steps", setup.num_steps)
    with job.timed("refine"):
        for step_index in range(setup.num_steps):
            chunks, _ = blending.refine_step(
                denoise,
                chunks,
                step_index,
                total_chunks=total,
                setup=setup,
                config=config,
                seed=job.seed,
                exchange=exchange,
            )
            bar.update()
    bar.close()
    for index, chunk in chunks.items():
        job.store.save(f"refined-{index:05d}", {"latents": chunk})
    return total, config


def run_streaming(job: VideoJob) -> None:
    stepper, num_chunks = streaming_stepper(job)
    if not job.config.refine:
        run_chunks_to_video(job, "stream", stepper, num_chunks)
        return
    run_chunks(job, "stream", stepper, num_chunks, lambda _: None)
    job.world.barrier()
    latents = read_chunks(job, "stream", num_chunks, job.latent_frames)
    anchor = job.store.read(f"stream-{num_chunks - 1:05d}")["anchor"].to(job.setup.device)
    total, config = refine(job, latents, anchor)
    overlap = config.overlap_frames

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

    lengths = [config.chunk_frames] + [config.chunk_stride] * (total - 1)
    kept = decoded_lengths(lengths, job.latent_frames)
    write_pieces(job, piece, lengths, context=context, first=job.world.block(total).start)


RUNNERS: dict[str, Callable[[VideoJob], None]] = {
    **{name: run_sequential for name in SEQUENTIAL},
    "lvdm-hierarchical": run_hierarchical,
    "streaming": run_streaming,
}


# ---- the program -----------------------------------------------------------------------------


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def make_setup(config: SampleConfig, pipeline: Pipeline, device: str) -> SamplingSetup:
    vae = pipeline.vae
    _, fh, fw = vae_factors(vae)
    if config.height % fh or config.width % fw:
        raise ValueError(f"height and width must be multiples of the VAE's spatial factors ({fh}, {fw})")
    schedule = pipeline.schedule
    return SamplingSetup(
        timesteps=schedule.timesteps(config.steps),
        alphas_cumprod=schedule.alphas_cumprod,
        frame_shape=(1, vae.config.latent_channels, config.height // fh, config.width // fw),
        eta=config.eta,
        parameterization=schedule.parameterization,
        final_alpha_cumprod=schedule.final_alpha_cumprod,
        device=device,
    )


def video_params(config: SampleConfig, index: int) -> dict[str, Any]:
    """What determines video `index`: the command's result parameters for this prompt and seed."""
    params = config.result_params()
    params.pop("prompts")
    params.pop("out")
    return {**params, "prompt": config.prompts[index], "video_seed": config.seed + index}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_report(job: VideoJob, rank_stats: list[dict[str, Any]], wall: float) -> Path:
    """`<out>.json`: parameters, seed, model ids, timings, unit counts and memory of every rank."""
    report = {
        "out": str(job.out),
        "prompt": job.prompt,
        "seed": job.seed,
        "frames": job.config.frames,
        "latent_frames": job.latent_frames,
        "world_size": job.world.size,
        "params": video_params(job.config, job.index),
        "model": job.pipeline.model_id,
        "model2": None if job.pipeline2 is None else job.pipeline2.model_id,
        "timings": {**job.timings, "wall": wall},
        "units_computed": sum(stats["computed"] for stats in rank_stats),
        "units_reused": sum(stats["reused"] for stats in rank_stats),
        "peak_rss_mb": max(stats["peak_rss_mb"] for stats in rank_stats),
        "ranks": rank_stats,
    }
    path = job.out.with_suffix(".json")
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path


MODEL_TASKS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "ddim": (("diffusion",), ()),
    "vidrd": (("diffusion",), ()),
    "lvdm-autoregressive": (("lvdm_prediction",), ()),
    "lvdm-hierarchical": (("lvdm_prediction",), ("lvdm_interpolation",)),
    "videofusion": (("videofusion",), ()),
    "streaming": (("streaming",), ("diffusion",)),
}
"""Per strategy: the export tasks --model may have, and those of --model2 (empty: not used)."""


def check_tasks(strategy: str, model: Path | str, task: str, model2: Path | str | None, task2: str | None) -> None:
    """One clear line when an export of the wrong task is given to a strategy."""
    wanted, wanted2 = MODEL_TASKS[strategy]
    if task not in wanted:
        raise ValueError(f"--strategy {strategy} needs --model from a {' or '.join(wanted)} run; {model} is a {task!r} export")
    if model2 is not None and not wanted2:
        raise ValueError(f"--strategy {strategy} takes no --model2 (got {model2})")
    if model2 is not None and task2 not in wanted2:
        raise ValueError(f"--strategy {strategy} needs --model2 from a {' or '.join(wanted2)} run; {model2} is a {task2!r} export")


def generate(config: SampleConfig) -> list[Path]:
    """Run the command on this rank (joins the process group if the environment has several ranks)."""
    device = resolve_device(config.device)
    world = init_world(device)
    try:
        pipeline = load_pipeline(config.model, device=device)
        pipeline2 = None if config.model2 is None else load_pipeline(config.model2, device=device)
        check_tasks(config.strategy, config.model, pipeline.task, config.model2, None if pipeline2 is None else pipeline2.task)
        setup = make_setup(config, pipeline, device)
        latent_frames = math.ceil(config.frames / vae_factors(pipeline.vae)[0])
        outputs = []
        num_videos = len(config.prompts)
        alone_until = num_videos - num_videos % world.size  # full rounds: one rank per video
        for index, out in enumerate(video_paths(config.out, num_videos)):
            shared = config.strategy in PARALLEL_STRATEGIES or index >= alone_until
            if not shared and not world.owns(index):
                continue
            job = VideoJob(
                config=config,
                index=index,
                prompt=config.prompts[index],
                out=out,
                world=world if shared else World(),
                pipeline=pipeline,
                pipeline2=pipeline2,
                setup=setup,
                latent_frames=latent_frames,
                store=PartsStore(parts_folder(out)),
            )
            outputs += run_video(job, world)
        world.barrier()
        return outputs
    finally:
        close_world(world)


def run_video(job: VideoJob, world: World) -> list[Path]:
    """One video on this rank; returns the files this rank wrote."""
    start, cpu_start = time.perf_counter(), time.process_time()
    job.store.check_params(video_params(job.config, job.index), write=job.is_owner)
    clear_claims(job)  # what a killed earlier run left, before any rank claims
    job.world.barrier()
    with torch.no_grad():
        RUNNERS[job.config.strategy](job)
    for counter in job.counters:
        counter.close()
    stats = {
        "rank": world.rank,
        "computed": job.store.computed,
        "reused": job.store.reused,
        "peak_rss_mb": peak_rss_mb(),
        "cpu_seconds": time.process_time() - cpu_start,
        "timings": job.timings,
    }
    rank_stats = job.world.all_gather(stats)
    if not job.is_owner:
        return []
    return [job.out, write_report(job, rank_stats, time.perf_counter() - start)]
