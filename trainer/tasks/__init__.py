"""The training tasks, one module each, and the registry that builds them.

A task module holds one class implementing `trainer.tasks.interface.Task`; it composes plain
builders (`networks`, `encoders`, `denoising`) instead of inheriting them. Its objective config is
the member of the `trainer.config.Objective` union whose tag (`objective.task`) is its name.
Adding a task: a module here, a union member in trainer/config.py, and a line in `TASKS`.
"""

from __future__ import annotations

import torch

from trainer.config import TrainJobConfig
from trainer.tasks.autoencoder import AutoencoderTask
from trainer.tasks.cmd import CMDAutoencoderTask, CMDContentTask, CMDMotionTask
from trainer.tasks.diffusion import DiffusionTask
from trainer.tasks.interface import Task
from trainer.tasks.lvdm import LVDMTask
from trainer.tasks.streaming import StreamingTask
from trainer.tasks.temporal_decoder import TemporalDecoderTask
from trainer.tasks.videofusion import VideoFusionTask

TASKS: dict[str, type[Task]] = {
    "diffusion": DiffusionTask,
    "lvdm_prediction": LVDMTask,
    "lvdm_interpolation": LVDMTask,
    "autoencoder": AutoencoderTask,
    "temporal_decoder": TemporalDecoderTask,
    "videofusion": VideoFusionTask,
    "streaming": StreamingTask,
    "cmd_autoencoder": CMDAutoencoderTask,
    "cmd_content": CMDContentTask,
    "cmd_motion": CMDMotionTask,
}
"""Task name (the objective's tag) -> its class."""


def build_task(cfg: TrainJobConfig, device: torch.device) -> Task:
    """The task of `cfg.objective`, its networks initialised from `train.seed`. The task receives
    its objective and the model section only (and whether the shards hold latents)."""
    with torch.random.fork_rng():
        torch.manual_seed(cfg.train.seed)
        return TASKS[cfg.objective.task](cfg.objective, cfg.model, latent=cfg.data.latent, seed=cfg.train.seed, device=device)
