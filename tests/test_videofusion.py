"""VideoFusion's generators as the paper builds them: the residual generator sees the latent with
the estimated base component removed, b̂ is stop-gradient outside the middle frame, the residual
is conditioned on the frame index, and the base generator is an image network that can start
from an exported image model (`model.base_init_from`)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
from einops import rearrange

import model_zoo
from common.config import load_config
from model_zoo.videofusion import VideoFusion
from trainer.config import TrainJobConfig

REPO = Path(__file__).resolve().parent.parent
SMALL = [
    "data.height=32",
    "data.width=32",
    "train.micro_batch_size=2",
    "run.log_every=1",
    "train.warmup_steps=1",
]


def _seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _perturbed(model: torch.nn.Module, scale: float = 0.05) -> torch.nn.Module:
    """Seeded perturbation of every weight, so zero-initialised paths become observable."""
    generator = _seeded(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator))
    return model


def _inputs(frames: int = 5) -> dict[str, torch.Tensor]:
    return dict(
        z_t=torch.randn(2, 4, frames, 8, 8, generator=_seeded()),
        t=torch.tensor([300, 800]),
        alpha_bar=torch.tensor([0.6, 0.1]),
        context=torch.randn(2, 7, 32, generator=_seeded(2)),
    )


def _residual_input_hook(model: VideoFusion, frames: int) -> list[torch.Tensor]:
    """The residual network's input clips (B, C, T, H, W), recorded at its first convolution."""
    seen: list[torch.Tensor] = []
    model.residual.input_conv.register_forward_pre_hook(
        lambda _module, args: seen.append(rearrange(args[0], "(b t) c h w -> b c t h w", t=frames))
    )
    return seen


def test_residual_generator_sees_the_latent_with_the_estimated_base_removed() -> None:
    """Its input is z_t^i - sqrt(1 - ᾱ_t)·sqrt(λ)·b̂ for every frame, b̂ from the middle frame."""
    torch.manual_seed(0)
    model = _perturbed(model_zoo.build_model("videofusion", "tiny", lam=0.3))
    inputs = _inputs()
    seen = _residual_input_hook(model, 5)
    with torch.no_grad():
        eps = model(inputs["z_t"], inputs["t"], alpha_bar=inputs["alpha_bar"], context=inputs["context"])
        base = model.predict_base(inputs["z_t"], inputs["t"], context=inputs["context"])  # (B, C, 1, H, W)
        residual = model.predict_residual(seen[0], inputs["t"], context=inputs["context"])
    scale = (1 - inputs["alpha_bar"]).sqrt().view(2, 1, 1, 1, 1) * math.sqrt(0.3)
    torch.testing.assert_close(seen[0], inputs["z_t"] - scale * base, rtol=0, atol=1e-6)
    assert not torch.allclose(seen[0], inputs["z_t"], atol=1e-3)  # b̂ was actually removed
    torch.testing.assert_close(eps, math.sqrt(0.3) * base + math.sqrt(0.7) * residual)


def test_base_estimate_is_stop_gradient_outside_the_middle_frame() -> None:
    """b̂ passes gradient to the base generator only where it enters frame ⌊N/2⌋: through that
    frame's residual input and that frame's ε term; the other frames use it detached."""
    torch.manual_seed(0)
    model = _perturbed(model_zoo.build_model("videofusion", "tiny"))
    inputs = _inputs()
    seen = _residual_input_hook(model, 5)

    def base_grad(loss: torch.Tensor) -> float:
        model.zero_grad()
        loss.backward(retain_graph=True)
        return sum(float(p.grad.abs().sum()) for p in model.base.parameters() if p.grad is not None)

    eps = model(inputs["z_t"], inputs["t"], alpha_bar=inputs["alpha_bar"], context=inputs["context"])
    residual_input = seen[0]
    assert [base_grad(residual_input[:, :, i].sum()) == 0.0 for i in range(5)] == [
        True,
        True,
        False,
        True,
        True,
    ]
    # With the residual generator's output held fixed, only frame 2's ε term reaches the base.
    model.predict_residual = lambda x, t, **text: torch.zeros_like(x)  # type: ignore[method-assign]
    eps = model(inputs["z_t"], inputs["t"], alpha_bar=inputs["alpha_bar"], context=inputs["context"])
    assert [base_grad(eps[:, :, i].sum()) == 0.0 for i in range(5)] == [True, True, False, True, True]


def test_residual_generator_is_conditioned_on_the_frame_index() -> None:
    """Reordering the learned frame-index embeddings changes ε̂ (the only change made)."""
    torch.manual_seed(0)
    model = _perturbed(model_zoo.build_model("videofusion", "tiny"))
    inputs = _inputs()
    with torch.no_grad():
        before = model(inputs["z_t"], inputs["t"], alpha_bar=inputs["alpha_bar"], context=inputs["context"])
        model.frame_embed.weight.copy_(model.frame_embed.weight.flip(0) * 10)
        after = model(inputs["z_t"], inputs["t"], alpha_bar=inputs["alpha_bar"], context=inputs["context"])
    assert (after - before).abs().amax(dim=(0, 1, 3, 4)).min() > 1e-4  # every frame changes


