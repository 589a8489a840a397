"""Data stages on plain values: clip arithmetic, scene tracking, tar offsets, schedule, camera path."""

from __future__ import annotations

import io
import random
from collections import Counter
from fractions import Fraction

import av
import numpy as np
import pytest
import torch
from PIL import Image

from data_pipeline.buckets import Bucket, build_buckets, choose_bucket
from data_pipeline.clips import ClipGrid, SegmentTracker
from data_pipeline.config import DataConfig
from data_pipeline.inputs import sample_key
from data_pipeline.pseudo_video import draw_path, render
from data_pipeline.stages import ClipShape, decode_clip, drop_caption, resize_and_crop_box, to_unit_range
from data_pipeline.stream import ShardSet, Slot, first_draw_of_epoch, shard_of_draw
from data_pipeline.tario import iter_samples, read_sample, split_key, tar_bytes
from data_pipeline.video_io import encode_mp4, iter_frames, to_rgb
from data_pipeline.video_ring import VideoRing


@pytest.mark.parametrize("frames,stride,length", [(8, 1, 30), (4, 3, 46), (16, 4, 61), (5, 2, 9), (3, 1, 2)])
def test_clip_grid_count_matches_enumeration(frames, stride, length):
    grid = ClipGrid(clip_frames=frames, frame_stride=stride)
    starts = range(0, length - grid.span + 1, grid.hop)
    assert grid.count(length) == len(starts)
    members = Counter(grid.slot(offset)[0] for offset in range(length) if grid.slot(offset) is not None)
    complete = [clip for clip, size in members.items() if size == frames]
    assert len(complete) == grid.count(length)


def test_clip_grid_slots_follow_stride():
    grid = ClipGrid(clip_frames=3, frame_stride=2)
    assert [grid.slot(offset) for offset in range(8)] == [
        (0, 0),
        None,
        (0, 1),
        None,
        (0, 2),
        None,
        (1, 0),
        None,
    ]


def test_segment_tracker_starts_scene_at_first_frame_after_cut():
    tracker = SegmentTracker([1.2, 3.04], fps=25.0)
    starts = [index for index in range(100) if tracker.advance(index, index / 25.0)]
    assert starts == [30, 76]
    shifted = SegmentTracker([1.24], fps=25.0)  # stream whose first pts is one frame late
    assert [index for index in range(60) if shifted.advance(index, (index + 1) / 25.0)] == [30]


def test_tar_round_trip_and_offsets_allow_random_access():
    samples = [
        (f"k{number}", {"txt": f"caption {number}".encode(), "latents.npy": bytes(700 * number)})
        for number in range(4)
    ]
    payload = tar_bytes(samples)
    assert payload == tar_bytes(samples)  # deterministic bytes
    stream = io.BytesIO(payload)
    path = _write_tmp(stream.getvalue())
    read = list(iter_samples(path))
    assert [(sample.key, sample.files) for sample in read] == samples
    third = read_sample(path, read[2].offset)
    assert third.key == "k2" and list(iter_samples(path, read[2].end))[0].key == "k3"
    assert split_key("dir/a-1.latents.npy") == ("dir/a-1", "latents.npy")


def _write_tmp(payload: bytes) -> str:
    import tempfile

    handle = tempfile.NamedTemporaryFile(suffix=".tar", delete=False)
    handle.write(payload)
    handle.close()
    return handle.name


def test_truncated_tar_raises_instead_of_yielding_partial_member():
    samples = [("a", {"txt": bytes(2000)}), ("b", {"txt": bytes(2000)})]
    path = _write_tmp(tar_bytes(samples)[:3000])
    with pytest.raises(OSError, match="truncated"):
        list(iter_samples(path))


