"""`--strategy streaming` as StreamingT2V builds it: the first chunk from the base text-to-video
U-Net alone, whose first frame is APM's anchor for every later chunk; then the refiner, a separate
text-to-video export (--model2) at twice the size, SDEdit from T' < T over F/O chunks with shared
overlap noise; clear errors for a missing or unfit --model2; and the whole command on exports
that `lvd train` + `lvd export` made from real shards."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO
from safetensors.torch import load_file

import model_zoo
from lvd.cli import main as lvd_main
from lvd.demo_data import read_mp4
from model_zoo.diffusion.objectives import q_sample
from model_zoo.diffusion.samplers import ddim
from sampler.pipeline import anchor_embedding, load_pipeline, save_pipeline
from sampler.strategies import streaming as streaming_module
from sampler.strategies.seeding import unit_generator
from sampler.tiny import tiny_pipeline, wake_zero_parameters

PROMPT = "a red bicycle"
SEED = 4
GUIDANCE = 7.5
COMMON = [
    "--prompt",
    PROMPT,
    "--height",
    "32",
    "--width",
    "32",
    "--device",
    "cpu",
    "--quiet",
    "--seed",
    str(SEED),
]
REFINE = ["--frames", "28", "--N", "4", "--F", "6", "--O", "2", "--steps", "4", "--refine-t", "500"]
"""The refined run: 14 latent frames (the tiny VAE halves time), 3 chunks of F = 6 overlapping by O = 2."""


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny StreamingT2V export over a known base U-Net (saved on its own too), and tiny
    text-to-video refiners: one that fits, one trained at 48 x 48, one whose latents do not fit."""
    root = tmp_path_factory.mktemp("streaming_exports")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = model_zoo.build_model("streaming_t2v", "tiny")
        base = wake_zero_parameters(model_zoo.build_from_config(model.config.base), seed=1)
        model.load_base_state_dict(base.state_dict())
        networks = {
            "denoiser": wake_zero_parameters(model, seed=2),  # CAM's and APM's zero-initialised layers
            "vae": model_zoo.build_model("video_vae", "tiny"),
            "text_encoder": model_zoo.build_model("text_encoder", "tiny"),
            "image_encoder": model_zoo.build_model("image_encoder", "tiny"),
        }
        five_channels = {
            "denoiser": model_zoo.build_model("unet3d", "tiny", in_channels=5),
            "vae": model_zoo.build_model("video_vae", "tiny"),
            "text_encoder": model_zoo.build_model("text_encoder", "tiny"),
        }
    model_zoo.save_pretrained(base, root / "base")
    trained_48 = tiny_pipeline(root / "refiner48", "diffusion", seed=4)
    index = json.loads((trained_48 / "model_index.json").read_text())
    index["sample_size"] = {"frames": 8, "height": 48, "width": 48}
    (trained_48 / "model_index.json").write_text(json.dumps(index))
    return {
        "streaming": save_pipeline(root / "streaming", "streaming", networks),
        "base": root / "base",
        "refiner": tiny_pipeline(root / "refiner", "diffusion", seed=3),
        "refiner48": trained_48,
        "refiner_5ch": save_pipeline(root / "refiner_5ch", "diffusion", five_channels),
    }


def parts(out: Path, prefix: str) -> list[dict[str, torch.Tensor]]:
    return [
        load_file(str(path)) for path in sorted(out.with_suffix(".parts").glob(f"{prefix}-*.safetensors"))
    ]


