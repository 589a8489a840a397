"""Latents -> pixels -> h264 mp4, chunk by chunk, so memory does not grow with the video length.

`ChunkDecoder` decodes one chunk of latents with the VAE, prepending the last `context` latent
frames of the previous chunk (then cutting their pixels off), so a 3-D VAE sees across chunk
borders. `Mp4Writer` appends uint8 frames to an h264 / yuv420p stream (odd sizes are padded by
edge replication to even ones) with x264 settings that gave equal bytes for equal frames, and
renames the finished file into place.
"""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import torch
from torch import Tensor, nn

from common.files import move_into_place, temporary_path


def to_uint8_frames(video: Tensor) -> np.ndarray:
    """Video (1, 3, T, H, W) in [-1, 1] -> (T, H, W, 3) uint8."""
    pixels = ((video[0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # (3, T, H, W)
    return pixels.permute(1, 2, 3, 0).cpu().numpy()  # (T, H, W, 3)


class ChunkDecoder:
    """Decode consecutive latent chunks (1, C, t, h, w) into pixel frames, capped at `max_frames`."""

    def __init__(self, vae: nn.Module, time_factor: int, max_frames: int, context: int = 1) -> None:
        self.vae = vae
        self.time_factor = time_factor
        self.remaining = max_frames
        self.context = context
        self.previous: Tensor | None = None

    @torch.no_grad()
    def decode(self, latents: Tensor) -> np.ndarray:
        """The pixel frames (T, H, W, 3) of the next chunk; fewer once `max_frames` is reached."""
        left = self.previous[:, :, -self.context :] if self.previous is not None and self.context else None
        window = latents if left is None else torch.cat([left, latents], dim=2)  # (1, C, k + t, h, w)
        video = self.vae.from_latents(window.to(next(self.vae.parameters()).device))  # (1, 3, (k+t)*ft, H, W)
        # The chunk's own frames are the last t*ft (a causal VAE decodes k + t latents to 1 + (k+t-1)*ft).
        skip = 0 if left is None else video.shape[2] - latents.shape[2] * self.time_factor
        frames = to_uint8_frames(video[:, :, skip : skip + self.remaining])
        self.remaining -= frames.shape[0]
        self.previous = latents
        return frames


class Mp4Writer:
    """An h264 (libx264, yuv420p) mp4 written frame by frame to `<path>.tmp`, moved onto `path` on close."""

    def __init__(self, path: Path, fps: int, crf: int = 18) -> None:
        self.path = path
        self.partial = temporary_path(path)
        self.fps = fps
        self.crf = crf
        self.container: av.container.OutputContainer | None = None
        self.stream: av.VideoStream | None = None
        self.frames_written = 0

    def _open(self, height: int, width: int) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.container = av.open(str(self.partial), mode="w", format="mp4")
        self.stream = self.container.add_stream("libx264", rate=self.fps)
        self.stream.height, self.stream.width = height + height % 2, width + width % 2
        self.stream.pix_fmt = "yuv420p"
        # One thread and the ultrafast preset: with the default preset, x264 gave different
        # bytes for identical frames from run to run here (small frames), which would break
        # "resumed run == uninterrupted run" and "R ranks == 1 rank" at the byte level.
        self.stream.options = {"crf": str(self.crf), "threads": "1", "preset": "ultrafast"}

    def write(self, frames: np.ndarray) -> None:
        """Append uint8 frames (T, H, W, 3)."""
        if frames.shape[0] == 0:
            return
        if self.container is None:
            self._open(frames.shape[1], frames.shape[2])
        pad = ((0, 0), (0, frames.shape[1] % 2), (0, frames.shape[2] % 2), (0, 0))
        for frame in np.pad(frames, pad, mode="edge"):
            # `reformat` copies into a frame that owns its buffer: x264 keeps frames for its
            # lookahead after `encode` returns, and frames viewing freed numpy memory made the
            # bytes vary from run to run. One swscale thread: its automatic threading made this
            # conversion 9x slower for 32x32 frames here (0.16 s against 0.017 s for 192 frames),
            # and up to 20x with the other core busy, as it is while other ranks decode.
            rgb = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            video_frame = rgb.reformat(format="yuv420p", threads=1)
            video_frame.pts = self.frames_written
            self.frames_written += 1
            for packet in self.stream.encode(video_frame):
                self.container.mux(packet)

    def close(self) -> Path:
        """Flush the encoder and move the file into place."""
        if self.container is None:
            raise ValueError(f"{self.path}: no frames were written")
        for packet in self.stream.encode():
            self.container.mux(packet)
        self.container.close()
        move_into_place(self.partial, self.path)
        return self.path


def count_frames(path: Path) -> int:
    """Frames of a video file, by decoding it."""
    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(video=0))
