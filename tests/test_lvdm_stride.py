"""LVDM's keyframes at a frame stride: strided clips from the loader, the frame-stride embedding
of unet3d, the LVDM tasks feeding it, the export recording it, and the hierarchical sampler's
keyframe stride taken from (and checked against) the exports."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import model_zoo
from data_pipeline.config import DataConfig
from data_pipeline.loader import build_loader
from data_pipeline.stages import ClipShape, decode_clip
from data_pipeline.stream import expand_shard_sets
from data_pipeline.tario import iter_samples

REPO = Path(__file__).resolve().parent.parent


def _source_clips(shards: str) -> dict[str, np.ndarray]:
    """Every shard clip's 8 frames (L, H, W, 3), decoded at stride 1, by sample key."""
    full = ClipShape(frames=8, frame_stride=1, height=32, width=32)
    urls = expand_shard_sets(shards, ())[0].urls
    return {sample.key: decode_clip(sample.files["mp4"], full, None) for url in urls for sample in iter_samples(url)}


def _to_uint8(video: torch.Tensor) -> np.ndarray:
    """(C, T, H, W) in [-1, 1] -> (T, H, W, 3) uint8, as decoded."""
    return np.rint((video.permute(1, 2, 3, 0).numpy() + 1.0) * 127.5).astype(np.uint8)


def test_strided_clips_are_every_kth_frame_of_the_source_clip(video_shards):
    cfg = DataConfig(shards=video_shards, frames=4, frame_stride=2, height=32, width=32, p_uncond=0.0, shuffle_buffer=2)
    batch = next(build_loader(cfg, rank=0, world_size=1, batch_size=2, seed=0, tokenizer=None))
    sources = _source_clips(video_shards)
    assert batch["frame_stride"].tolist() == [2, 2]
    for video, meta in zip(batch["video"], batch["meta"], strict=True):
        np.testing.assert_array_equal(_to_uint8(video), sources[meta["__key__"]][::2][:4])


def test_stride_range_is_drawn_per_clip_and_resumes(video_shards):
    cfg = DataConfig(shards=video_shards, frames=3, frame_stride_range=(1, 3), height=32, width=32, p_uncond=0.0, shuffle_buffer=2)
    loader = build_loader(cfg, rank=0, world_size=1, batch_size=2, seed=0, tokenizer=None)
    batches = [next(loader) for _ in range(3)]
    strides = [s for batch in batches for s in batch["frame_stride"].tolist()]
    assert set(strides) <= {1, 2, 3} and len(set(strides)) > 1, strides
    sources = _source_clips(video_shards)
    for batch in batches:
        for video, meta, stride in zip(batch["video"], batch["meta"], batch["frame_stride"].tolist(), strict=True):
            np.testing.assert_array_equal(_to_uint8(video), sources[meta["__key__"]][::stride][:3])
    interrupted = build_loader(cfg, rank=0, world_size=1, batch_size=2, seed=0, tokenizer=None)
    next(interrupted)
    resumed = build_loader(cfg, rank=0, world_size=1, batch_size=2, seed=0, tokenizer=None)
    resumed.load_state_dict(interrupted.state_dict())
    again = next(resumed)
    assert torch.equal(again["frame_stride"], batches[1]["frame_stride"])
    assert torch.equal(again["video"], batches[1]["video"])


def test_cached_latents_are_strided_in_latent_frames():
    from data_pipeline.stages import strided_latents

    latents = np.arange(8)[None, :, None, None] * np.ones((4, 8, 2, 2))  # (c, t, h, w), value = frame index
    assert strided_latents(latents, 2, 2)[0, :, 0, 0].tolist() == [0, 2, 4, 6]
    assert strided_latents(latents, 1, 3)[0, :, 0, 0].tolist() == [0, 1, 2]  # as many as fit at stride 3
    assert strided_latents(latents, 3, 3)[0, :, 0, 0].tolist() == [0, 3, 6]
    assert strided_latents(latents, 1, 1).shape == latents.shape


def test_frame_stride_range_is_checked():
    with pytest.raises(ValueError, match="frame_stride_range"):
        DataConfig(frame_stride_range=(3, 2))


def test_stride_embedding_is_zero_init_and_acts_only_when_enabled():
    torch.manual_seed(0)
    model = model_zoo.build_model("unet3d", "tiny", in_channels=5, num_levels=8, num_strides=5)
    x = torch.randn(2, 5, 3, 16, 16)
    t, level = torch.tensor([10, 500]), torch.tensor([1, 2])
    with torch.no_grad():
        for param in model.parameters():  # wake the zero-initialised output head
            if not param.any() and param is not model.stride_embed.weight:
                param.normal_(0, 0.05)
    plain = model(x, t, level=level)
    assert torch.equal(model(x, t, level=level, stride=torch.tensor([2, 4])), plain)  # zero-init: identity
    with torch.no_grad():
        model.stride_embed.weight.normal_()
    strided = model(x, t, level=level, stride=torch.tensor([2, 2]))
    assert not torch.allclose(strided, plain)
    assert not torch.allclose(model(x, t, level=level, stride=torch.tensor([4, 4])), strided)
    assert torch.equal(model(x, t, level=level), plain)  # no stride given: the embedding is not used
    off = model_zoo.build_model("unet3d", "tiny", in_channels=5, num_levels=8)
    assert off.stride_embed is None
    with pytest.raises(ValueError, match="num_strides=0"):
        off(x, t, level=level, stride=torch.tensor([2, 2]))
    with pytest.raises(ValueError, match="num_strides=5"):
        model(x, t, level=level, stride=torch.tensor([5, 1]))


