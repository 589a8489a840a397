"""`lvd sample` on tiny flow-matching exports: the strategies re-derived for x_t = (1-t) x_0 + t ε
work (ddim, vidrd, the streaming refiner), the others refuse naming the strategy and the
objective, and --sampler/--shift/--eta are checked against the model's objective."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import Tensor

from common.pipeline_folder import FlowSchedulerSpec, read_index
from model_zoo.diffusion.flow import flow_forward, flow_sample, flow_sigmas, shift_time, token_shift
from sampler.cli import main
from sampler.pipeline import load_pipeline
from sampler.program import check_objective
from sampler.strategies import STRATEGIES, blending, streaming, vidrd
from sampler.strategies.common import SamplingSetup, clip_noise, denoise_step, pipeline_setup
from sampler.strategies.seeding import unit_generator
from sampler.tiny import tiny_pipeline
from sampler.video_io import count_frames

FLOW = FlowSchedulerSpec(
    num_train_timesteps=1000, shift=3.0, shift_from_tokens=False, base_tokens=256, max_tokens=4096,
    base_log_shift=0.5, max_log_shift=1.15,
)
STEPS = 4


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("flow_exports")
    return {
        "flow": tiny_pipeline(root / "flow", "diffusion", seed=1, scheduler=FLOW),
        "eps": tiny_pipeline(root / "eps", "diffusion", seed=2),
        "streaming": tiny_pipeline(root / "streaming", "streaming", seed=3),
        "flow_videofusion": tiny_pipeline(root / "flow_videofusion", "videofusion", seed=4, scheduler=FLOW),
    }


def sample(model: Path, out: Path, *extra: str, strategy: str = "ddim") -> tuple[int, str]:
    argv = [
        "--model", str(model), "--strategy", strategy, "--prompt", "a red bicycle", "--frames", "8",
        "--height", "32", "--width", "32", "--steps", str(STEPS), "--seed", "0", "--device", "cpu",
        "--quiet", "--out", str(out), *extra,
    ]
    return main(argv), str(out)


def flow_setup(sampler: str = "euler") -> SamplingSetup:
    sigmas = flow_sigmas(STEPS, 3.0)
    return SamplingSetup(
        timesteps=sigmas[:-1] * 1000, frame_shape=(1, 2, 2, 2), sigmas=sigmas, num_train_timesteps=1000, sampler=sampler
    )


def velocity(x: Tensor, t: Tensor) -> Tensor:
    """A fake flow network that depends on x and its float time input."""
    return torch.tanh(x) * (1 + t.view(-1, 1, 1, 1, 1) / 1000) - 0.2


def test_the_export_records_the_flow_objective_and_its_shift(exports: dict[str, Path]) -> None:
    assert read_index(exports["flow"]).scheduler == FLOW
    pipeline = load_pipeline(exports["flow"])
    assert pipeline.objective == "flow_matching" and pipeline.num_train_timesteps == 1000
    setup = pipeline_setup(pipeline, height=32, width=32, steps=STEPS, eta=0.0, device="cpu")
    assert setup.sampler == "euler"
    torch.testing.assert_close(setup.sigmas, shift_time(torch.linspace(1, 0, STEPS + 1, dtype=torch.float64), 3.0))
    shifted = pipeline_setup(pipeline, height=32, width=32, steps=STEPS, eta=0.0, device="cpu", shift=1.0)
    torch.testing.assert_close(shifted.sigmas, torch.linspace(1, 0, STEPS + 1, dtype=torch.float64))
    assert load_pipeline(exports["eps"]).objective == "diffusion"


@pytest.mark.parametrize("strategy", ["ddim", "vidrd"])
@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_ddim_and_vidrd_sample_a_flow_model(exports: dict[str, Path], tmp_path: Path, strategy: str, sampler: str) -> None:
    extra = ["--N", "2", "--M", "1"] if strategy == "vidrd" else []
    code, out = sample(exports["flow"], tmp_path / "v.mp4", "--sampler", sampler, "--guidance", "3", *extra, strategy=strategy)
    assert code == 0 and count_frames(Path(out)) == 8


def test_streaming_refines_with_a_flow_model2(exports: dict[str, Path], tmp_path: Path) -> None:
    code, out = sample(
        exports["streaming"], tmp_path / "s.mp4", "--model2", str(exports["flow"]), "--refine-size", "32x32",
        "--refine-t", "600", "--F", "5", "--O", "2", "--N", "4", strategy="streaming",
    )
    assert code == 0 and count_frames(Path(out)) == 8


def test_the_other_strategies_refuse_a_flow_model_naming_strategy_and_objective(exports: dict[str, Path]) -> None:
    pipeline = load_pipeline(exports["flow_videofusion"])
    for name, spec in STRATEGIES.items():
        if spec.flow:
            check_objective(name, pipeline)
            continue
        with pytest.raises(ValueError, match=rf"--strategy {name} .*flow_matching"):
            check_objective(name, pipeline)
    assert {name for name, spec in STRATEGIES.items() if spec.flow} == {"ddim", "vidrd", "streaming"}


def test_videofusion_refuses_a_flow_export_through_the_cli(exports: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, _ = sample(exports["flow_videofusion"], tmp_path / "vf.mp4", strategy="videofusion")
    assert code == 1
    assert "--strategy videofusion is derived for the DDPM forward process" in capsys.readouterr().err


@pytest.mark.parametrize(
    "model, extra, message",
    [
        ("flow", ["--sampler", "ddim"], "--sampler ddim: .* is a flow_matching model, whose samplers are euler, heun"),
        ("eps", ["--sampler", "heun"], "--sampler heun: .* is a diffusion model, whose samplers are ddim, dpmpp_2m"),
        ("eps", ["--shift", "3"], "--shift 3.0: .* is not a flow-matching model"),
        ("flow", ["--eta", "1"], "--eta 1.0: .* is a flow-matching model"),
        ("eps", ["--sampler", "dpmpp_2m", "--eta", "1"], "--eta 1.0: DPM-Solver"),
    ],
)
def test_a_sampler_or_knob_the_objective_lacks_is_refused(
    exports: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture, model: str, extra: list[str], message: str
) -> None:
    code, _ = sample(exports[model], tmp_path / "x.mp4", *extra)
    assert code == 1
    assert re.search(message, capsys.readouterr().err)


def test_dpm_solver_samples_an_eps_model_and_vidrd_refuses_the_multistep_solver(
    exports: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert sample(exports["eps"], tmp_path / "d.mp4", "--sampler", "dpmpp_2m")[0] == 0
    code, _ = sample(exports["eps"], tmp_path / "r.mp4", "--sampler", "dpmpp_2m", "--N", "2", "--M", "1", strategy="vidrd")
    assert code == 1 and "--sampler dpmpp_2m is multistep" in capsys.readouterr().err


def test_a_flow_window_is_the_flow_sampler_from_its_noise() -> None:
    """vidrd's first clip on a flow setup: Euler steps down the shifted times from N(0, I) noise,
    the network fed t' · T."""
    setup = flow_setup()
    config = vidrd.VidRDConfig(clip_frames=3, overlap=1)
    seen: list[float] = []

    def recording(x: Tensor, t: Tensor) -> Tensor:
        seen.append(float(t[0]))
        return velocity(x, t)

    clip, _ = vidrd.vidrd_clip(recording, None, setup=setup, config=config, seed=0)
    x_1 = clip_noise(setup, 3, unit_generator(0, "vidrd-clip", 0))
    torch.testing.assert_close(clip, flow_sample(velocity, x_1, setup.sigmas))
    torch.testing.assert_close(torch.tensor(seen, dtype=torch.float64), setup.sigmas[:-1] * 1000)