@pytest.mark.parametrize("shards,world,workers", [(10, 2, 2), (3, 2, 1), (7, 3, 2)])
def test_schedule_reads_every_shard_equally_across_slots(shards, world, workers):
    shard_set = ShardSet(urls=tuple(f"s{number}" for number in range(shards)), weight=1.0, samples=None)
    slots = [
        Slot(seed=3, rank=rank, worker=worker, world_size=world, workers=workers)
        for rank in range(world)
        for worker in range(workers)
    ]
    epochs = 4
    reads = Counter()
    draws_needed = epochs * shards // len(slots)
    for slot in slots:
        for draw in range(draws_needed):
            url, _ = shard_of_draw(shard_set, 0, slot, draw)
            reads[url] += 1
    # Global draws 0 .. slots * draws_needed - 1 cover whole epochs (up to one partial one).
    assert max(reads.values()) - min(reads.values()) <= 1 + len(slots) // shards
    assert set(reads) == set(shard_set.urls)


def test_first_draw_of_epoch_is_the_first_at_or_after_the_epoch():
    shard_set = ShardSet(urls=tuple(range(5)), weight=1.0, samples=None)
    for index in range(6):
        slot = Slot(seed=0, rank=index // 2, worker=index % 2, world_size=3, workers=2)
        draw = first_draw_of_epoch(shard_set, slot, 4)
        assert shard_of_draw(shard_set, 0, slot, draw)[1] >= 4
        assert draw == 0 or shard_of_draw(shard_set, 0, slot, draw - 1)[1] < 4


def test_resize_and_crop_covers_target():
    shape = ClipShape(frames=4, frame_stride=1, height=64, width=64)
    width, height, left, top = resize_and_crop_box(150, 64, shape, None)
    assert (width, height, top) == (150, 64, 0) and left == (150 - 64) // 2
    width, height, left, top = resize_and_crop_box(
        176, 144, ClipShape(frames=1, frame_stride=1, height=48, width=96), random.Random(0)
    )
    assert width == 96 and height >= 48 and 0 <= top <= height - 48 and left == 0


def test_decode_clip_samples_stride_and_maps_to_unit_range():
    ramp = [np.full((32, 48, 3), 10 * index, np.uint8) for index in range(12)]
    payload = encode_mp4(ramp, fps=Fraction(8))
    clip = decode_clip(payload, ClipShape(frames=4, frame_stride=3, height=32, width=32), None)
    assert clip.shape == (4, 32, 32, 3)
    assert np.allclose(clip.reshape(4, -1).mean(1), [0, 30, 60, 90], atol=4)
    assert decode_clip(payload, ClipShape(frames=5, frame_stride=3, height=32, width=32), None) is None
    video = to_unit_range(clip[None])
    assert video.shape == (1, 3, 4, 32, 32) and -1.0 <= video.min() and video.max() <= 1.0


@pytest.mark.parametrize(
    "size,shape",
    [
        ((70, 32), ClipShape(frames=3, frame_stride=2, height=32, width=32)),  # crop only, odd offsets
        ((34, 70), ClipShape(frames=2, frame_stride=1, height=31, width=34)),  # odd window, portrait
        ((70, 48), ClipShape(frames=2, frame_stride=1, height=24, width=40)),  # resize, then crop
    ],
)
def test_decode_clip_equals_whole_frame_conversion_then_crop(size, shape):
    """The loader crops before converting to RGB; that must not change a single pixel."""
    noise = np.random.default_rng(0).integers(0, 256, (6, size[1], size[0], 3), np.uint8)
    payload = encode_mp4(list(noise), fps=Fraction(8))
    with av.open(io.BytesIO(payload)) as container:
        decoded = [frame for _, _, frame in iter_frames(container)]
    for seed in range(12):
        rng = random.Random(seed)
        start = rng.randint(0, len(decoded) - shape.span)
        resized_w, resized_h, left, top = resize_and_crop_box(*size, shape, rng)
        expected = np.stack(
            [
                to_rgb(frame, (resized_w, resized_h))[top : top + shape.height, left : left + shape.width]
                for frame in decoded[start : start + shape.span : shape.frame_stride]
            ]
        )
        into = np.zeros((shape.frames, shape.height, shape.width, 3), np.uint8)
        clip = decode_clip(payload, shape, random.Random(seed), out=into)
        assert clip is into and np.array_equal(clip, expected), f"seed {seed}: box {(left, top)}"


def test_to_unit_range_maps_every_level_in_ncthw_order():
    levels = np.arange(256, dtype=np.uint8).reshape(1, 4, 8, 8, 1).repeat(3, axis=-1)  # (B, T, H, W, C)
    video = to_unit_range(levels)
    assert video.shape == (1, 3, 4, 8, 8) and video.dtype == torch.float32
    expected = torch.from_numpy(levels.astype(np.float64) * 2 / 255 - 1).permute(0, 4, 1, 2, 3)
    assert torch.allclose(video.double(), expected, atol=3e-7, rtol=0)  # float32 rounding
    assert video.min() == -1.0 and video.max() == 1.0


def test_video_ring_round_trip_and_a_busy_cell_is_never_overwritten(monkeypatch):
    ring = VideoRing(rows=2, cells=2, nbytes=64, shared=False)
    clips = np.arange(24, dtype=np.uint8).reshape(2, 1, 2, 2, 3)  # (B, T, H, W, C)
    cell = ring.put(1, 0, clips)
    monkeypatch.setattr(VideoRing, "WAIT_SECONDS", 0.05)
    with pytest.raises(RuntimeError, match="busy"):
        ring.put(1, 2, clips + 1)  # the same cell, not taken yet
    assert torch.equal(ring.take(*cell), to_unit_range(clips))
    assert torch.equal(ring.take(*ring.put(1, 2, clips + 1)), to_unit_range(clips + 1))


def test_caption_dropout_rate():
    rng = random.Random(0)
    dropped = sum(drop_caption("a cat", 0.25, rng) == "" for _ in range(4000))
    assert 0.22 < dropped / 4000 < 0.28
    assert drop_caption("a cat", 0.0, rng) == "a cat"


def test_camera_path_is_reproducible_monotone_and_inside():
    path = draw_path("images/cat.png", 7, min_scale=0.5)
    assert path == draw_path("images/cat.png", 7, min_scale=0.5)
    assert path != draw_path("images/dog.png", 7, min_scale=0.5)
    states = np.array([path.window(t) for t in np.linspace(0, 1, 16)])
    for column in range(3):
        steps = np.diff(states[:, column])
        assert (steps >= -1e-12).all() or (steps <= 1e-12).all()
    assert (states[:, 0] >= 0.5).all() and (states[:, 0] <= 1).all()
    assert ((states[:, 1:] >= 0) & (states[:, 1:] <= 1)).all()


def test_render_zooms_into_image_content():
    gradient = np.tile(np.linspace(0, 255, 200, dtype=np.uint8)[None, :, None], (100, 1, 3))
    image = Image.fromarray(gradient)
    path = draw_path("x", 0, min_scale=0.5)
    frames = render(image, path, frames=5, size=(64, 32))
    assert len(frames) == 5 and frames[0].shape == (32, 64, 3)
    first_scale, *_ = path.window(0.0)
    span = float(frames[0][:, -1, 0].mean()) - float(frames[0][:, 0, 0].mean())
    assert span == pytest.approx(255 * first_scale, rel=0.1)


def test_sample_keys_are_tar_safe():
    key = sample_key("../../etc/pass.wd/evil name.mp4", 3)
    assert "/" not in key and "." not in key and ".." not in key and key.endswith("-00003")
    assert sample_key("a/x.mp4", 0) != sample_key("b/x.mp4", 0)


def test_buckets_pick_closest_aspect_that_fits():
    cfg = DataConfig(buckets=("8x64x64:4", "8x48x96:6", "16x64x64:2"))
    buckets = build_buckets(cfg, batch_size=99)
    assert [bucket.batch_size for bucket in buckets] == [4, 6, 2]
    assert choose_bucket(buckets, {"num_frames": 8, "width": 150, "height": 64}) == 1
    assert choose_bucket(buckets, {"num_frames": 8, "width": 64, "height": 64}) == 0
    assert choose_bucket(buckets, {"num_frames": 16, "width": 64, "height": 60}) in (0, 2)
    single = [Bucket(shape=ClipShape(frames=8, frame_stride=1, height=8, width=8), batch_size=1)]
    assert choose_bucket(single, {}) == 0
    with pytest.raises(ValueError, match="buckets"):
        DataConfig(buckets=("8x64:4",))
