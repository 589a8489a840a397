"""`lvd sample --strategy cmd` (docs/methods.md, 'CMD: sampling'): the content frame, the motion
latent conditioned on it, the autoencoder's decoding, chunk by chunk; one rank equals the
strategy's whole-video reference function, and a rerun reuses the saved chunks."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest
import torch

from model_zoo.cmd import content_condition, unpack_motion
from sampler.config import SampleConfig
from sampler.denoisers import conditioned_denoiser
from sampler.pipeline import load_pipeline
from sampler.program import generate, make_setup
from sampler.strategies import STRATEGIES, cmd
from sampler.strategies.common import SamplingSetup
from sampler.tiny import tiny_cmd_pipeline
from sampler.video_io import Mp4Writer, to_uint8_frames

PROMPT = "a red bicycle"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tiny_cmd_pipeline(tmp_path_factory.mktemp("cmd") / "bundle", seed=5, clip_frames=4))


def _config(model: str, out: Path, frames: int, **knobs: object) -> SampleConfig:
    return SampleConfig(
        model=model, strategy="cmd", frames=frames, prompts=(PROMPT,), out=str(out), seed=2, steps=3, eta=0.5,
        height=16, width=16, progress=False, device="cpu", strategy_config=STRATEGIES["cmd"].config(**knobs),
    )


def decoded_frames(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


def reference(config: SampleConfig, num_frames: int, clip_frames: int) -> torch.Tensor:
    """`cmd_video` with the setups and bound networks written out by hand (16 x 16 px, p = 4)."""
    pipeline = load_pipeline(config.model)
    setup = make_setup(config, pipeline, "cpu")
    schedule = pipeline.content_schedule
    content_setup = SamplingSetup(
        timesteps=schedule.timesteps(config.steps), alphas_cumprod=schedule.alphas_cumprod, frame_shape=(1, 48, 4, 4),
        eta=config.eta, parameterization=schedule.parameterization, final_alpha_cumprod=schedule.final_alpha_cumprod,
    )
    motion_setup = SamplingSetup(
        timesteps=setup.timesteps, alphas_cumprod=setup.alphas_cumprod, frame_shape=(1, 8, 1, 8), eta=config.eta,
        parameterization=setup.parameterization, final_alpha_cumprod=setup.final_alpha_cumprod,
    )

    def motion_fns(content: torch.Tensor):
        cond_frame = content_condition(content, 4)
        return conditioned_denoiser(pipeline.denoiser, pipeline, PROMPT, config.guidance, cond_frame=cond_frame)

    return cmd.cmd_video(
        conditioned_denoiser(pipeline.networks["content_denoiser"], pipeline, PROMPT, config.guidance),
        lambda patches: torch.nn.functional.pixel_shuffle(patches, 4),
        motion_fns,
        lambda content, motion: pipeline.vae.decode(content, unpack_motion(motion, 4)),
        num_frames=num_frames, clip_frames=clip_frames, content_setup=content_setup, setup=motion_setup,
        config=config.strategy_config, seed=config.seed,
    )


@pytest.mark.parametrize("knobs", [dict(), dict(clip_frames=3, content_strength=0.0)])
def test_one_rank_gives_the_reference_video_with_the_frames_asked_for(knobs, bundle, tmp_path, monkeypatch):
    """10 frames in chunks of 4 (the export's clip length) or 3: the last chunk is cut; the frames
    handed to the mp4 writer are the reference function's, and the mp4 holds exactly 10."""
    config = _config(bundle, tmp_path / "video.mp4", 10, **knobs)
    written: list[np.ndarray] = []
    original = Mp4Writer.write

    def recording(self: Mp4Writer, frames: np.ndarray) -> None:
        written.append(frames.copy())
        original(self, frames)

    monkeypatch.setattr(Mp4Writer, "write", recording)
    with torch.no_grad():
        assert generate(config) == [tmp_path / "video.mp4", tmp_path / "video.json"]
        expected = to_uint8_frames(reference(config, 10, knobs.get("clip_frames", 4)))
    assert np.array_equal(np.concatenate(written), expected)
    assert decoded_frames(tmp_path / "video.mp4").shape == (10, 16, 16, 3)


def test_a_rerun_reuses_every_chunk_and_writes_the_same_video(bundle, tmp_path):
    config = _config(bundle, tmp_path / "video.mp4", 9)
    generate(config)
    first = (tmp_path / "video.mp4").read_bytes()
    (tmp_path / "video.mp4").unlink()
    generate(config)
    report = (tmp_path / "video.json").read_text()
    assert '"units_computed": 0' in report and '"units_reused": 3' in report
    assert (tmp_path / "video.mp4").read_bytes() == first


def test_content_strength_zero_keeps_the_content_frame_and_one_redraws_it(bundle):
    pipeline = load_pipeline(bundle)
    content_fn = conditioned_denoiser(pipeline.networks["content_denoiser"], pipeline, PROMPT, 3.0)
    schedule = pipeline.content_schedule
    setup = SamplingSetup(timesteps=schedule.timesteps(4), alphas_cumprod=schedule.alphas_cumprod, frame_shape=(1, 48, 4, 4))
    previous = torch.rand(1, 48, 1, 4, 4)
    with torch.no_grad():
        kept = cmd.content_frame(content_fn, 1, previous, setup=setup, strength=0.0, seed=0)
        edited = cmd.content_frame(content_fn, 1, previous, setup=setup, strength=0.5, seed=0)
    assert kept is previous
    assert not torch.equal(edited, previous) and edited.shape == previous.shape
    with pytest.raises(ValueError, match="content_strength: must be in"):
        cmd.CMDSamplingConfig(content_strength=1.5)


def test_cmd_needs_a_cmd_bundle(tmp_path):
    from sampler.tiny import tiny_pipeline

    config = _config(str(tiny_pipeline(tmp_path / "t2v", "diffusion")), tmp_path / "video.mp4", 4)
    with pytest.raises(ValueError, match="--strategy cmd needs --model from a cmd run"):
        generate(config)


def lvd(*args: str) -> int:
    """`lvd ARGS` in this process, as the console entry point runs it."""
    from lvd.cli import main

    return main(list(args))


def test_three_stages_trained_exported_and_sampled_through_the_cli(tmp_path, video_shards):
    """`lvd train` each stage (the later two on the exported autoencoder), `lvd export` the stages
    into one `cmd` bundle that the sampler loads, `lvd sample --strategy cmd`: an mp4 of the frames asked."""
    common = [f"data.shards={video_shards}", "data.height=16", "data.width=16", "train.steps=2", "train.warmup_steps=1", "run.progress=quiet"]
    configs = Path(__file__).resolve().parent.parent / "configs" / "tiny"
    runs = {stage: tmp_path / stage for stage in ("cmd_autoencoder", "cmd_content", "cmd_motion")}
    assert lvd("train", "--config", str(configs / "cmd_autoencoder.yaml"), f"run.dir={runs['cmd_autoencoder']}", *common) == 0
    assert lvd("export", "--run", str(runs["cmd_autoencoder"]), "--out", str(tmp_path / "autoencoder")) == 0
    for stage in ("cmd_content", "cmd_motion"):
        stage_args = (f"run.dir={runs[stage]}", f"model.vae={tmp_path / 'autoencoder' / 'vae'}", *common)
        assert lvd("train", "--config", str(configs / f"{stage}.yaml"), *stage_args) == 0
    bundle = tmp_path / "cmd"
    assert lvd("export", *(arg for run in runs.values() for arg in ("--run", str(run))), "--out", str(bundle)) == 0

    pipeline = load_pipeline(bundle)
    assert pipeline.task == "cmd" and pipeline.content_schedule is not None
    assert set(pipeline.networks) == {"denoiser", "content_denoiser", "vae", "text_encoder"}
    assert lvd("export", "--run", str(runs["cmd_content"]), "--run", str(runs["cmd_content"]), "--out", str(tmp_path / "bad")) == 1

    out = tmp_path / "video.mp4"
    sample = ["--model", str(bundle), "--prompt", PROMPT, "--frames", "11", "--steps", "2", "--out", str(out), "--quiet"]
    assert lvd("sample", "--strategy", "cmd", *sample, "--device", "cpu") == 0
    assert decoded_frames(out).shape == (11, 16, 16, 3)
