"""configs/pretrained/*: each paper's recipe starts from a Stable Diffusion image U-Net (a tiny
real-format random SD pipeline folder here): at step 0 its denoiser is the 2-D U-Net on every
frame, and the config trains. The weights folders are required from the command line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hf_checkpoints import write_pipeline

from common.config import ConfigError, load_config
from trainer.config import TrainJobConfig
from trainer.loop import train
from trainer.tasks import build_task

REPO = Path(__file__).resolve().parent.parent
CONFIGS = sorted(p.name for p in (REPO / "configs" / "pretrained").glob("*.yaml"))
SMALL = ["data.height=32", "data.width=32", "data.frames=4", "train.micro_batch_size=2", "train.steps=2", "train.warmup_steps=1"]


@pytest.fixture(scope="module")
def sd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_pipeline(tmp_path_factory.mktemp("sd") / "sd")


def _weights(name: str, sd: Path) -> list[str]:
    """The command-line keys each config requires, pointing into the SD pipeline folder."""
    helpers = [f"model.vae={sd / 'vae'}", f"model.text_encoder={sd / 'text_encoder'}"]
    if name.startswith("videofusion"):
        return [f"model.base_init_from={sd / 'unet'}", "model.flavor=tiny", *helpers]
    if name.startswith("cmd_content"):
        return [f"model.init_from={sd / 'unet'}", f"model.content_vae={sd / 'vae'}", "model.vae=cmd/tiny", f"model.text_encoder={sd / 'text_encoder'}"]
    return [f"model.init_from={sd / 'unet'}", *helpers]


def _per_frame_2d(sd: Path, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """The SD U-Net (diffusers) on every frame of x (B, C, T, h, w)."""
    from diffusers import UNet2DConditionModel

    image = UNet2DConditionModel.from_pretrained(sd / "unet").eval()
    b, c, frames, h, w = x.shape
    flat = x.permute(0, 2, 1, 3, 4).reshape(b * frames, c, h, w)
    with torch.no_grad():
        out = image(flat, t.repeat_interleave(frames), encoder_hidden_states=context.repeat_interleave(frames, 0)).sample
    return out.reshape(b, frames, c, h, w).permute(0, 2, 1, 3, 4)


def _step0_output(name: str, network: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """The task's denoiser on a clean-latent input with its extra inputs at their neutral value:
    LVDM's mask channel zero (any level), VideoFusion's base generator (an image network)."""
    with torch.no_grad():
        if name.startswith("lvdm"):
            mask = torch.zeros_like(x[:, :1])
            return network(torch.cat([x, mask], dim=1), t, context=context, level=torch.tensor([3]))
        if name.startswith("videofusion"):
            return network.base(x, t, context=context)
        return network(x, t, context=context)


@pytest.mark.parametrize("name", CONFIGS)
def test_pretrained_config_starts_from_the_image_unet_and_trains(name: str, sd: Path, tmp_path: Path, video_shards: str) -> None:
    shards = f"{video_shards}::{video_shards}" if name.startswith("vidrd") else video_shards
    overrides = [*SMALL, f"data.shards={shards}", f"run.dir={tmp_path / 'run'}", *_weights(name, sd)]
    cfg = load_config(TrainJobConfig, REPO / "configs" / "pretrained" / name, overrides)
    network = build_task(cfg, torch.device("cpu")).trained["model"].eval()
    generator = torch.Generator().manual_seed(0)
    frames = 1 if name.startswith("cmd_content") else 3
    x = torch.randn(1, 4, frames, 16, 16, generator=generator)
    t, context = torch.tensor([500]), torch.randn(1, 77, 32, generator=generator)
    torch.testing.assert_close(_step0_output(name, network, x, t, context), _per_frame_2d(sd, x, t, context), rtol=1e-5, atol=1e-5)
    assert train(cfg) == 0


@pytest.mark.parametrize("name", CONFIGS)
def test_pretrained_config_names_the_missing_weights_key(name: str) -> None:
    with pytest.raises(ConfigError, match=r"^model\.\w+: required: give it on the command line"):
        load_config(TrainJobConfig, REPO / "configs" / "pretrained" / name, ["data.shards=x.tar"])


@pytest.mark.slow
@pytest.mark.extended  # two training runs, an export and a sampling run: outside the default suite's budget
def test_cmd_content_from_sd_bundles_and_samples(sd: Path, tmp_path: Path, video_shards: str) -> None:
    """The SD content stage and a motion stage on the same CMD autoencoder and text encoder bundle
    into one `cmd` export holding the content VAE, and `lvd sample --strategy cmd` decodes with it."""
    import av

    from lvd.cli import main
    from sampler.pipeline import load_pipeline

    common = [f"data.shards={video_shards}", "data.height=16", "data.width=16", "data.frames=4", "train.steps=2",
              "train.warmup_steps=1", "run.progress=quiet", f"model.text_encoder={sd / 'text_encoder'}"]
    content, motion = tmp_path / "content", tmp_path / "motion"
    weights = [f"model.init_from={sd / 'unet'}", f"model.content_vae={sd / 'vae'}", "model.vae=cmd/tiny"]
    assert main(["train", "--config", str(REPO / "configs" / "pretrained" / "cmd_content_from_sd.yaml"), f"run.dir={content}", *weights, *common]) == 0
    assert main(["train", "--config", str(REPO / "configs" / "tiny" / "cmd_motion.yaml"), f"run.dir={motion}", *common]) == 0
    bundle = tmp_path / "cmd"
    assert main(["export", "--run", str(content), "--run", str(motion), "--out", str(bundle)]) == 0
    pipeline = load_pipeline(bundle)
    assert set(pipeline.networks) == {"denoiser", "content_denoiser", "content_vae", "vae", "text_encoder"}
    out = tmp_path / "video.mp4"
    args = ["sample", "--strategy", "cmd", "--model", str(bundle), "--prompt", "a cat", "--frames", "6", "--steps", "2", "--out", str(out), "--quiet", "--device", "cpu"]
    assert main(args) == 0
    with av.open(str(out)) as container:
        assert sum(1 for _ in container.decode(video=0)) == 6
