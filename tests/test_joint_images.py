"""Joint image + video training on real shards: plain image shards, the keyed modality schedule,
a real DeepSpeed run that trains on both (per-modality losses in TensorBoard), exact resume after
a kill inside a save, the U-Net's image mode, and the tasks that refuse image shards."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import model_zoo
from common.config import ConfigError, load_config
from data_pipeline.config import DataConfig
from data_pipeline.joint import JointLoader, build_training_loader, load_loader_state, scheduled_modality
from data_pipeline.shard_cli import main as shard_main
from data_pipeline.tario import iter_samples
from trainer.config import TrainJobConfig
from trainer.monitor import read_metrics
from trainer.tasks.images import check_image_network

REPO = Path(__file__).resolve().parent.parent
IMAGES = ("astronaut", "coffee", "chelsea", "china", "flower", "rocket", "stamp_crow", "stamp_owl")
STEPS, RATIO, SEED = 6, 0.5, 0
TRAIN = [
    "--config", "configs/tiny/unet3d.yaml", "data.height=32", "data.width=32", "train.micro_batch_size=1",
    "train.warmup_steps=2", f"train.steps={STEPS}", "train.checkpoint_every=3", "run.log_every=1",
    f"data.image_ratio={RATIO}", f"train.seed={SEED}",
]  # fmt: skip


@pytest.fixture(scope="module")
def image_shards(media_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Plain captioned-image shards (`lvd shard images --plain`) of eight bundled images."""
    root = tmp_path_factory.mktemp("joint")
    folder = root / "in"
    folder.mkdir()
    for name in IMAGES:
        source = next(path for path in (media_dir / "images").glob(f"{name}.*") if path.suffix != ".txt")
        os.symlink(source, folder / source.name)
        os.symlink(source.with_suffix(".txt"), folder / f"{name}.txt")
    out = root / "images"
    args = ["images", "--plain", "--input", str(folder), "--out", str(out), "--size", "40", "--shard-size-mb", "0.01"]
    assert shard_main(args) == 0
    return out


def test_plain_image_shards_hold_jpgs_with_captions(image_shards, media_dir):
    samples = [sample for shard in sorted(image_shards.glob("*.tar")) for sample in iter_samples(str(shard))]
    assert len(samples) == len(IMAGES)
    for sample in samples:
        assert set(sample.files) == {"jpg", "txt", "json"}
        assert sample.files["jpg"][:2] == b"\xff\xd8"
    captions = {sample.files["txt"].decode() for sample in samples}
    assert (media_dir / "images" / "coffee.txt").read_text().splitlines()[0].strip() in captions


def test_modality_schedule_is_keyed_and_follows_the_ratio():
    draws = [scheduled_modality(3, n, 0.25) for n in range(4000)]
    assert draws == [scheduled_modality(3, n, 0.25) for n in range(4000)]
    assert 0.22 < draws.count("image") / len(draws) < 0.28
    assert draws != [scheduled_modality(4, n, 0.25) for n in range(4000)]
    assert set(scheduled_modality(3, n, 0.0) for n in range(100)) == {"video"}


def _data(video_shards: str, image_shards: Path, **extra) -> DataConfig:
    values = dict(shards=video_shards, image_shards=str(image_shards), image_ratio=RATIO, height=32, width=32)
    return DataConfig(**(values | extra))


def test_joint_loader_gives_one_modality_per_batch_and_resumes_both_streams(video_shards, image_shards):
    cfg = _data(video_shards, image_shards, shuffle_buffer=4)

    def loader() -> JointLoader:
        return build_training_loader(cfg, rank=0, world_size=1, batch_size=2, seed=SEED, tokenizer=None)

    first = loader()
    batches = [next(first) for _ in range(8)]
    assert [b["modality"] for b in batches] == [scheduled_modality(SEED, n, RATIO) for n in range(8)]
    for batch in batches:
        frames, size = (1, 2 * cfg.frames) if batch["modality"] == "image" else (cfg.frames, 2)
        assert tuple(batch["video"].shape) == (size, 3, frames, 32, 32)
    assert {b["modality"] for b in batches} == {"image", "video"}
    state = first.state_dict()
    following = [next(first) for _ in range(6)]
    resumed = loader()
    resumed.load_state_dict(state)
    again = [next(resumed) for _ in range(6)]
    assert [b["caption"] for b in again] == [b["caption"] for b in following]
    assert all(torch.equal(a["video"], b["video"]) for a, b in zip(again, following, strict=True))


