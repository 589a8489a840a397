"""`lvd data stats` and `lvd data preview` on real shards: counts that match the manifest, clips
grouped per shape or bucket, score histograms from the clips' json, and a contact sheet of the
expected size."""

from __future__ import annotations

import json
import re
from pathlib import Path

from PIL import Image

from data_pipeline.dataset_stats import dataset_stats, iter_dataset
from data_pipeline.stages import sample_meta
from data_pipeline.tario import tar_bytes
from lvd.cli import main
from lvd.demo_report import SHEET_COLUMNS


def _metas(shards: str) -> dict[str, dict]:
    return {sample.key: sample_meta(sample.files) for _, sample in iter_dataset(shards)}


def test_stats_counts_match_the_manifest(video_shards, capsys):
    folder = Path(video_shards).parent
    manifest = json.loads((folder / "manifest.json").read_text())
    assert main(["data", "stats", str(folder), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["clips"] == manifest["samples"] and stats["shards"] == len(manifest["shards"])
    metas = _metas(str(folder))
    shapes = {f"{m['num_frames']}x{m['height']}x{m['width']}" for m in metas.values()}
    assert stats["grouped_by"] == "shape" and set(stats["groups"]) == shapes
    assert sum(group["clips"] for group in stats["groups"].values()) == manifest["samples"]
    frames = sum(m["num_frames"] for m in metas.values())
    assert frames == manifest["frames"]
    seconds = sum(m["num_frames"] / m["fps"] for m in metas.values())
    assert abs(sum(group["seconds"] for group in stats["groups"].values()) - seconds) < 1e-6
    assert stats["caption_words"]["count"] == manifest["samples"]
    assert set(stats["scores"]) == set(manifest.get("scores", []))  # the sharder's curation scores

    assert main(["data", "stats", video_shards, "--buckets", "8x32x48,8x32x32"]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"{manifest['samples']} clips in {len(manifest['shards'])} shards\nper bucket:")
    assert re.search(r"8x32x48 +\d+ clips", text) and "scores: none" not in text and "motion" in text


def test_stats_histograms_the_scores_of_the_clips_json(tmp_path, capsys):
    samples = [
        (f"k{n}", {"json": json.dumps({"num_frames": 8, "fps": 4, "height": 32, "width": 32,
                                       "scores": {"motion": n / 10, "sharpness": 100.0 + n}}).encode(),
                   "txt": b"a caption" if n % 2 else b""})
        for n in range(10)
    ]  # fmt: skip
    (tmp_path / "s-0.tar").write_bytes(tar_bytes(samples))
    stats = dataset_stats(str(tmp_path / "s-0.tar"), [])
    assert stats["groups"] == {"8x32x32": {"clips": 10, "bytes": stats["groups"]["8x32x32"]["bytes"], "seconds": 20.0}}
    assert stats["scores"]["motion"]["counts"] == [1] * 10 and stats["scores"]["motion"]["max"] == 0.9
    assert sum(stats["scores"]["sharpness"]["counts"]) == 10 and stats["empty_captions"] == 5
    assert main(["data", "stats", str(tmp_path / "s-0.tar")]) == 0
    assert "score motion:" in capsys.readouterr().out


def test_preview_writes_a_contact_sheet_of_the_chosen_clips(video_shards, tmp_path, capsys):
    out = tmp_path / "grid.png"
    assert main(["data", "preview", video_shards, "--out", str(out), "--clips", "3", "--seed", "5"]) == 0
    keys = capsys.readouterr().out.strip().rsplit(": ", 1)[1].split(", ")
    metas = _metas(video_shards)
    assert len(keys) == 3 and set(keys) <= set(metas)
    height = max(metas[key]["height"] for key in keys) * 2
    width = max(metas[key]["width"] for key in keys) * 2
    with Image.open(out) as sheet:
        assert sheet.format == "PNG"
        assert sheet.size == (180 + SHEET_COLUMNS * (width + 2), 3 * (height + 2))
    again = tmp_path / "again.png"
    assert main(["data", "preview", video_shards, "--out", str(again), "--clips", "3", "--seed", "5"]) == 0
    assert again.read_bytes() == out.read_bytes()  # seeded


def test_bad_shards_give_one_line(tmp_path, capsys):
    assert main(["data", "stats", str(tmp_path / "none-{0..1}.tar")]) == 2
    assert "matches no file" in capsys.readouterr().err
