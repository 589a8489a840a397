"""Bad inputs get a reason or one line naming the file: a directory named like a video, a binary config."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from data_pipeline.shard_cli import main
from tests.conftest import run_lvd


def test_a_directory_named_like_a_video_is_a_skipped_input_with_a_reason(media_dir, tmp_path):
    folder = tmp_path / "in"
    (folder / "folder.mp4").mkdir(parents=True)
    os.symlink(media_dir / "videos" / "carphone_pristine.mp4", folder / "good.mp4")
    out = tmp_path / "out"
    args = ["videos", "--input", str(folder), "--out", str(out), "--clip-frames", "8", "--size", "32"]
    assert main(args) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["inputs"] == 2
    assert manifest["skipped"] == [{"input": "folder.mp4", "reason": "a directory, not a media file"}]


def test_a_listed_directory_is_skipped_as_a_directory_not_as_missing(tmp_path, capsys):
    (tmp_path / "folder.mp4").mkdir()
    listing = tmp_path / "list.jsonl"
    listing.write_text(json.dumps({"path": "folder.mp4", "caption": "a folder"}) + "\n")
    assert main(["images", "--input", str(listing), "--out", str(tmp_path / "out")]) == 1
    assert "skipped folder.mp4: a directory, not a media file" in capsys.readouterr().err


@pytest.mark.parametrize("payload", [np.random.default_rng(0).bytes(4096), b"\x00\x01\x02 train: {}"])
def test_a_binary_config_file_is_one_line_naming_the_file(tmp_path, payload):
    config = tmp_path / "weights.yaml"
    config.write_bytes(payload)
    result = run_lvd("train", "--config", str(config), "--print-config", timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(config) in lines[0] and "Traceback" not in result.stderr, result.stderr