def test_the_first_chunk_is_the_base_alone_and_its_first_frame_anchors_the_rest(
    exports, tmp_path, monkeypatch
):
    """Chunk 0 is a DDIM run of the base U-Net (no CAM, no APM) from the chunk's noise; the
    StreamingT2V model runs only for the later chunks, and APM always reads the embedding of
    chunk 0's decoded first frame."""
    from model_zoo.streaming import StreamingT2V

    anchors = []
    original = StreamingT2V.forward

    def recording(self, x, t, **kwargs):
        anchors.append(kwargs["anchor"].clone())
        return original(self, x, t, **kwargs)

    monkeypatch.setattr(StreamingT2V, "forward", recording)
    out = tmp_path / "v.mp4"
    argv = ["sample", "--model", str(exports["streaming"]), "--strategy", "streaming", "--no-refine"]
    assert lvd_main([*argv, "--frames", "24", "--N", "4", "--steps", "3", "--out", str(out), *COMMON]) == 0
    chunks = parts(out, "stream")
    assert len(chunks) == 3

    pipeline = load_pipeline(exports["streaming"])
    base = model_zoo.from_pretrained(exports["base"]).eval()
    text, empty = pipeline.text_context(PROMPT), pipeline.text_context("")

    def guided(x, t):
        uncond = base(x, t, context=empty)
        return uncond + GUIDANCE * (base(x, t, context=text) - uncond)

    generator = unit_generator(SEED, "streaming-chunk", 0)
    x_T = torch.randn((1, pipeline.vae.latent_channels, 4, 8, 8), generator=generator)
    schedule = pipeline.schedule
    with torch.no_grad():
        expected = ddim(
            guided,
            x_T,
            schedule.timesteps(3),
            alphas_cumprod=schedule.alphas_cumprod,
            parameterization=schedule.parameterization,
            generator=generator,
            final_alpha_cumprod=schedule.final_alpha_cumprod,
        )
        first_frame = pipeline.vae.from_latents(chunks[0]["latents"][:, :, :1])[:, :, 0]  # (1, 3, 32, 32)
        anchor = anchor_embedding(pipeline, first_frame)
        grey = anchor_embedding(pipeline, torch.zeros_like(first_frame))
    torch.testing.assert_close(chunks[0]["latents"], expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(chunks[0]["anchor"], anchor, rtol=0, atol=1e-6)
    assert not torch.allclose(anchor, grey, atol=1e-3)
    assert len(anchors) == 2 * 3 * 2  # chunks 1 and 2 only: 3 steps of 2 guidance branches
    assert all(torch.equal(seen, chunks[0]["anchor"]) for seen in anchors)


@pytest.fixture(scope="module")
def refined(exports, tmp_path_factory) -> tuple[Path, list[tuple[Path, torch.Tensor, torch.Tensor]]]:
    """A refined video by `lvd sample`, and every call of the refinement's text-to-video
    denoiser: (its pipeline folder, x, t)."""
    out = tmp_path_factory.mktemp("refined") / "v.mp4"
    calls = []
    original = streaming_module.text_denoiser

    def recording(pipeline, *args, **kwargs):
        denoise = original(pipeline, *args, **kwargs)

        def recorded(x, t):
            calls.append((pipeline.path, x.clone(), t.clone()))
            return denoise(x, t)

        return recorded

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(streaming_module, "text_denoiser", recording)
        argv = ["sample", "--model", str(exports["streaming"]), "--model2", str(exports["refiner"])]
        assert lvd_main([*argv, "--strategy", "streaming", "--out", str(out), *REFINE, *COMMON]) == 0
    return out, calls


def test_the_refiner_runs_model2_at_twice_the_size_and_the_mp4_has_its_size(exports, refined):
    out, calls = refined
    assert calls and {path for path, _, _ in calls} == {exports["refiner"]}
    assert {tuple(x.shape) for _, x, _ in calls} == {(1, 4, 6, 16, 16)}  # 64 x 64 pixels, /4 by the VAE
    assert read_mp4(out).shape == (28, 64, 64, 3)
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["model2"]["path"] == str(exports["refiner"].resolve())


def expected_start(exports: dict[str, Path], out: Path) -> tuple[list[torch.Tensor], list[torch.Tensor], int]:
    """Per refinement chunk: the upsampled video's latents and its shared noise, and the start
    timestep t0: the stage-1 video decoded, bilinearly resized to 64 x 64 and encoded by --model2's
    VAE; noise drawn per global latent frame."""
    base, refiner = load_pipeline(exports["streaming"]), load_pipeline(exports["refiner"])
    stage1 = torch.cat([chunk["latents"] for chunk in parts(out, "stream")], dim=2)[:, :, :14]
    with torch.no_grad():
        video = base.vae.from_latents(stage1)[:, :, :28].clamp(-1, 1)  # (1, 3, 28, 32, 32)
        frames = F.interpolate(video[0].transpose(0, 1), size=(64, 64), mode="bilinear", align_corners=False)
        latents = refiner.vae.to_latents(frames.transpose(0, 1)[None], unit_generator(SEED, "refine-encode"))
    noise = torch.stack(
        [torch.randn((1, 4, 16, 16), generator=unit_generator(SEED, "blend-noise", f)) for f in range(14)],
        dim=2,
    )
    timesteps = refiner.schedule.timesteps(4)
    starts = [0, 4, 8]  # chunks of F = 6 every F - O = 4 latent frames
    return (
        [latents[:, :, s : s + 6] for s in starts],
        [noise[:, :, s : s + 6] for s in starts],
        int(timesteps[timesteps <= 500][0]),
    )


def test_the_refinement_starts_from_the_upsampled_video_noised_to_t_prime(exports, refined):
    """--refine-t 500 < T = 1000: --model2 runs only the DDIM steps with t <= 500, and its first
    input is the upsampled, re-encoded video noised to the first of them (SDEdit)."""
    out, calls = refined
    refiner = load_pipeline(exports["refiner"])
    timesteps = refiner.schedule.timesteps(4)
    wanted = [int(t) for t in timesteps if t <= 500]
    assert wanted and max(wanted) <= 500 < len(refiner.schedule.alphas_cumprod)
    assert [int(t[0]) for _, _, t in calls] == [t for t in wanted for _ in range(3)]  # 3 chunks per step
    clean, noise, t0 = expected_start(exports, out)
    for index in range(3):
        start = q_sample(clean[index], t0, noise[index], refiner.schedule.alphas_cumprod).float()
        torch.testing.assert_close(calls[index][1], start, rtol=0, atol=1e-4)


def test_the_refinement_overlaps_share_their_noise(exports, refined):
    """At --model2's size, the O = 2 frames two chunks share start from the same noise, and the
    noise differs from frame to frame."""
    out, calls = refined
    refiner = load_pipeline(exports["refiner"])
    clean, _, t0 = expected_start(exports, out)
    alpha_bar = refiner.schedule.alphas_cumprod[t0].float()
    starts = [calls[index][1] for index in range(3)]
    assert all(x.shape[-2:] == (16, 16) for x in starts)
    drawn = [(x - alpha_bar.sqrt() * z) / (1 - alpha_bar).sqrt() for x, z in zip(starts, clean)]
    for left, right in zip(drawn, drawn[1:]):
        torch.testing.assert_close(left[:, :, -2:], right[:, :, :2], rtol=0, atol=1e-4)
        assert not torch.allclose(left[:, :, 0], left[:, :, 1], atol=0.1)


@pytest.mark.parametrize(
    "model2, flags, code, needed",
    [
        (None, [], 1, ["give --model2 PATH, or --no-refine"]),
        ("refiner48", [], 1, ["was trained at 48x48", "--refine-size 64x64 (2x --height and --width)"]),
        ("refiner", ["--refine-size", "62x64"], 1, ["--refine-size 62x64", "VAE factors (4, 4)"]),
        ("refiner_5ch", [], 1, ["takes 5 latent channels, its VAE gives 4"]),
        ("refiner", ["--refine-t", "1000"], 1, ["--refine-t 1000", "T = 1000"]),
        ("refiner", ["--refine-size", "64"], 2, ["--refine-size '64': give HEIGHTxWIDTH"]),
    ],
)
def test_a_missing_or_unfit_refiner_is_one_clear_error(
    exports, tmp_path, capsys, model2, flags, code, needed
):
    argv = [
        "sample",
        "--model",
        str(exports["streaming"]),
        "--strategy",
        "streaming",
        "--out",
        str(tmp_path / "v.mp4"),
    ]
    argv += ["--model2", str(exports[model2])] if model2 else []
    assert lvd_main([*argv, *REFINE, *COMMON, *flags]) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and all(text in err[0] for text in needed), err
    assert not (tmp_path / "v.mp4").exists()


def test_streaming_with_a_refiner_on_exports_the_cli_trained(tmp_path, video_shards):
    """`lvd train` + `lvd export` on real shards: a text-to-video base at 32 x 32, CAM + APM over
    it, and a text-to-video refiner at 64 x 64; `lvd sample --strategy streaming --model2` then
    writes a 64 x 64 mp4."""
    small = ["train.steps=2", "train.checkpoint_every=0", "train.micro_batch_size=2"]

    def train_and_export(name: str, config: str, *overrides: str) -> Path:
        run, export = tmp_path / name, tmp_path / f"{name}-export"
        config_path = str(REPO / "configs" / "tiny" / config)
        assert (
            lvd_main(
                [
                    "train",
                    "--config",
                    config_path,
                    f"data.shards={video_shards}",
                    f"run.dir={run}",
                    *small,
                    *overrides,
                ]
            )
            == 0
        )
        assert lvd_main(["export", "--run", str(run), "--out", str(export)]) == 0
        return export

    base = train_and_export("base", "unet3d.yaml", "data.height=32", "data.width=32")
    model = train_and_export(
        "streaming", "streaming.yaml", "data.height=32", "data.width=32", f"model.base={base}/denoiser"
    )
    refiner = train_and_export("refiner", "unet3d.yaml", "data.height=64", "data.width=64")
    out = tmp_path / "long.mp4"
    argv = [
        "sample",
        "--strategy",
        "streaming",
        "--model",
        str(model),
        "--model2",
        str(refiner),
        "--prompt",
        PROMPT,
    ]
    argv += [
        "--frames",
        "24",
        "--N",
        "4",
        "--F",
        "6",
        "--O",
        "2",
        "--steps",
        "3",
        "--device",
        "cpu",
        "--quiet",
    ]
    assert lvd_main([*argv, "--out", str(out)]) == 0
    assert read_mp4(out).shape == (24, 64, 64, 3)
    assert json.loads(out.with_suffix(".json").read_text())["model2"]["path"] == str(refiner.resolve())


def test_no_apm_keeps_the_first_chunk_and_drops_the_anchor_from_the_later_ones(
    exports, tmp_path, monkeypatch
):
    """--no-apm (APM's ablation): chunk 0 is the same base chunk, the later chunks are sampled
    with anchor=None (the model without APM), so they differ from the APM run's."""
    from model_zoo.streaming import StreamingT2V

    anchors = []
    original = StreamingT2V.forward

    def recording(self, x, t, **kwargs):
        anchors.append(kwargs["anchor"])
        return original(self, x, t, **kwargs)

    monkeypatch.setattr(StreamingT2V, "forward", recording)
    argv = ["sample", "--model", str(exports["streaming"]), "--strategy", "streaming", "--no-refine"]
    argv += ["--frames", "16", "--N", "4", "--steps", "2", *COMMON]
    runs = {}
    for name, flags in (("apm", []), ("no_apm", ["--no-apm"])):
        anchors.clear()
        assert lvd_main([*argv, *flags, "--out", str(tmp_path / f"{name}.mp4")]) == 0
        runs[name] = (parts(tmp_path / f"{name}.mp4", "stream"), list(anchors))
    (with_apm, seen_with), (without, seen_without) = runs["apm"], runs["no_apm"]
    assert seen_with and all(anchor is not None for anchor in seen_with)
    assert len(seen_without) == len(seen_with) and all(anchor is None for anchor in seen_without)
    assert torch.equal(with_apm[0]["latents"], without[0]["latents"])
    assert not torch.allclose(with_apm[1]["latents"], without[1]["latents"], atol=1e-4)
