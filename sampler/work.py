"""Units of work of one video, shared by every strategy's runner: resumable chunk loops, and
VAE decoding claimed piece by piece by every rank into the owner's mp4.

Every unit (chunk, keyframe clip, gap, refined chunk) is saved to `.parts/` when it finishes and
reused by a rerun of the same command. Ranks hand out units by claiming them
(`PartsStore.claim`); the owner encodes the decoded pieces in video order as they appear.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import Tensor

from sampler.distributed import COLLECTIVE_TIMEOUT
from sampler.job import VideoJob
from sampler.pipeline import vae_factors
from sampler.video_io import ChunkDecoder, Mp4Writer

State = dict[str, Tensor]
Stepper = Callable[[int, State | None], tuple[Tensor, State]]
"""`step(chunk_index, previous_state) -> (new latent frames (1, C, t, h, w), state for the next chunk)`."""
UNIT_TIMEOUT = COLLECTIVE_TIMEOUT.total_seconds()
"""Seconds a rank waits for a unit (keyframe chunk, gap, decoded piece) another rank is to save."""


class VideoSink:
    """The owner's mp4: latent chunks in video order -> decoded frames -> h264, trimmed to `frames`."""

    def __init__(self, job: VideoJob) -> None:
        vae = job.pipeline.vae
        self.remaining = job.latent_frames
        self.decoder = ChunkDecoder(vae, vae_factors(vae)[0], job.config.frames, job.config.decode_context)
        self.writer = Mp4Writer(job.out, job.config.fps)
        self.job = job

    def add(self, latents: Tensor) -> None:
        latents = latents[:, :, : self.remaining]
        if latents.shape[2] == 0:
            return
        self.remaining -= latents.shape[2]
        with self.job.timed("decode_and_encode"):
            self.writer.write(self.decoder.decode(latents))

    def close(self) -> None:
        self.writer.close()


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
