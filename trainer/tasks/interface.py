"""What a task is and what it receives: a typed batch in, losses (one per trained network) out.

A task builds its networks: `trained` ones get a DeepSpeed engine each, `frozen` helpers (VAE,
text encoder, image encoder) stay outside the engines. `losses(engines, batch, generator, step)`
returns `[(engine_name, loss)]` in the order the loop must step them, plus scalar metrics.
Randomness (timesteps, noise, masks, perturbation levels) comes only from `generator`, whose
state is checkpointed, so a resumed run draws exactly what an uninterrupted run would.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Protocol

import torch
from torch import Tensor, nn

Engines = dict[str, Callable[..., Any]]
"""Engine name -> the callable that trains it (a DeepSpeed engine, or a plain module in tests)."""


@dataclass(frozen=True)
class Batch:
    """One micro-batch, as the loader's dict is turned into it where the loop takes it."""

    captions: list[str]
    """One caption per clip ('' where the loader dropped it for classifier-free guidance)."""
    tokens: Tensor | None = None
    """(B, L) int64 token ids of the captions (when the loader was given the task's tokenizer)."""
    video: Tensor | None = None
    """(B, 3, T, H, W) clips in [-1, 1] (pixel shards)."""
    latents: Tensor | None = None
    """(B, c, t, h, w) cached VAE latents (latent shards)."""
    text_emb: Tensor | None = None
    """(B, L, D) cached caption embeddings (latent shards that hold them)."""
    text_mask: Tensor | None = None
    """(B, L) cached token mask of those embeddings, 1 at real tokens (a variable-length encoder's
    cache, e.g. T5)."""
    frame_stride: Tensor | None = None
    """(B,) int64 frame stride of each clip (the loader's `data.frame_stride`)."""
    modality: Literal["video", "image"] = "video"
    """'image': a batch of `data.image_shards` images as one-frame clips (B, 3, 1, H, W), which
    tasks train with the temporal layers skipped (U-Net) or as one-frame videos (DiT)."""

    @classmethod
    def from_loader(cls, batch: dict[str, Any]) -> Batch:
        return cls(
            captions=list(batch["caption"]),
            tokens=batch.get("tokens"),
            video=batch.get("video"),
            latents=batch.get("latents"),
            text_emb=batch.get("text_emb"),
            text_mask=batch.get("text_mask"),
            frame_stride=batch.get("frame_stride"),
            modality=batch.get("modality", "video"),
        )

    def head(self, count: int) -> Batch:
        """The first `count` clips."""
        first = {name: None if value is None else value[:count] for name, value in self._tensors().items()}
        return Batch(captions=self.captions[:count], modality=self.modality, **first)

    def pixels(self) -> Tensor:
        """The clips; an error naming the cause when the batch holds latents instead."""
        if self.video is None:
            raise ValueError("this task trains on pixels: data.latent must be false")
        return self.video

    def _tensors(self) -> dict[str, Tensor | None]:
        return {
            "tokens": self.tokens,
            "video": self.video,
            "latents": self.latents,
            "text_emb": self.text_emb,
            "text_mask": self.text_mask,
            "frame_stride": self.frame_stride,
        }


@dataclass
class StepOutput:
    """What one micro-batch gives: the losses to step, and scalars to log."""

    losses: list[tuple[str, Tensor]]
    """(engine name, scalar loss) in the order the engines are stepped."""
    metrics: dict[str, float] = field(default_factory=dict)
    """Extra scalars for the log (per-bucket losses, KL, ...)."""


class Task(Protocol):
    """The interface every task in `trainer/tasks/` implements (no shared base class)."""

    components: ClassVar[dict[str, str]]
    """Name of each trained network in an exported pipeline folder (engine name -> folder)."""
    trained: dict[str, nn.Module]
    """Networks that train, one engine each; "model" is the main one (EMA, export)."""
    frozen: dict[str, nn.Module]
    """Helpers that do not train; saved with the run and copied into its export."""

    def tokenizer(self) -> Callable[[list[str]], Tensor] | None:
        """What the loader turns captions into tokens with (None: the task reads no captions)."""
        ...

    def losses(self, engines: Engines, batch: Batch, generator: torch.Generator, step: int) -> StepOutput: ...

    def preview(self, engines: Engines, batch: Batch, generator: torch.Generator) -> Tensor | None:
        """A short video (B, 3, T, H, W) in [-1, 1] for TensorBoard, or None."""
        ...