def test_a_heun_step_makes_two_calls_and_an_euler_step_into_zero_one() -> None:
    setup = flow_setup("heun")
    calls = []

    def counting(x: Tensor, t: Tensor) -> Tensor:
        calls.append(float(t[0]))
        return velocity(x, t)

    x_1 = torch.randn(1, 2, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    x = x_1
    for step in range(STEPS):
        x = denoise_step(counting, x, step, setup, torch.Generator())
    assert len(calls) == 2 * STEPS - 1
    torch.testing.assert_close(x, flow_sample(velocity, x_1, setup.sigmas, method="heun"))


def test_the_refinement_starts_at_the_flow_forward_process_of_t_prime() -> None:
    """StreamingT2V's SDEdit start on a flow refiner: the first time with t' · T <= T', reached by
    (1 - t') x_0 + t' ε with the blending's shared noise."""
    setup = streaming.refinement_steps(flow_setup(), 600)
    assert float(setup.timesteps[0]) <= 600 and setup.num_steps == len(setup.sigmas) - 1
    assert float(setup.sigmas[-1]) == 0.0
    config = blending.BlendingConfig(blend_frames=5, blend_overlap=2)
    latents = torch.randn(1, 2, 5, 2, 2, generator=torch.Generator().manual_seed(1))
    noised = blending.noised_chunk(latents, 0, setup, config, seed=0)
    noise = blending.shared_noise_chunk(0, setup, config, 0)
    torch.testing.assert_close(noised, flow_forward(latents, float(setup.sigmas[0]), noise))


def test_videofusion_refuses_another_sampler_than_ddim(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    model = tiny_pipeline(tmp_path / "videofusion", "videofusion", seed=5)
    code, _ = sample(model, tmp_path / "vf.mp4", "--sampler", "dpmpp_2m", strategy="videofusion")
    assert code == 1 and "--strategy videofusion steps with DDIM" in capsys.readouterr().err


def test_a_token_derived_shift_counts_the_latent_positions_at_the_sampled_size(tmp_path: Path) -> None:
    dynamic = FlowSchedulerSpec(**{**FLOW.__dict__, "shift_from_tokens": True})
    pipeline = load_pipeline(tiny_pipeline(tmp_path / "dynamic", "diffusion", seed=6, scheduler=dynamic))
    setups = {
        size: pipeline_setup(pipeline, height=size, width=size, steps=STEPS, eta=0.0, device="cpu", num_frames=4)
        for size in (32, 64)
    }
    for size, setup in setups.items():
        positions = 4 * (size // 4) ** 2  # the tiny VAE is /4 in space
        expected = token_shift(positions, base_tokens=256, max_tokens=4096, base_shift=0.5, max_shift=1.15)
        torch.testing.assert_close(setup.sigmas, flow_sigmas(STEPS, expected))
    assert bool((setups[64].sigmas[1:-1] > setups[32].sigmas[1:-1]).all())
