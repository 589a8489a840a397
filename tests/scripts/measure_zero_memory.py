"""Run by tests (2 ranks): per-rank bytes of model + optimizer under ZeRO 0-3, as JSON on rank 0."""

from __future__ import annotations

import dataclasses
import json
import sys

import torch

from lvd.config import load_config
from trainer.config import TrainJobConfig
from trainer.engine import allocated_state_bytes, build_engine, init_distributed
from trainer.tasks import build_task


def main() -> None:
    config_path, out_path = sys.argv[1], sys.argv[2]
    info = init_distributed()
    cfg = load_config(TrainJobConfig, config_path, sys.argv[3:])
    results = {}
    for stage in (0, 1, 2, 3):
        cfg_stage = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, zero_stage=stage))
        task = build_task(cfg_stage, info.device)
        model = task.trained["model"]
        x = torch.randn(1, model.config.in_channels, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        kwargs = model.example_inputs(x)
        engine = build_engine(model, cfg_stage.train, info)
        # One real step, so Adam's moments exist (DeepSpeed creates them lazily).
        engine.backward(engine(x, **kwargs).float().square().mean())
        engine.step()
        measured = allocated_state_bytes(engine)
        gathered = [None] * info.world_size
        torch.distributed.all_gather_object(gathered, measured)
        results[stage] = gathered
        del engine, task
    if info.is_main:
        with open(out_path, "w") as handle:
            json.dump(results, handle)


if __name__ == "__main__":
    main()
