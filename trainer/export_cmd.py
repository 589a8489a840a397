"""`lvd export --run A --run B [--run C]`: CMD's stage runs -> one pipeline folder of task `cmd`.

The bundle holds what `lvd sample --strategy cmd` needs (docs/methods.md, 'CMD: sampling'):

    OUT/vae/                the CMD autoencoder (the frozen one both diffusion stages trained on)
    OUT/content_denoiser/   the content-frame model (`cmd_content` run)
    OUT/denoiser/           the motion DiT (`cmd_motion` run)
    OUT/text_encoder/       the text encoder both diffusion stages used
    OUT/scheduler/          the motion DiT's DDIM schedule
    OUT/content_scheduler/  the content model's DDIM schedule

Each run is exported on its own first (`trainer.export.export`); the stages must agree on the
autoencoder and the text encoder bit for bit, and a `cmd_autoencoder` run, when given, must be
that same autoencoder.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from common.files import replacing_folder
from common.pipeline_folder import PipelineIndex, read_index, write_index
from trainer.export import export

STAGES = ("cmd_autoencoder", "cmd_content", "cmd_motion")
"""The tasks of CMD's stages, in training order; the bundle needs the last two."""
SHARED = ("vae", "text_encoder")
"""Components both diffusion stages hold frozen, which must be the same networks."""


def export_cmd_bundle(runs: list[Path], out: Path, *, ema: bool = False) -> Path:
    """Export each run's latest checkpoint and bundle them into the `cmd` pipeline folder `out`."""
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.stages-") as scratch:
        stages: dict[str, PipelineIndex] = {}
        for number, run in enumerate(runs):
            index = read_index(export(run, Path(scratch) / str(number), ema=ema))
            if index.task not in STAGES or index.task in stages:
                raise ValueError(
                    f"{run}: a {index.task!r} run; bundling takes one run of each of {', '.join(STAGES)} (the autoencoder's is optional)"
                )
            stages[index.task] = index
        missing = [task for task in STAGES[1:] if task not in stages]
        if missing:
            raise ValueError(f"a cmd bundle needs a run of {' and '.join(missing)}; got {', '.join(stages)}")
        content, motion = stages["cmd_content"], stages["cmd_motion"]
        for name in SHARED:
            _check_same(content, motion, name)
        if "cmd_autoencoder" in stages:
            _check_same(stages["cmd_autoencoder"], motion, "vae")
        with replacing_folder(out) as folder:
            for name in ("denoiser", *SHARED):
                shutil.copytree(motion.path / name, folder / name)
            own = [name for name in ("content_denoiser", "content_vae") if name in content.components]
            for name in own:
                shutil.copytree(content.path / name, folder / name)
            components = {
                **{name: motion.components[name] for name in ("denoiser", *SHARED)},
                **{name: content.components[name] for name in own},
            }
            entries = {
                "sample_size": motion.entries["sample_size"],
                "stages": {task: {key: index.entries[key] for key in ("source", "step", "ema")} for task, index in stages.items()},
            }
            write_index(
                folder, task="cmd", components=components, scheduler=motion.scheduler, entries=entries,
                extra_schedulers={"content_scheduler": content.scheduler},
            )
    return out


def _check_same(first: PipelineIndex, second: PipelineIndex, name: str) -> None:
    """`name` is the same network (config and weights, byte for byte) in both exports."""
    for file in ("config.json", "model.safetensors"):
        if (first.path / name / file).read_bytes() != (second.path / name / file).read_bytes():
            raise ValueError(
                f"the {first.task} and {second.task} runs have different {name!r} networks ({file} differs): "
                f"train both diffusion stages with the same model.{name}"
            )