def test_a_resume_that_adds_or_drops_image_shards_is_refused_naming_the_key(video_shards, image_shards):
    joint_cfg = _data(video_shards, image_shards)
    video_cfg = DataConfig(shards=video_shards, height=32, width=32)
    joint = build_training_loader(joint_cfg, rank=0, world_size=1, batch_size=2, seed=SEED, tokenizer=None)
    video = build_training_loader(video_cfg, rank=0, world_size=1, batch_size=2, seed=SEED, tokenizer=None)
    with pytest.raises(ValueError, match=r"^data\.image_shards: .*with image shards"):
        load_loader_state(video, joint.state_dict())
    with pytest.raises(ValueError, match=r"^data\.image_shards: .*without image shards"):
        load_loader_state(joint, video.state_dict())


def test_image_batch_size_is_configurable(video_shards, image_shards):
    cfg = _data(video_shards, image_shards, image_ratio=1.0, image_batch_size=3)
    loader = build_training_loader(cfg, rank=0, world_size=1, batch_size=2, seed=SEED, tokenizer=None)
    assert tuple(next(loader)["video"].shape) == (3, 3, 1, 32, 32)


def _perturbed_unet(zero_temporal: bool) -> torch.nn.Module:
    """unet3d/tiny with random weights everywhere (the zero-initialised output layers too), the
    temporal layers' last projections left at zero when `zero_temporal`."""
    torch.manual_seed(0)
    model = model_zoo.build_model("unet3d", "tiny").eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if zero_temporal and ".temporal." in name and ("proj_out" in name or ".conv." in name):
                continue
            param.add_(torch.randn_like(param) * 0.05)
    return model


def test_unet_image_mode_skips_the_temporal_layers():
    model = _perturbed_unet(zero_temporal=True)
    batch, frames = 2, 4
    x = torch.randn(batch, 4, frames, 16, 16)
    t = torch.tensor([100, 700])
    context = torch.randn(batch, 7, 32)
    with torch.no_grad():
        video_out = model(x, t, context=context)
        images = x.transpose(1, 2).reshape(batch * frames, 4, 1, 16, 16)  # each frame an image
        image_out = model(images, t.repeat_interleave(frames), context=context.repeat_interleave(frames, 0), image_mode=True)
    assert video_out.abs().max() > 1e-3
    # At zero-initialised temporal layers a clip's output is its frames' image-mode output.
    torch.testing.assert_close(image_out.reshape(batch, frames, 4, 16, 16).transpose(1, 2), video_out, rtol=1e-4, atol=1e-5)
    # The image-mode output does not depend on the temporal layers at all.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".temporal." in name:
                param.add_(torch.randn_like(param))
        perturbed_video = model(x, t, context=context)
        perturbed_image = model(images, t.repeat_interleave(frames), context=context.repeat_interleave(frames, 0), image_mode=True)
    assert not torch.allclose(perturbed_video, video_out, atol=1e-3)
    assert torch.equal(perturbed_image, image_out)


@pytest.mark.parametrize(
    "overrides",
    [
        ["objective.task=autoencoder"],
        ["objective.task=videofusion", "model.family=videofusion"],
        ["objective.task=streaming"],
        ["objective.task=cmd_autoencoder"],
        ["model.family=cmd"],
    ],
)
def test_tasks_that_cannot_use_images_refuse_the_key(overrides):
    with pytest.raises(ConfigError, match=r"^data\.image_shards: .*cannot train on images"):
        load_config(TrainJobConfig, None, ["data.image_shards=x", "data.image_ratio=0.5", *overrides])


