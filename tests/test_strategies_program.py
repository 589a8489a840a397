"""Each strategy's runner, driven by the program on one rank, gives the latents of the strategy's
whole-video reference function: the chunking, the state handed from unit to unit, the resumable
`.parts/` store, the cut to the video's length and the piecewise VAE decoding compose to the math.

The program's latents are those it hands to the VAE decoder, piece by piece in video order."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
import torch

from sampler.config import SampleConfig
from sampler.denoisers import lvdm_predict_fn, streaming_base_denoiser, streaming_denoiser, text_denoiser
from sampler.pipeline import Pipeline, load_pipeline
from sampler.program import generate, make_setup
from sampler.strategies import (
    STRATEGIES,
    blending,
    ddim,
    lvdm_autoregressive,
    lvdm_hierarchical,
    streaming,
    videofusion,
    vidrd,
)
from sampler.strategies.common import SamplingSetup, pipeline_setup
from sampler.tiny import tiny_pipeline
from sampler.video_io import ChunkDecoder

TASKS = ("diffusion", "lvdm_prediction", "lvdm_interpolation", "videofusion", "streaming")
PROMPT = "a red bicycle"
CASES = {
    "ddim": ("diffusion", None, 7, dict(clip_frames=3)),
    "lvdm-autoregressive": ("lvdm_prediction", None, 22, dict(cond_frames=1)),
    "lvdm-hierarchical": ("lvdm_prediction", "lvdm_interpolation", 20, dict(keyframe_stride=3)),
    "vidrd": ("diffusion", None, 14, dict(clip_frames=4, overlap=2)),
    "videofusion": ("videofusion", None, 14, dict(clip_frames=4)),
    "streaming": ("streaming", "diffusion", 28, dict(clip_frames=4, blend_frames=6, blend_overlap=2)),
    "streaming-no-refine": ("streaming", None, 14, dict(clip_frames=4, refine=False)),
}
"""Per case: --model's task, --model2's task, pixel frames (the last unit is cut), the knobs."""


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("pipelines")
    return {task: str(tiny_pipeline(root / task, task, seed=index)) for index, task in enumerate(TASKS)}


def streaming_reference(
    pipeline: Pipeline, config: SampleConfig, setup: SamplingSetup, num_frames: int
) -> torch.Tensor:
    """Stage 1 (the base alone, then CAM + APM), then --model2's refinement at twice the size."""
    knobs, guidance = config.strategy_config, config.guidance
    latents = streaming.stream(
        streaming_base_denoiser(pipeline, PROMPT, guidance),
        lambda cond, anchor: streaming_denoiser(pipeline, PROMPT, guidance, cond_latents=cond, anchor=anchor),
        partial(streaming.anchor_of, pipeline),
        cond_frames=pipeline.denoiser.config.cond_frames,
        num_frames=num_frames,
        setup=setup,
        config=knobs,
        seed=config.seed,
    )
    if not knobs.refine:
        return latents
    assert config.model2 is not None
    refiner = load_pipeline(config.model2)
    size = (2 * config.height, 2 * config.width)
    upsampled = streaming.upsample_latents(pipeline, refiner, latents, frames=config.frames, size=size, seed=config.seed)
    refine_setup = pipeline_setup(refiner, height=size[0], width=size[1], steps=config.steps, eta=config.eta, device="cpu")
    return blending.randomized_blending(
        text_denoiser(refiner, PROMPT, guidance),
        upsampled,
        setup=streaming.refinement_steps(refine_setup, knobs.refine_t),
        config=knobs,
        seed=config.seed,
    )


def reference(config: SampleConfig, num_frames: int) -> torch.Tensor:
    """The strategy's whole-video reference function on the command's pipelines and knobs."""
    pipeline = load_pipeline(config.model)
    setup = make_setup(config, pipeline, "cpu")
    knobs, guidance, seed = config.strategy_config, config.guidance, config.seed
    common = dict(num_frames=num_frames, setup=setup, seed=seed)
    if config.strategy == "ddim":
        return ddim.ddim_windows(text_denoiser(pipeline, PROMPT, guidance), config=knobs, **common)
    if config.strategy == "vidrd":
        return vidrd.vidrd(text_denoiser(pipeline, PROMPT, guidance), config=knobs, **common)
    if config.strategy == "videofusion":
        knobs = videofusion.with_model_lam(knobs, pipeline.denoiser.config.lam)
        denoiser = videofusion.videofusion_denoiser(pipeline, PROMPT, guidance, setup.alphas_cumprod)
        return videofusion.videofusion(denoiser, config=knobs, **common)
    predict = lvdm_predict_fn(pipeline, PROMPT, guidance) if config.strategy.startswith("lvdm") else None
    if config.strategy == "lvdm-autoregressive":
        return lvdm_autoregressive.autoregressive(predict, config=knobs, **common)
    if config.strategy == "lvdm-hierarchical":
        assert config.model2 is not None
        interpolate = lvdm_predict_fn(load_pipeline(config.model2), PROMPT, guidance)
        return lvdm_hierarchical.hierarchical(predict, interpolate, config=knobs, **common)
    return streaming_reference(pipeline, config, setup, num_frames)


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_program_gives_the_reference_latents(case, pipelines, tmp_path, monkeypatch):
    task, task2, frames, knobs = CASES[case]
    strategy = case.removesuffix("-no-refine")
    config = SampleConfig(
        model=pipelines[task],
        model2=None if task2 is None else pipelines[task2],
        strategy=strategy,
        frames=frames,
        prompts=(PROMPT,),
        out=str(tmp_path / "video.mp4"),
        seed=3,
        steps=3,
        eta=0.5,  # the units' generators also serve the steps
        height=32,
        width=32,
        progress=False,
        device="cpu",
        strategy_config=STRATEGIES[strategy].config(**knobs),
    )
    decoded: list[torch.Tensor] = []
    original = ChunkDecoder.decode

    def recording(self: ChunkDecoder, latents: torch.Tensor):
        decoded.append(latents.clone())
        return original(self, latents)

    monkeypatch.setattr(ChunkDecoder, "decode", recording)
    assert generate(config) == [Path(config.out), Path(config.out).with_suffix(".json")]
    program = torch.cat(decoded, dim=2)
    num_frames = -(-frames // 2)  # the tiny video VAE halves time
    assert program.shape[2] == num_frames
    assert torch.equal(program, reference(config, num_frames))
