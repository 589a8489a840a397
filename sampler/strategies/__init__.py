"""The long-video strategies of `lvd sample`, one module each, and their registry.

A strategy module holds its config dataclass (its own knobs; `lvd sample`'s flags are generated
from it), its latent-space math as pure functions with a whole-video reference function, and one
runner `run(job, config)` that the generation driver (`sampler.program`) calls. The math is
written against a generic denoiser (`denoise_fn(x (B, C, T, h, w), t) -> ε`, conditioning bound
beforehand) and calls `model_zoo.diffusion.samplers` for each denoising step. Randomness comes from
`seeding.unit_generator(seed, stream, index)`, a pure function of the unit of work, so any split
of units over ranks (and any resume point) draws the same numbers. Adding a strategy: one module
and one line in `STRATEGIES`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sampler.strategies import (
    cmd,
    ddim,
    lvdm,
    lvdm_autoregressive,
    lvdm_hierarchical,
    streaming,
    videofusion,
    vidrd,
)


@dataclass(frozen=True, kw_only=True)
class Strategy:
    """What the driver and the command line know of one strategy."""

    config: type
    """Its config dataclass; `config().clip_frames` is its default clip length (None: the whole video)."""
    run: Callable[[Any, Any], None]
    """`run(job: VideoJob, config)`: one video on this rank."""
    parallel: bool
    """True: the units of one video (gaps, blending chunks) are split over the ranks; False: ranks
    split whole prompts (and run the leftover prompts on all ranks in lockstep)."""
    model_tasks: tuple[str, ...]
    """The export tasks --model may have."""
    model2_tasks: tuple[str, ...] = ()
    """The export tasks --model2 may have (empty: it takes no --model2)."""
    needs_model2: bool = False
    """--model2 is required."""
    flow: bool = False
    """It samples flow-matching exports (its noise rules re-derived for x_t = (1-t) x_0 + t ε,
    docs/methods.md 'Flow matching'); False: it refuses them."""
    export_knobs: Callable[[dict[str, Any], str, str | None], dict[str, Any]] | None = None
    """`export_knobs(knobs given, --model, --model2)`: the knobs with defaults the exports record
    (and checked against them); None: the knobs as given."""


STRATEGIES: dict[str, Strategy] = {
    "lvdm-autoregressive": Strategy(
        config=lvdm.LVDMConfig, run=lvdm_autoregressive.run, parallel=False, model_tasks=("lvdm_prediction",)
    ),
    "lvdm-hierarchical": Strategy(
        config=lvdm_hierarchical.HierarchicalConfig, run=lvdm_hierarchical.run, parallel=True,
        model_tasks=("lvdm_prediction",), model2_tasks=("lvdm_interpolation",), needs_model2=True,
        export_knobs=lvdm_hierarchical.export_knobs,
    ),
    "vidrd": Strategy(config=vidrd.VidRDConfig, run=vidrd.run, parallel=False, model_tasks=("diffusion",), flow=True),
    "streaming": Strategy(
        config=streaming.StreamingConfig, run=streaming.run, parallel=True,
        model_tasks=("streaming",), model2_tasks=("diffusion",), flow=True,
    ),
    "videofusion": Strategy(
        config=videofusion.VideoFusionConfig, run=videofusion.run, parallel=False, model_tasks=("videofusion",)
    ),
    "ddim": Strategy(config=ddim.DDIMConfig, run=ddim.run, parallel=False, model_tasks=("diffusion",), flow=True),
    "cmd": Strategy(config=cmd.CMDSamplingConfig, run=cmd.run, parallel=False, model_tasks=("cmd",)),
}
"""Every strategy by its `--strategy` name, in the order of `lvd sample --help`."""