def test_image_settings_are_checked_together():
    with pytest.raises(ConfigError, match=r"^data\.image_ratio: is 0 but image_shards is set"):
        load_config(TrainJobConfig, None, ["data.image_shards=x"])
    with pytest.raises(ConfigError, match=r"^data\.image_shards: .*latent"):
        load_config(TrainJobConfig, None, ["data.image_shards=x", "data.image_ratio=0.5", "data.latent=true"])


def test_a_dit_that_patches_frames_together_refuses_images():
    check_image_network(model_zoo.build_model("dit", "tiny"))
    check_image_network(model_zoo.build_model("video_dit", "tiny"))
    with pytest.raises(ValueError, match=r"^data\.image_shards: .*patches 2 frames together"):
        check_image_network(model_zoo.build_model("dit", "tiny", patch_size=(2, 2, 2)))


def _train(run_dir: Path, video_shards: str, image_shards: Path, *extra: str, env: dict[str, str] | None = None, nproc: int = 1):
    cmd = [sys.executable, "-m", "lvd", "train", "--nproc", str(nproc), *TRAIN, f"data.shards={video_shards}"]
    cmd += [f"data.image_shards={image_shards}", f"run.dir={run_dir}", *extra]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", **(env or {})}
    return subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=600)


def _expected_image_steps(steps: int) -> list[int]:
    return [step for step in range(1, steps + 1) if scheduled_modality(SEED, step - 1, RATIO) == "image"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, video_shards, image_shards) -> Path:
    """An uninterrupted single-rank DeepSpeed run (ZeRO-2) on video and image shards."""
    run_dir = tmp_path_factory.mktemp("joint_run")
    result = _train(run_dir, video_shards, image_shards, "train.zero_stage=2")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return run_dir