def test_base_generator_is_an_image_network() -> None:
    """No temporal layer: b̂ does not depend on the frames other than the middle one, and run on
    a whole clip it acts frame by frame. A base with temporal layers is refused."""
    torch.manual_seed(0)
    model = _perturbed(model_zoo.build_model("videofusion", "tiny"))
    inputs = _inputs()
    edited = inputs["z_t"].clone()
    edited[:, :, [0, 1, 3, 4]] += torch.randn(2, 4, 4, 8, 8, generator=_seeded(5))
    with torch.no_grad():
        base = model.predict_base(inputs["z_t"], inputs["t"], context=inputs["context"])
        again = model.predict_base(edited, inputs["t"], context=inputs["context"])
        clip = model.base(inputs["z_t"], inputs["t"], context=inputs["context"])  # (B, C, 5, H, W)
        frame = model.base(inputs["z_t"][:, :, 1:2], inputs["t"], context=inputs["context"])
    assert torch.equal(base, again)
    torch.testing.assert_close(clip[:, :, 1:2], frame, rtol=0, atol=1e-5)
    video_base = dataclasses.replace(model.config.base, temporal_conv=True)
    with pytest.raises(ValueError, match="base generator is an image network"):
        VideoFusion(dataclasses.replace(model.config, base=video_base))


def test_load_base_names_the_source_and_the_keys_that_do_not_fit() -> None:
    model = model_zoo.build_model("videofusion", "tiny")
    image = model_zoo.build_model(
        "unet3d", "tiny", temporal_conv=False, temporal_attention=False, model_channels=16
    )
    with pytest.raises(
        ValueError,
        match=r"somewhere/denoiser: its weights do not fit the base generator; first mismatched keys: \['",
    ):
        model.load_base(image, "somewhere/denoiser")
    with pytest.raises(
        ValueError, match="somewhere: the base generator starts from a unet3d image network, not 'dit'"
    ):
        model.load_base(model_zoo.build_model("dit", "tiny"), "somewhere")
    same = model_zoo.build_from_config(model.config.base)
    model.load_base(same, "same")
    assert all(
        torch.equal(a, b)
        for a, b in zip(model.base.state_dict().values(), same.state_dict().values(), strict=True)
    )


def _config(run_dir: Path, shards: str, *extra: str) -> TrainJobConfig:
    return load_config(
        TrainJobConfig,
        REPO / "configs" / "tiny" / "videofusion.yaml",
        [*SMALL, f"data.shards={shards}", f"run.dir={run_dir}", *extra],
    )


@pytest.fixture(scope="module")
def image_export(tmp_path_factory: pytest.TempPathFactory, video_shards: str) -> Path:
    """An image network trained and exported by the system: `lvd train` of the tiny unet3d with
    its temporal layers off (one step), then `lvd export`."""
    from trainer.export import export
    from trainer.loop import train

    root = tmp_path_factory.mktemp("image")
    image_run = [
        "model.overrides={temporal_conv: false, temporal_attention: false}",
        "train.steps=1",
        "train.checkpoint_every=0",
    ]
    cfg = load_config(
        TrainJobConfig,
        REPO / "configs" / "tiny" / "unet3d.yaml",
        [*SMALL, f"data.shards={video_shards}", f"run.dir={root / 'run'}", *image_run],
    )
    assert train(cfg) == 0
    return export(root / "run", root / "export")


def test_base_init_from_starts_the_base_generator_from_an_image_export(tmp_path, video_shards, image_export):
    """`model.base_init_from=<lvd export>`: the base generator takes the image network's
    architecture and weights; the residual generator is built as usual."""
    from trainer.tasks import build_task

    image = model_zoo.from_pretrained(image_export / "denoiser")
    cfg = _config(tmp_path / "run", video_shards, f"model.base_init_from={image_export}")
    network = build_task(cfg, torch.device("cpu")).trained["model"]
    assert network.config.base == image.config
    got, want = network.base.state_dict(), image.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    fresh = build_task(_config(tmp_path / "fresh", video_shards), torch.device("cpu")).trained["model"]
    assert network.residual.config == fresh.residual.config


def test_base_init_from_refuses_what_is_not_a_fitting_image_network(tmp_path, video_shards):
    """A video network, other latent channels, another family or a missing folder: an error
    naming the path and the key."""
    from trainer.tasks import build_task

    def build(path: Path) -> None:
        build_task(
            _config(tmp_path / "run", video_shards, f"model.base_init_from={path}"), torch.device("cpu")
        )

    video = model_zoo.save_pretrained(model_zoo.build_model("unet3d", "tiny"), tmp_path / "video")
    with pytest.raises(
        ValueError,
        match=rf"model.base_init_from={video}: not an image network \(temporal_conv, temporal_attention on\)",
    ):
        build(video)
    other = model_zoo.build_model(
        "unet3d", "tiny", in_channels=8, out_channels=8, temporal_conv=False, temporal_attention=False
    )
    wide = model_zoo.save_pretrained(other, tmp_path / "wide")
    with pytest.raises(
        ValueError, match=rf"model.base_init_from={wide}: .*in_channels \(export 8, this run 4\)"
    ):
        build(wide)
    dit = model_zoo.save_pretrained(model_zoo.build_model("dit", "tiny"), tmp_path / "dit")
    with pytest.raises(ValueError, match=rf"model.base_init_from={dit}: a dit network"):
        build(dit)
    with pytest.raises(FileNotFoundError, match=rf"model.base_init_from={tmp_path / 'nothing'}"):
        build(tmp_path / "nothing")
    both = _config(tmp_path / "run", video_shards, f"model.base_init_from={wide}", f"model.init_from={wide}")
    with pytest.raises(
        ValueError, match=rf"model.base_init_from={wide} and model.init_from={wide}: give one"
    ):
        build_task(both, torch.device("cpu"))