def test_lvdm_task_feeds_the_batch_stride():
    from common.config import load_config
    from trainer.config import TrainJobConfig
    from trainer.tasks import build_task
    from trainer.tasks.interface import Batch

    cfg = load_config(TrainJobConfig, REPO / "configs" / "tiny" / "lvdm_prediction.yaml", ["data.latent=true", "data.frame_stride=1"])
    task = build_task(cfg, torch.device("cpu"))
    network, seen = task.trained["model"], []

    def spy(*args, **kwargs):
        seen.append(kwargs.get("stride"))
        return network(*args, **kwargs)

    captions = ["a", "b"]
    batch = Batch(
        captions=captions,
        latents=torch.randn(2, 4, 2, 8, 8),
        tokens=task.tokenizer()(captions),
        frame_stride=torch.tensor([2, 3]),
    )
    task.losses({"model": spy}, batch, torch.Generator().manual_seed(0), 0)
    assert seen and all(stride is not None and stride.tolist() == [2, 3] for stride in seen)


def test_export_records_the_frame_stride(tmp_path, video_shards):
    from common.config import load_config
    from trainer.config import TrainJobConfig
    from trainer.export import export
    from trainer.loop import train

    overrides = [f"data.shards={video_shards}", f"run.dir={tmp_path}", "data.height=32", "data.width=32"]
    overrides += ["train.steps=1", "train.checkpoint_every=0", "train.micro_batch_size=2", "train.warmup_steps=1"]
    cfg = load_config(TrainJobConfig, REPO / "configs" / "tiny" / "lvdm_prediction.yaml", overrides)
    assert train(cfg) == 0
    index = json.loads((export(tmp_path, tmp_path / "export") / "model_index.json").read_text())
    assert index["frame_stride"] == [2, 2]


def _pair(root: Path, keyframe: list[int], interpolation: list[int]) -> tuple[str, str]:
    from sampler.tiny import tiny_pipeline

    folders = []
    for task, strides in (("lvdm_prediction", keyframe), ("lvdm_interpolation", interpolation)):
        folder = tiny_pipeline(root / task, task)
        index_file = folder / "model_index.json"
        index_file.write_text(json.dumps(json.loads(index_file.read_text()) | {"frame_stride": strides}))
        folders.append(str(folder))
    return folders[0], folders[1]


def _sample_args(model: str, model2: str, *extra: str) -> list[str]:
    return ["--model", model, "--model2", model2, "--strategy", "lvdm-hierarchical", "--prompt", "a", "--out", str(Path(model).parent / "x.mp4"), *extra]


def test_sampler_defaults_to_the_trained_keyframe_stride(tmp_path):
    from sampler.cli import build_parser, config_from_args

    model, model2 = _pair(tmp_path, [4, 4], [2, 2])
    config = config_from_args(build_parser().parse_args(_sample_args(model, model2)))
    assert config.strategy_config.keyframe_stride == 2
    config = config_from_args(build_parser().parse_args(_sample_args(model, model2, "--keyframe-stride", "2")))
    assert config.strategy_config.keyframe_stride == 2


def test_sampler_refuses_a_keyframe_stride_the_models_were_not_trained_for(tmp_path, capsys):
    from sampler.cli import main

    model, model2 = _pair(tmp_path, [4, 4], [2, 2])
    small = ["--steps", "1", "--frames", "4", "--height", "16", "--width", "16", "--device", "cpu", "--quiet"]
    assert main(_sample_args(model, model2, "--keyframe-stride", "3", *small)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "--keyframe-stride 3" in err and "keyframe stride 2" in err, err


def test_sampler_feeds_the_strides_to_stride_conditioned_networks():
    from sampler.denoisers import lvdm_predict_fn

    calls = []

    class Network(torch.nn.Module):
        stride_embed = torch.nn.Embedding(5, 1)

        def forward(self, x, t, **kwargs):
            calls.append(kwargs.get("stride"))
            return x[:, :-1]

    class FakePipeline:
        denoiser, uncond_level, frame_strides, path = Network(), 9, (2, 2), "p"

        def text_inputs(self, prompt):
            return {}

    predict = lvdm_predict_fn(FakePipeline(), "a", 1.0, 4)
    predict(torch.zeros(1, 5, 3, 4, 4), torch.tensor([3]), None)
    lvdm_predict_fn(FakePipeline(), "a")(torch.zeros(1, 5, 3, 4, 4), torch.tensor([3]), None)
    assert [c.tolist() for c in calls] == [[4], [2]]
