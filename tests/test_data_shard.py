"""`lvd shard` on real media: scene split, pseudo-videos, bad inputs, path safety, kill -9 + resume."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from data_pipeline.clips import ClipGrid
from data_pipeline.shard_cli import main
from data_pipeline.tario import iter_samples
from data_pipeline.video_io import decode_mp4, encode_mp4, iter_frames, short_side_size, to_rgb

REPO = Path(__file__).resolve().parent.parent


def _samples(out: Path) -> dict[str, dict[str, bytes]]:
    manifest = json.loads((out / "manifest.json").read_text())
    found = {}
    for entry in manifest["shards"]:
        for sample in iter_samples(out / entry["path"]):
            assert sample.key not in found, f"duplicate sample {sample.key}"
            found[sample.key] = sample.files
    assert len(found) == manifest["samples"]
    return found


def _link(src: Path, folder: Path, name: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / (name or src.name)
    os.symlink(src, target)
    caption = src.with_suffix(".txt")
    if caption.exists():
        os.symlink(caption, target.with_suffix(".txt"))
    return target


def _scene_starts_in_decode_order(path: Path) -> tuple[list[int], int]:
    """Scene starts from PySceneDetect, converted from its pts-based numbering to decode order."""
    from scenedetect import AdaptiveDetector, SceneManager, open_video

    manager = SceneManager()
    manager.add_detector(AdaptiveDetector())
    manager.detect_scenes(video=open_video(str(path), backend="pyav", suppress_output=True))
    scenes = manager.get_scene_list()
    with av.open(str(path)) as container:
        times = [seconds for _, seconds, _ in iter_frames(container)]
    starts = [
        min(range(len(times)), key=lambda index: abs(times[index] - start.seconds)) for start, _ in scenes
    ]
    return starts, len(times)


def test_bikes_scene_split_clips_never_cross_cuts(media_dir, tmp_path):
    bikes = media_dir / "videos" / "bikes.mp4"
    _link(bikes, tmp_path / "in")
    args = [
        "videos",
        "--input",
        str(tmp_path / "in"),
        "--clip-frames",
        "8",
        "--frame-stride",
        "2",
        "--size",
        "64",
    ]
    assert main([*args, "--out", str(tmp_path / "split"), "--scene-split"]) == 0
    starts, total = _scene_starts_in_decode_order(bikes)
    assert len(starts) == 6 and starts[0] == 0
    bounds = list(zip(starts, [*starts[1:], total]))
    grid = ClipGrid(clip_frames=8, frame_stride=2)
    samples = _samples(tmp_path / "split")
    assert len(samples) == sum(grid.count(end - start) for start, end in bounds) == 12
    for files in samples.values():
        meta = json.loads(files["json"])
        first, last = meta["start_frame"], meta["start_frame"] + grid.span - 1
        assert any(start <= first and last < end for start, end in bounds), meta
        assert (meta["num_frames"], meta["fps"], meta["source"]) == (8, 12.5, "bikes.mp4")
        assert (meta["width"], meta["height"]) == short_side_size(640, 272, 64)
        assert files["txt"].decode() == (media_dir / "videos" / "bikes.txt").read_text().strip()
    # Without the split the same grid runs straight through the cuts.
    assert main([*args, "--out", str(tmp_path / "plain")]) == 0
    plain = [json.loads(files["json"])["start_frame"] for files in _samples(tmp_path / "plain").values()]
    assert len(plain) == grid.count(total)
    assert any(not any(s <= first and first + grid.span - 1 < e for s, e in bounds) for first in plain)


def test_clip_pixels_are_the_source_frames_at_start_frame(media_dir, tmp_path):
    source = media_dir / "videos" / "carphone_pristine.mp4"
    _link(source, tmp_path / "in")
    assert (
        main(
            [
                "videos",
                "--input",
                str(tmp_path / "in"),
                "--out",
                str(tmp_path / "out"),
                "--clip-frames",
                "4",
                "--frame-stride",
                "3",
                "--size",
                "72",
            ]
        )
        == 0
    )
    samples = _samples(tmp_path / "out")
    with av.open(str(source)) as container:
        reference = [to_rgb(frame, (88, 72)).astype(float) for _, _, frame in iter_frames(container)]
    for files in list(samples.values())[:3]:
        meta = json.loads(files["json"])
        clip = decode_mp4(files["mp4"]).astype(float)
        assert clip.shape == (4, 72, 88, 3)
        for position in range(4):
            errors = [np.abs(clip[position] - frame).mean() for frame in reference]
            assert int(np.argmin(errors)) == meta["start_frame"] + 3 * position


def test_images_become_captioned_reproducible_pseudo_videos(media_dir, tmp_path):
    for name in ("astronaut.png", "coffee.png", "stamp_owl.png", "stamp_tux.png"):
        _link(media_dir / "images" / name, tmp_path / "in")
    args = ["images", "--input", str(tmp_path / "in"), "--frames", "6", "--size", "48", "--seed", "5"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert main([*args, "--out", str(tmp_path / "b")]) == 0
    assert main([*args[:-1], "6", "--out", str(tmp_path / "c")]) == 0
    first, second, reseeded = _samples(tmp_path / "a"), _samples(tmp_path / "b"), _samples(tmp_path / "c")
    assert len(first) == 4 and first == second
    for files in first.values():
        meta = json.loads(files["json"])
        caption = (
            (media_dir / "images" / meta["source"]).with_suffix(".txt").read_text().splitlines()[0].strip()
        )
        assert files["txt"].decode() == caption and caption
        frames = decode_mp4(files["mp4"])
        assert frames.shape[0] == 6 and min(frames.shape[1:3]) == 48
        camera = meta["camera"]
        assert meta["pseudo_video"] and camera["easing"] == "smoothstep" and 0.6 <= min(camera["scale"])
        assert np.abs(frames[0].astype(float) - frames[-1]).mean() > 1.0  # the camera moved
    cameras = {json.loads(f["json"])["source"]: json.loads(f["json"])["camera"] for f in first.values()}
    assert cameras != {
        json.loads(f["json"])["source"]: json.loads(f["json"])["camera"] for f in reseeded.values()
    }


def _three_frame_video(path: Path) -> None:
    path.write_bytes(
        encode_mp4([np.full((64, 64, 3), 40 * index, np.uint8) for index in range(3)], Fraction(25))
    )


def test_bad_inputs_are_skipped_with_reasons_and_good_clips_kept(media_dir, tmp_path):
    folder = tmp_path / "in"
    good = _link(media_dir / "videos" / "carphone_pristine.mp4", folder)
    (folder / "truncated.mp4").write_bytes((media_dir / "videos" / "bikes.mp4").read_bytes()[:200_000])
    (folder / "random.mp4").write_bytes(np.random.default_rng(0).bytes(50_000))
    (folder / "empty.mp4").write_bytes(b"")
    _three_frame_video(folder / "short.mp4")
    (folder / "notes.txt").write_text("this is not a video\n")
    _link(media_dir / "videos" / "bikes.mp4", folder, "no_caption.mp4")
    (folder / "no_caption.txt").unlink()
    _link(media_dir / "videos" / "bigbuckbunny.mp4", folder, "latin1.mp4")
    (folder / "latin1.txt").unlink()
    (folder / "latin1.txt").write_bytes("un lapin géant".encode("latin-1"))
    args = ["videos", "--clip-frames", "8", "--size", "48", "--shard-size-mb", "0.1"]
    assert main([*args, "--input", str(folder), "--out", str(tmp_path / "out"), "--workers", "2"]) == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    reasons = {entry["input"]: entry["reason"] for entry in manifest["skipped"]}
    assert set(reasons) == {"truncated.mp4", "random.mp4", "empty.mp4", "short.mp4", "notes.txt"}
    assert "0 bytes" in reasons["empty.mp4"] and "too short: 3 decoded frames" in reasons["short.mp4"]
    assert all(
        "not a decodable video" in reasons[name] for name in ("truncated.mp4", "random.mp4", "notes.txt")
    )
    warnings = {entry["input"]: entry["reason"] for entry in manifest["warnings"]}
    assert warnings["no_caption.mp4"] == "missing caption" and "not UTF-8" in warnings["latin1.mp4"]
    samples = _samples(tmp_path / "out")
    alone = tmp_path / "alone"
    _link(good, alone)
    assert main([*args, "--input", str(alone), "--out", str(tmp_path / "ref")]) == 0
    reference = _samples(tmp_path / "ref")
    assert all(samples[key] == files for key, files in reference.items())  # every good clip, same bytes
    sources = {json.loads(files["json"])["source"] for files in samples.values()}
    assert sources == {"carphone_pristine.mp4", "no_caption.mp4", "latin1.mp4"}
    assert len(samples) == sum(1 for _ in samples) and manifest["samples"] == len(samples)


def test_no_good_input_exits_nonzero_with_message(tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "empty.mp4").write_bytes(b"")
    _three_frame_video(folder / "short.mp4")
    assert main(["videos", "--input", str(folder), "--out", str(tmp_path / "out"), "--clip-frames", "8"]) == 1
    assert "none of the 2 inputs gave a sample" in capsys.readouterr().err


def test_input_paths_cannot_write_outside_out(media_dir, tmp_path):
    nested = tmp_path / "deep" / "er"
    nested.mkdir(parents=True)
    video = media_dir / "videos" / "carphone_pristine.mp4"
    rows = [
        {"path": str(video), "caption": "a man", "split": "train"},
        {"path": "../../" + "../" * 30 + str(video).lstrip("/"), "caption": "sneaky", "split": "val"},
        {"path": str(video), "caption": "again", "split": "train"},
    ]
    listing = nested / "list.jsonl"
    listing.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "out"
    before = {path for path in tmp_path.rglob("*")}
    assert (
        main(["videos", "--input", str(listing), "--out", str(out), "--clip-frames", "8", "--size", "32"])
        == 0
    )
    created = {path for path in tmp_path.rglob("*")} - before
    assert all(path.parent == out or path == out for path in created)
    assert {path.name for path in out.iterdir()} <= {"manifest.json"} | {
        f"shard-{n:06d}.tar" for n in range(99)
    }
    samples = _samples(out)
    assert all("/" not in key and ".." not in key for key in samples)
    extras = {json.loads(files["json"])["extra"]["split"] for files in samples.values()}
    assert extras == {"train", "val"}
    manifest = json.loads((out / "manifest.json").read_text())
    assert [entry["reason"] for entry in manifest["skipped"]] == ["repeated input (already listed)"]


def test_finished_job_is_idempotent_and_other_params_refused(media_dir, tmp_path, capsys):
    _link(media_dir / "videos" / "carphone_pristine.mp4", tmp_path / "in")
    args = [
        "videos",
        "--input",
        str(tmp_path / "in"),
        "--out",
        str(tmp_path / "out"),
        "--clip-frames",
        "8",
        "--size",
        "32",
    ]
    assert main(args) == 0
    stamp = {path.name: path.stat().st_mtime_ns for path in (tmp_path / "out").iterdir()}
    assert main(args) == 0
    assert stamp == {path.name: path.stat().st_mtime_ns for path in (tmp_path / "out").iterdir()}
    assert main([*args[:-1], "48"]) == 2
    assert "other parameters" in capsys.readouterr().err


@pytest.mark.slow
def test_kill_9_then_resume_equals_uninterrupted_run(media_dir, tmp_path):
    folder = tmp_path / "in"
    for copy in range(4):
        _link(media_dir / "videos" / "carphone_pristine.mp4", folder, f"{copy}_carphone.mp4")
    _link(media_dir / "videos" / "bikes.mp4", folder)
    args = ["videos", "--input", str(folder), "--clip-frames", "8", "--size", "48", "--shard-size-mb", "0.03"]
    reference = tmp_path / "reference"
    assert main([*args, "--out", str(reference)]) == 0
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "data_pipeline.shard_cli", *args, "--out", str(out)]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = out / ".shard-state.json"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (
        state.exists() and len(json.loads(state.read_text())["shards"]) >= 3
    ):
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (out / "manifest.json").exists(), "the run finished before it could be killed"
    resumed = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    manifest, expected = (json.loads((root / "manifest.json").read_text()) for root in (out, reference))
    assert manifest["shards"] == expected["shards"]
    assert manifest["score_histograms"] == expected["score_histograms"]  # shards before the kill re-read
    assert _samples(out) == _samples(reference)
    for shard in reference.glob("shard-*.tar"):
        assert (out / shard.name).read_bytes() == shard.read_bytes()
    assert not list(out.glob("*.tmp")) and not state.exists()


def test_shards_are_valid_tars_readable_by_webdataset(media_dir, tmp_path):
    import webdataset as wds

    _link(media_dir / "videos" / "carphone_pristine.mp4", tmp_path / "in")
    assert (
        main(
            [
                "videos",
                "--input",
                str(tmp_path / "in"),
                "--out",
                str(tmp_path / "out"),
                "--clip-frames",
                "8",
                "--size",
                "32",
            ]
        )
        == 0
    )
    urls = sorted(str(path) for path in (tmp_path / "out").glob("shard-*.tar"))
    keys = [sample["__key__"] for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False)]
    assert keys == sorted(_samples(tmp_path / "out"))
    with av.open(io.BytesIO(_samples(tmp_path / "out")[keys[0]]["mp4"])) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264" and stream.frames == 8
        keyframes = [frame.key_frame for frame in container.decode(stream)]
        assert keyframes[0] and not any(keyframes[1:])  # one GOP per clip: decodes without seeking


@pytest.mark.parametrize("flag,value", [("--clip-frames", "0"), ("--shard-size-mb", "-1")])
def test_bad_arguments_exit_2(tmp_path, flag, value):
    assert main(["videos", "--input", str(tmp_path), "--out", str(tmp_path / "o"), flag, value]) == 2
