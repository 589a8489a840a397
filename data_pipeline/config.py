"""Typed configuration of the streaming loader (the `data` section of a training config)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from data_pipeline.remote import Retry
from data_pipeline.score_filters import parse_filters


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    shards: str = ""
    """Shard URLs: a brace glob such as '/data/clips/{000000..000127}.tar', or a brace pattern of
    remote shards read through WebDataset's handlers: 'http(s)://host/clips-{000000..000127}.tar'
    or a 'pipe:' command writing a shard to stdout ('pipe:aws s3 cp s3://b/c-{000..127}.tar -').
    Several shard sets are separated by '::' and mixed by `weights`."""
    weights: tuple[float, ...] = ()
    """Mixing weight of each shard set in `shards` (empty: equal weights)."""
    latent: bool = False
    """The shards hold cached VAE latents (written by `lvd shard latents`), not mp4 clips."""
    frames: int = 8
    """Frames L sampled per clip."""
    frame_stride: int = 1
    """Stride s between the sampled frames, counted in frames of the shard's clips: every s-th
    pixel frame of an mp4 clip, or every s-th latent frame of a cached latent clip (LVDM used 4
    on TaiChi). Batches carry it per clip as 'frame_stride'."""
    frame_stride_range: tuple[int, ...] = ()
    """[lo, hi]: draw each clip's stride uniformly from lo..hi (keyed by the clip, so resumable)
    instead of using `frame_stride`. Empty: every clip at `frame_stride`."""
    height: int = 64
    """Output frame height H after resize and crop."""
    width: int = 64
    """Output frame width W after resize and crop."""
    random_crop: bool = False
    """Random crop instead of centre crop."""
    p_uncond: float = 0.1
    """Probability of replacing a caption by '' (classifier-free guidance dropout)."""
    shuffle_buffer: int = 64
    """Samples held in the shuffle buffer."""
    workers: int = 0
    """DataLoader worker processes per rank (0: decode in the training process)."""
    prefetch: int = 2
    """Batches each DataLoader worker prepares ahead (ignored when workers = 0)."""
    shard_retries: int = 3
    """Re-opens of a remote shard after a failed read before the run stops with an error naming
    the URL and the reason."""
    shard_retry_backoff: float = 1.0
    """Seconds before the first re-open of a remote shard; doubled for each further one."""
    buckets: tuple[str, ...] = ()
    """Optional buckets 'FRAMESxHEIGHTxWIDTH:BATCH' (e.g. '16x64x64:4', '8x64x112:6'): each clip
    goes to the bucket whose aspect ratio is closest among those its length fits, is resized and
    cropped to its shape, and every batch holds one bucket; all ranks draw the same bucket for a
    step. Without ':BATCH' the batch size keeps the bucket's tokens per batch near those of
    frames x height x width at the trainer's batch size. Empty: that one bucket."""
    filters: tuple[str, ...] = ()
    """Curation-score filters 'SCORE OP NUMBER' (e.g. 'motion>0.5', 'sharpness>100'), all of which
    a clip's json 'scores' must pass (written by `lvd shard videos`); clips failing one or lacking
    the score are left out and counted by reason. Empty: every clip."""
    image_shards: str = ""
    """Shards of captioned images for joint image + video training, in the forms `shards` takes:
    plain images (`lvd shard images --plain`), or any mp4 shards, of which one frame per clip is
    taken. Read by a second loader at height x width; empty: video only."""
    image_weights: tuple[float, ...] = ()
    """Mixing weight of each shard set in `image_shards` (empty: equal weights)."""
    image_ratio: float = 0.0
    """Fraction of micro-batches that are image batches (each micro-batch is one modality, drawn
    from the seed and the micro-batch's number, the same on every rank). > 0 with `image_shards`."""
    image_batch_size: int = 0
    """Images per image batch; 0: frames x the trainer's micro-batch size, so that an image batch
    holds as many pixels as a video batch."""

    def bucket_shapes(self) -> list[tuple[int, int, int, int]]:
        """Parsed buckets as (frames, height, width, batch size; 0 when left to the tokens rule)."""
        shapes = []
        for text in self.buckets:
            try:
                dims, _, batch = text.partition(":")
                frames, height, width = (int(part) for part in dims.lower().split("x"))
                shapes.append((frames, height, width, int(batch) if batch else 0))
            except ValueError:
                raise ValueError(f"buckets: {text!r} is not 'FRAMESxHEIGHTxWIDTH[:BATCH]'") from None
            if min(shapes[-1][:3]) < 1 or (batch and shapes[-1][3] < 1):
                raise ValueError(f"buckets: every number must be >= 1, got {text!r}")
        return shapes

    def retry(self) -> Retry:
        """How remote shards are re-opened after a failed read."""
        return Retry(attempts=self.shard_retries, backoff=self.shard_retry_backoff)

    def stride_bounds(self) -> tuple[int, int]:
        """(lowest, highest) frame stride of the clips."""
        if self.frame_stride_range:
            return self.frame_stride_range[0], self.frame_stride_range[1]
        return self.frame_stride, self.frame_stride

    def __post_init__(self) -> None:
        if self.frames < 1:
            raise ValueError(f"frames: must be >= 1, got {self.frames}")
        if self.frame_stride < 1:
            raise ValueError(f"frame_stride: must be >= 1, got {self.frame_stride}")
        if self.frame_stride_range and (
            len(self.frame_stride_range) != 2 or not 1 <= self.frame_stride_range[0] <= self.frame_stride_range[1]
        ):
            raise ValueError(f"frame_stride_range: must be [lo, hi] with 1 <= lo <= hi, got {list(self.frame_stride_range)}")
        if self.height < 8 or self.width < 8:
            raise ValueError(f"height/width: must be >= 8, got {self.height}x{self.width}")
        if not 0.0 <= self.p_uncond <= 1.0:
            raise ValueError(f"p_uncond: must be in [0, 1], got {self.p_uncond}")
        if self.workers < 0:
            raise ValueError(f"workers: must be >= 0, got {self.workers}")
        if self.weights and any(w < 0 for w in self.weights):
            raise ValueError(f"weights: must be non-negative, got {self.weights}")
        if self.shard_retries < 0 or self.shard_retry_backoff < 0:
            raise ValueError(
                f"shard_retries/shard_retry_backoff: must be >= 0, got {self.shard_retries}/{self.shard_retry_backoff}"
            )
        if self.prefetch < 1:
            raise ValueError(f"prefetch: must be >= 1, got {self.prefetch}")
        self.bucket_shapes()
        parse_filters(self.filters)
        self._check_images()

    def _check_images(self) -> None:
        if not 0.0 <= self.image_ratio <= 1.0:
            raise ValueError(f"image_ratio: must be in [0, 1], got {self.image_ratio}")
        if self.image_batch_size < 0:
            raise ValueError(f"image_batch_size: must be >= 0, got {self.image_batch_size}")
        if self.image_shards and self.image_ratio == 0.0:
            raise ValueError(
                "image_ratio: is 0 but image_shards is set; give the fraction of micro-batches that are "
                "image batches, e.g. data.image_ratio=0.25"
            )
        if self.image_ratio > 0.0 and not self.image_shards:
            raise ValueError(f"image_shards: empty, but image_ratio is {self.image_ratio}; give the image shards")
        if self.image_shards and self.latent:
            raise ValueError("image_shards: images are pixel shards; they cannot go with latent shards (data.latent: true)")
        if self.image_weights and any(w < 0 for w in self.image_weights):
            raise ValueError(f"image_weights: must be non-negative, got {self.image_weights}")

    def image_config(self, batch_size: int) -> tuple[DataConfig, int]:
        """The loader config of the image stream (one-frame clips of `image_shards` at height x
        width, no buckets or score filters) and its batch size, given the video micro-batch size."""
        images = dataclasses.replace(
            self,
            shards=self.image_shards,
            weights=self.image_weights,
            frames=1,
            frame_stride=1,
            frame_stride_range=(),
            buckets=(),
            filters=(),
            image_shards="",
            image_weights=(),
            image_ratio=0.0,
        )
        return images, self.image_batch_size or self.frames * batch_size
