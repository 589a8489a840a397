"""Joint image + video training: two loaders, and which one feeds each micro-batch.

The video loader reads `data.shards`, the image loader `data.image_shards` as one-frame clips
(`DataConfig.image_config`). The n-th micro-batch of a run (n = step x grad_accum + micro-step)
is an image batch when `scheduled_modality(seed, n, image_ratio)` says so: a keyed draw, the
same on every rank, so the ranks of a micro-step all run one modality (one graph for ZeRO's
collectives), and a resumed run draws what the uninterrupted one did. Each loader keeps its own
position; the state holds both and n.

See docs/methods.md, 'Data: joint image + video training'.
"""

from __future__ import annotations

from typing import Any, Literal

from data_pipeline.batching import Tokenizer
from data_pipeline.config import DataConfig
from data_pipeline.loader import VideoLoader, build_loader
from data_pipeline.stream import keyed_random

Modality = Literal["video", "image"]

IMAGE_SEED_OFFSET = 7_919
"""The image loader's seed is `train.seed` plus this: its shard order, shuffle and caption
dropout are drawn apart from the video loader's."""


def scheduled_modality(seed: int, micro_batch: int, image_ratio: float) -> Modality:
    """The modality of a run's `micro_batch`-th micro-batch: 'image' with probability `image_ratio`."""
    if image_ratio <= 0.0:
        return "video"
    return "image" if keyed_random("modality", seed, micro_batch).random() < image_ratio else "video"


class JointLoader:
    """Infinite iterator of micro-batches, each from the video or the image loader (its
    'modality' says which), with `state_dict()` / `load_state_dict()` for exact resume."""

    def __init__(self, video: VideoLoader, image: VideoLoader, *, seed: int, image_ratio: float) -> None:
        self.loaders: dict[Modality, VideoLoader] = {"video": video, "image": image}
        self.seed, self.image_ratio = seed, image_ratio
        self.micro_batches = 0

    def __iter__(self) -> JointLoader:
        return self

    def __next__(self) -> dict[str, Any]:
        modality = scheduled_modality(self.seed, self.micro_batches, self.image_ratio)
        batch = next(self.loaders[modality])
        self.micro_batches += 1
        return batch | {"modality": modality}

    def skipped(self) -> dict[str, int]:
        """Samples of this rank left out of training so far, counted by reason (both loaders)."""
        totals = self.loaders["video"].skipped()
        for reason, count in self.loaders["image"].skipped().items():
            totals[f"image shards: {reason}"] = count
        return totals

    def state_dict(self) -> dict[str, Any]:
        return {
            "joint": 1,
            "micro_batches": self.micro_batches,
            "video": self.loaders["video"].state_dict(),
            "image": self.loaders["image"].state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "joint" not in state:
            raise ValueError(
                "data.image_shards: the checkpoint was written by a run without image shards; "
                "a run cannot add them on resume (start a new run with model.init_from=...)"
            )
        self.micro_batches = state["micro_batches"]
        for modality, loader in self.loaders.items():
            loader.load_state_dict(state[modality])


def load_loader_state(loader: VideoLoader | JointLoader, state: dict[str, Any]) -> None:
    """Resume `loader` from a checkpoint's loader state; a ValueError naming `data.image_shards`
    when the run added or dropped image shards since the checkpoint."""
    if "joint" in state and not isinstance(loader, JointLoader):
        raise ValueError(
            "data.image_shards: the checkpoint was written by a run with image shards; "
            "resume it with the same data.image_shards (or start a new run with model.init_from=...)"
        )
    loader.load_state_dict(state)


def build_training_loader(
    cfg: DataConfig,
    *,
    rank: int,
    world_size: int,
    batch_size: int,
    seed: int,
    tokenizer: Tokenizer | None,
) -> VideoLoader | JointLoader:
    """The loader of one training rank: the video loader, joined by the image loader when
    `data.image_shards` is set."""
    video = build_loader(cfg, rank=rank, world_size=world_size, batch_size=batch_size, seed=seed, tokenizer=tokenizer)
    if not cfg.image_shards:
        return video
    image_cfg, image_batch = cfg.image_config(batch_size)
    image = build_loader(
        image_cfg,
        rank=rank,
        world_size=world_size,
        batch_size=image_batch,
        seed=seed + IMAGE_SEED_OFFSET,
        tokenizer=tokenizer,
    )
    return JointLoader(video, image, seed=seed, image_ratio=cfg.image_ratio)
