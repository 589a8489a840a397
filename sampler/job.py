"""One video's generation on this rank: what a strategy's runner receives."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from torch import Tensor

from common.progress import Progress, ProgressMode
from sampler.denoisers import text_denoiser
from sampler.distributed import World, branch_parallel_guide
from sampler.pipeline import Pipeline
from sampler.state import PartsStore

if TYPE_CHECKING:  # annotations only: the command's config validates against the strategy registry
    from sampler.config import SampleConfig
    from sampler.strategies.common import SamplingSetup

PROGRESS_INTERVAL = 5.0
"""Seconds between plain progress lines when stdout is not a terminal."""


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
    image_latent: Tensor | None = None
    """--image's clean latent (1, C, h, w), for the first window of an image-conditioned denoiser."""
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

    def prompt_denoiser(self, *, first_window: bool = False) -> Callable[[Tensor, Tensor], Tensor]:
        """--model with the prompt and text guidance, the branches split over the job's ranks; in the
        `first_window` (the one that starts the video), conditioned on --image's latent if given."""
        image = self.image_latent if first_window else None
        return text_denoiser(self.pipeline, self.prompt, self.config.guidance, branch_parallel_guide(self.world), image)
