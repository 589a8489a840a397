"""The streaming loader on real shards: batch contract, exact resume, mixing, buckets, latent cache."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import open_clip
import pytest
import torch

from data_pipeline.config import DataConfig
from data_pipeline.latents import shard_latents
from data_pipeline.loader import VideoRing, build_loader
from data_pipeline.shard_cli import main
from data_pipeline.stages import ClipShape, decode_clip, to_unit_range
from data_pipeline.tario import iter_samples


def _link(src: Path, folder: Path, name: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    os.symlink(src, folder / name)
    os.symlink(src.with_suffix(".txt"), (folder / name).with_suffix(".txt"))


@pytest.fixture(scope="module")
def shards(media_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("loader")
    for name in ("carphone_pristine.mp4", "bikes.mp4"):
        _link(media_dir / "videos" / name, root / "videos", name)
    for name in ("astronaut.png", "coffee.png", "stamp_owl.png", "stamp_crow.png", "stamp_duck.png"):
        _link(media_dir / "images" / name, root / "images", name)
    common = ["--size", "48", "--shard-size-mb", "0.02"]
    assert (
        main(
            [
                "videos",
                "--input",
                str(root / "videos"),
                "--out",
                str(root / "clips"),
                "--clip-frames",
                "8",
                *common,
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "images",
                "--input",
                str(root / "images"),
                "--out",
                str(root / "pseudo"),
                "--frames",
                "8",
                *common,
            ]
        )
        == 0
    )
    return {"clips": root / "clips", "pseudo": root / "pseudo", "root": root}


def _cfg(paths: dict[str, Path], **overrides) -> DataConfig:
    values = dict(
        shards=str(paths["clips"] / "manifest.json"),
        frames=4,
        frame_stride=2,
        height=32,
        width=32,
        shuffle_buffer=6,
        p_uncond=0.0,
    )
    values.update(overrides)
    return DataConfig(**values)


def _take(loader, count: int) -> list[dict]:
    return [next(loader) for _ in range(count)]


def _same(first: list[dict], second: list[dict]) -> bool:
    for a, b in zip(first, second, strict=True):
        if [m["__key__"] for m in a["meta"]] != [m["__key__"] for m in b["meta"]] or a["caption"] != b[
            "caption"
        ]:
            return False
        tensor = "latents" if "latents" in a else "video"
        if not torch.equal(a[tensor], b[tensor]):
            return False
    return True


def test_batches_follow_the_contract(shards):
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    loader = build_loader(
        _cfg(shards, random_crop=True), rank=0, world_size=1, batch_size=3, seed=0, tokenizer=tokenizer
    )
    batch = next(loader)
    assert batch["video"].shape == (3, 3, 4, 32, 32) and batch["video"].dtype == torch.float32
    assert -1.0 <= batch["video"].min() < 0 < batch["video"].max() <= 1.0
    assert batch["tokens"].shape == (3, 77) and batch["tokens"].dtype == torch.long
    assert torch.equal(batch["tokens"], tokenizer(batch["caption"]))
    captions = {
        "cyclists riding along a street, several different camera shots",
        "a man talking on a phone inside a moving car",
    }
    assert set(batch["caption"]) <= captions
    assert all({"source", "start_frame", "__key__", "epoch"} <= set(meta) for meta in batch["meta"])
    assert loader.batches_per_epoch == -(
        -json.loads((shards["clips"] / "manifest.json").read_text())["samples"] // 3
    )
    dropped = next(
        build_loader(
            _cfg(shards, p_uncond=1.0), rank=0, world_size=1, batch_size=4, seed=0, tokenizer=tokenizer
        )
    )
    assert dropped["caption"] == [""] * 4 and torch.equal(dropped["tokens"], tokenizer([""] * 4))


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_yields_exactly_the_uninterrupted_batches(shards, workers):
    cfg = _cfg(shards, workers=workers, random_crop=True, p_uncond=0.3)
    loader = build_loader(cfg, rank=0, world_size=1, batch_size=2, seed=4, tokenizer=None)
    _take(loader, 5)  # an odd count: the next batch comes from worker 1 when workers = 2
    state = json.loads(json.dumps(loader.state_dict()))  # a checkpoint is plain data
    expected = _take(loader, 6)
    resumed = build_loader(cfg, rank=0, world_size=1, batch_size=2, seed=4, tokenizer=None)
    resumed.load_state_dict(state)
    assert _same(_take(resumed, 6), expected)


def test_workers_wait_for_busy_ring_cells(shards, monkeypatch):
    """One ring cell per worker (instead of prefetch + 1): workers must wait until the main process
    has taken each batch, and the batches are unchanged."""
    cfg = _cfg(shards, workers=2, prefetch=2, random_crop=True)
    expected = _take(build_loader(cfg, rank=0, world_size=1, batch_size=2, seed=1, tokenizer=None), 8)
    roomy = VideoRing.__init__

    def one_cell(self, *, rows: int, cells: int, nbytes: int, shared: bool) -> None:
        roomy(self, rows=rows, cells=1, nbytes=nbytes, shared=shared)

    monkeypatch.setattr(VideoRing, "__init__", one_cell)
    squeezed = _take(build_loader(cfg, rank=0, world_size=1, batch_size=2, seed=1, tokenizer=None), 8)
    assert _same(squeezed, expected)


def test_seed_changes_order_and_crops(shards):
    cfg = _cfg(shards, random_crop=True)
    first, again, other = (
        build_loader(cfg, rank=0, world_size=1, batch_size=2, seed=seed, tokenizer=None) for seed in (0, 0, 1)
    )
    reference = _take(first, 3)
    assert _same(_take(again, 3), reference) and not _same(_take(other, 3), reference)


def test_weights_mix_shard_sets(shards):
    both = f"{shards['clips']}::{shards['pseudo'] / 'manifest.json'}"
    loader = build_loader(
        _cfg(shards, shards=both, weights=(3.0, 1.0), frames=2, height=16, width=16),
        rank=0,
        world_size=1,
        batch_size=8,
        seed=1,
        tokenizer=None,
    )
    sets = [meta["set"] for batch in _take(loader, 25) for meta in batch["meta"]]
    assert 0.68 < sets.count(0) / len(sets) < 0.82
    only_pseudo = build_loader(
        _cfg(shards, shards=both, weights=(0.0, 1.0), frames=2),
        rank=0,
        world_size=1,
        batch_size=4,
        seed=1,
        tokenizer=None,
    )
    batch = next(only_pseudo)
    assert {meta["set"] for meta in batch["meta"]} == {1} and all(
        meta["pseudo_video"] for meta in batch["meta"]
    )


def test_epoch_covers_each_sample_once_when_shards_suffice(shards):
    total = json.loads((shards["clips"] / "manifest.json").read_text())["samples"]
    loader = build_loader(
        _cfg(shards, shuffle_buffer=1), rank=0, world_size=1, batch_size=1, seed=2, tokenizer=None
    )
    keys = [batch["meta"][0]["__key__"] for batch in _take(loader, total)]
    assert len(set(keys)) == total


def test_buckets_batch_by_shape_and_resume(shards):
    both = f"{shards['clips']}::{shards['pseudo']}"
    cfg = _cfg(shards, shards=both, buckets=("4x32x64:3", "2x32x32:2"))
    loader = build_loader(cfg, rank=0, world_size=1, batch_size=99, seed=0, tokenizer=None)
    batches = _take(loader, 6)
    shapes = {tuple(batch["video"].shape) for batch in batches}
    assert shapes == {(3, 3, 4, 32, 64), (2, 3, 2, 32, 32)}
    for batch in batches:
        wide = batch["video"].shape[-1] == 64
        assert all(
            (meta["width"] / meta["height"] > 2**0.5) == wide for meta in batch["meta"]
        )  # log-midpoint of 1 and 2
    while not any(slot["pending"] for slot in loader.state_dict()["slots"].values()):
        next(loader)  # stop where a bucket is half filled: its samples are part of the state
    state = loader.state_dict()
    expected = _take(loader, 4)
    resumed = build_loader(cfg, rank=0, world_size=1, batch_size=99, seed=0, tokenizer=None)
    resumed.load_state_dict(state)
    assert _same(_take(resumed, 4), expected)


def test_world_size_change_restarts_at_next_epoch(shards, caplog):
    cfg = _cfg(shards)
    loader = build_loader(cfg, rank=1, world_size=2, batch_size=2, seed=0, tokenizer=None)
    seen = max(meta["epoch"] for batch in _take(loader, 12) for meta in batch["meta"])
    single = build_loader(cfg, rank=0, world_size=1, batch_size=2, seed=0, tokenizer=None)
    with caplog.at_level(logging.WARNING):
        single.load_state_dict(loader.state_dict())
    assert "exact resume needs the same world size" in caplog.text
    assert min(meta["epoch"] for meta in next(single)["meta"]) > seen


def test_missing_shards_fail_fast(tmp_path):
    with pytest.raises(FileNotFoundError, match="matches no file"):
        build_loader(
            DataConfig(shards=str(tmp_path / "x-{0..3}.tar")),
            rank=0,
            world_size=1,
            batch_size=1,
            seed=0,
            tokenizer=None,
        )


class ToyEncoder:
    """Stands in for the VAE: 2x4x4 average pooling (t, h, w) and a fixed channel mix to 4 channels."""

    def __init__(self) -> None:
        self.mix = torch.linspace(-1, 1, 12).reshape(4, 3)

    def video(self, video: torch.Tensor) -> torch.Tensor:
        pooled = torch.nn.functional.avg_pool3d(video, (2, 4, 4))
        return torch.einsum("oc,bcthw->bothw", self.mix, pooled)

    def text(self, captions: list[str]) -> torch.Tensor:
        return torch.tensor([[len(caption), caption.count(" ")] for caption in captions], dtype=torch.float32)


def test_latent_cache_round_trip(shards, tmp_path):
    encoder = ToyEncoder()
    shape = ClipShape(frames=4, frame_stride=2, height=32, width=32)
    urls = sorted(str(path) for path in shards["clips"].glob("shard-*.tar"))
    manifest = shard_latents(
        urls,
        tmp_path / "latents",
        encoder.video,
        encoder.text,
        shape=shape,
        shard_size_mb=0.05,
        batch_size=3,
        params={"command": "latents"},
    )
    pixels = {sample.key: sample.files for url in urls for sample in iter_samples(url)}
    assert manifest["samples"] == len(pixels)
    cfg = DataConfig(shards=str(tmp_path / "latents"), latent=True, shuffle_buffer=4, p_uncond=0.0)
    for batch in _take(build_loader(cfg, rank=0, world_size=1, batch_size=4, seed=0, tokenizer=None), 3):
        assert batch["latents"].shape == (4, 4, 2, 8, 8) and batch["text_emb"].shape == (4, 2)
        for number, meta in enumerate(batch["meta"]):
            files = pixels[meta["__key__"]]
            video = to_unit_range(decode_clip(files["mp4"], shape, None)[None])
            assert torch.allclose(batch["latents"][number], encoder.video(video)[0], atol=1e-5)
            assert batch["caption"][number] == files["txt"].decode()
            assert torch.equal(batch["text_emb"][number], encoder.text([batch["caption"][number]])[0])


def test_shard_cli_latents_uses_the_given_encoder_loader(shards, tmp_path, capsys):
    encoder = ToyEncoder()
    args = [
        "latents",
        "--input",
        str(shards["clips"]),
        "--vae",
        "/models/vae",
        "--out",
        str(tmp_path / "lat"),
        "--frames",
        "4",
        "--height",
        "32",
        "--width",
        "32",
    ]
    assert main(args) == 2 and "lvd shard latents" in capsys.readouterr().err
    loaded = []
    assert main(args, load_encoder=lambda path, **options: loaded.append(path) or (encoder.video, None)) == 0
    manifest = json.loads((tmp_path / "lat" / "manifest.json").read_text())
    assert (
        loaded == ["/models/vae"] and manifest["params"]["vae"] == "/models/vae" and manifest["samples"] > 0
    )