@pytest.mark.slow
def test_one_run_trains_on_both_and_logs_the_loss_per_modality(reference):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    image_steps = _expected_image_steps(STEPS)
    assert 0 < len(image_steps) < STEPS  # the seed's draw holds both modalities
    events = EventAccumulator(str(reference / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss_image")] == image_steps
    video_steps = [step for step in range(1, STEPS + 1) if step not in image_steps]
    assert [e.step for e in events.Scalars("train/loss_video")] == video_steps
    records = read_metrics(reference)
    for step, record in records.items():
        modality = "image" if step in image_steps else "video"
        assert record[f"loss_{modality}"] == record["loss"] and f"loss_{'video' if modality == 'image' else 'image'}" not in record
    flops = read_rank_state_flops(reference)
    assert {key.split("x")[2] for key in flops} == {"1", "8"}  # one-frame image and 8-frame video batches


def read_rank_state_flops(run_dir: Path) -> dict[str, float]:
    from trainer.checkpoint import read_rank_state

    return read_rank_state(run_dir / "checkpoints", f"step_{STEPS:08d}", 0).counters.flops_by_shape


@pytest.mark.slow
def test_a_run_killed_in_a_save_resumes_both_streams_exactly(reference, tmp_path, video_shards, image_shards):
    run_dir = tmp_path / "interrupted"
    killed = _train(run_dir, video_shards, image_shards, "train.zero_stage=2", env={"LVD_FAULT": f"kill_in_save:{STEPS}"})
    assert killed.returncode != 0
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000003"
    assert {"image", "video"} <= {scheduled_modality(SEED, n, RATIO) for n in range(3)}  # both loaders moved
    resumed = _train(run_dir, video_shards, image_shards, "train.zero_stage=2")
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    ours, theirs = read_metrics(run_dir), read_metrics(reference)
    for key in ("loss", "loss_image", "loss_video"):
        assert [ours[s].get(key) for s in range(1, STEPS + 1)] == [theirs[s].get(key) for s in range(1, STEPS + 1)]
    from trainer.engine import consolidated_state_dict

    tag = f"step_{STEPS:08d}"
    final = consolidated_state_dict(run_dir / "checkpoints" / tag, "model")
    expected = consolidated_state_dict(reference / "checkpoints" / tag, "model")
    assert all(torch.equal(final[name], expected[name]) for name in expected)


@pytest.mark.multirank
@pytest.mark.extended  # the keyed draw equal on every rank is shown in-process; this is its 2-rank run
def test_two_rank_zero2_run_takes_one_modality_per_step(tmp_path, video_shards, image_shards):
    run_dir = tmp_path / "two_ranks"
    result = _train(run_dir, video_shards, image_shards, "train.zero_stage=2", "train.steps=4", "train.checkpoint_every=0", nproc=2)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    records = read_metrics(run_dir)
    assert [s for s in sorted(records) if "loss_image" in records[s]] == _expected_image_steps(4)
    assert all(("loss_video" in records[s]) != ("loss_image" in records[s]) for s in records)


@pytest.mark.parametrize(
    "config, overrides",
    [
        ("unet3d.yaml", []),
        ("unet3d.yaml", ["objective.image_rate=0.5"]),
        ("lvdm_prediction.yaml", []),
        ("lvdm_interpolation.yaml", []),
        ("dit.yaml", []),
        ("video_dit.yaml", []),
    ],
)
def test_image_capable_tasks_train_on_an_image_batch(config, overrides):
    from trainer.tasks import build_task
    from trainer.tasks.interface import Batch

    cfg = load_config(TrainJobConfig, REPO / "configs" / "tiny" / config, ["data.image_shards=x", "data.image_ratio=0.5", *overrides])
    task = build_task(cfg, torch.device("cpu"))
    network = task.trained["model"]
    captions = ["a red bird", "", "a cup of coffee"]
    images = torch.rand(3, 3, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    batch = Batch(captions=captions, tokens=task.tokenizer()(captions), video=images, modality="image", frame_stride=torch.ones(3, dtype=torch.long))
    out = task.losses({"model": network}, batch, torch.Generator().manual_seed(1), 0)
    (_, loss), = out.losses
    assert torch.isfinite(loss)
    loss.backward()
    temporal = [p for name, p in network.named_parameters() if ".temporal." in name]
    assert all(p.grad is None for p in temporal)  # U-Net: skipped; DiTs have none
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in network.parameters())


@pytest.mark.multirank
def test_joint_run_is_not_resumed_by_ranks_that_share_a_data_rank(tmp_path, video_shards, image_shards):
    """A 1-rank joint run with 2 micro-batches a step, resumed on 2 ranks: each would keep every other
    micro-batch of the one data rank, an image batch on one rank and a video batch on the other at
    the same micro-step (different graphs under ZeRO-2's per-micro-step reduction). Refused in one
    line, before any engine is built, with the checkpoint left as it was."""
    short = ["train.steps=4", "train.checkpoint_every=2", "train.grad_accum=2", "train.zero_stage=2"]
    # The draws after the checkpoint hold an image and a video batch in one step's pair of micro-batches.
    assert any(scheduled_modality(SEED, 2 * step, RATIO) != scheduled_modality(SEED, 2 * step + 1, RATIO) for step in (2, 3))
    run_dir = tmp_path / "run"
    first = _train(run_dir, video_shards, image_shards, *short, "train.steps=2")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    resumed = _train(run_dir, video_shards, image_shards, *short, nproc=2)
    assert resumed.returncode == 1, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    # Each rank that got there writes the same line; two ranks' writes to the shared stderr may
    # interleave within a line, so the refusal is cut out of the text rather than taken whole.
    refusals = re.findall(r"lvd train: cannot resume .*?data-parallel ranks\)", resumed.stderr)
    assert refusals and len(set(refusals)) == 1, resumed.stderr[-3000:]
    assert "the run has 1 data rank(s) and trains on images and videos (data.image_ratio=0.5)" in refusals[0]
    assert "resume joint training on at most 1 data-parallel ranks" in refusals[0]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000002"
    assert sorted(read_metrics(run_dir)) == [1, 2]
