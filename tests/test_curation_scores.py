"""Curation scores from `lvd shard videos` on real mp4s, their manifest histograms, and
`data.filters` selecting clips at load time."""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np
import pytest

from data_pipeline.config import DataConfig
from data_pipeline.loader import build_loader
from data_pipeline.shard_cli import main
from data_pipeline.tario import iter_samples
from data_pipeline.video_io import decode_mp4, encode_mp4

SIZE, FRAMES = 96, 48


def _texture(seed: int) -> np.ndarray:
    """A sharp random texture, twice the frame size so it can pan."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (2 * SIZE // 4, 2 * SIZE // 4, 3), dtype=np.uint8)
    return cv2.resize(blocks, (2 * SIZE, 2 * SIZE), interpolation=cv2.INTER_NEAREST)


def _videos(folder: Path) -> None:
    folder.mkdir()
    texture, other = _texture(0), _texture(1)
    static = [texture[:SIZE, :SIZE]] * FRAMES
    clips = {
        "static": static,
        "pan": [texture[:SIZE, 2 * i : 2 * i + SIZE] for i in range(FRAMES)],
        "blurred": [cv2.GaussianBlur(frame, (0, 0), 3) for frame in static],
        "cut": [texture[:SIZE, :SIZE]] * (FRAMES // 2) + [255 - other[:SIZE, :SIZE]] * (FRAMES // 2),
    }
    for name, frames in clips.items():
        (folder / f"{name}.mp4").write_bytes(
            encode_mp4([np.ascontiguousarray(f) for f in frames], Fraction(24))
        )
        (folder / f"{name}.txt").write_text(f"a {name} clip")


@pytest.fixture(scope="module")
def scored(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("curation")
    _videos(root / "videos")
    common = ["--input", str(root / "videos"), "--clip-frames", "16", "--size", str(SIZE)]
    assert main(["videos", *common, "--out", str(root / "scored")]) == 0
    assert main(["videos", *common, "--out", str(root / "plain"), "--no-scores"]) == 0
    return {"scored": root / "scored", "plain": root / "plain"}


def _metas(folder: Path) -> dict[str, dict]:
    return {
        sample.key: json.loads(sample.files["json"])
        for shard in sorted(folder.glob("*.tar"))
        for sample in iter_samples(shard)
    }


def _by_source(metas: dict[str, dict], name: str) -> list[dict]:
    return [meta["scores"] for meta in metas.values() if Path(meta["source"]).stem == name]


def test_scores_order_static_pan_blur_and_count_the_cut(scored):
    metas = _metas(scored["scored"])
    static, pan = _by_source(metas, "static"), _by_source(metas, "pan")
    blurred, cut = _by_source(metas, "blurred"), _by_source(metas, "cut")
    assert len(static) == len(pan) == len(blurred) == len(cut) == FRAMES // 16
    assert max(s["motion"] for s in static) < 0.1 < 1.0 < min(s["motion"] for s in pan)
    assert max(s["sharpness"] for s in blurred) < 0.1 * min(s["sharpness"] for s in static)
    assert [s["cuts"] for s in cut] == [0, 1, 0]  # the cut at frame 24 lies in the second clip
    assert all(s["cuts"] == 0 for s in static + pan + blurred)


def test_manifest_gives_the_score_histograms(scored):
    manifest = json.loads((scored["scored"] / "manifest.json").read_text())
    assert manifest["scores"] == ["cuts", "motion", "sharpness"]
    motions = [meta["scores"]["motion"] for meta in _metas(scored["scored"]).values()]
    histogram = manifest["score_histograms"]["motion"]
    assert sum(histogram["counts"]) == histogram["clips"] == manifest["samples"] == len(motions)
    assert histogram["min"] == min(motions) and histogram["max"] == max(motions)
    assert len(histogram["edges"]) == len(histogram["counts"]) + 1
    plain = json.loads((scored["plain"] / "manifest.json").read_text())
    assert "score_histograms" not in plain and all(
        "scores" not in m for m in _metas(scored["plain"]).values()
    )


def _seen(cfg: DataConfig, batches: int) -> tuple[set[tuple[str, str]], dict[str, int]]:
    """(shard url, key) of the clips of `batches` batches, and the loader's skipped counts."""
    loader = build_loader(cfg, rank=0, world_size=1, batch_size=1, seed=0, tokenizer=None)
    metas = [next(loader)["meta"][0] for _ in range(batches)]
    return {(meta["__url__"], meta["__key__"]) for meta in metas}, loader.skipped()


def test_filters_select_exactly_the_clips_whose_scores_pass(scored):
    metas = _metas(scored["scored"])
    passing = {
        key
        for key, meta in metas.items()
        if meta["scores"]["motion"] > 0.5 and meta["scores"]["sharpness"] > 100
    }
    assert 0 < len(passing) < len(metas)
    cfg = DataConfig(
        shards=f"{scored['scored']}/shard-000000.tar",
        filters=("motion>0.5", "sharpness > 100"),
        frames=4,
        height=32,
        width=32,
        p_uncond=0.0,
        shuffle_buffer=4,
    )
    seen, skipped = _seen(cfg, 6 * len(passing))
    assert {key for _, key in seen} == passing
    assert set(skipped) <= {"filtered out by 'motion>0.5'", "filtered out by 'sharpness > 100'"} and skipped


def test_clips_without_the_score_are_left_out_and_counted(scored):
    cfg = DataConfig(
        shards=f"{scored['scored']}/shard-000000.tar::{scored['plain']}/shard-000000.tar",
        filters=("cuts>=1",),
        frames=4,
        height=32,
        width=32,
        p_uncond=0.0,
        shuffle_buffer=4,
    )
    seen, skipped = _seen(cfg, 4)
    cut_clips = {key for key, meta in _metas(scored["scored"]).items() if meta["scores"]["cuts"] >= 1}
    assert seen == {(f"{scored['scored']}/shard-000000.tar", key) for key in cut_clips}
    assert skipped["no cuts score (data.filters 'cuts>=1')"] > 0


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("motion>>0.5", "'motion>>0.5' is not 'SCORE OP NUMBER'"),
        ("sharpness", "'sharpness' is not 'SCORE OP NUMBER'"),
        ("motion > fast", "'motion > fast' is not"),
        ("beauty>5", "'beauty>5' names unknown score 'beauty'; known: motion, sharpness, cuts, aesthetic"),
    ],
)
def test_bad_filter_strings_are_named(text, message):
    with pytest.raises(ValueError, match="filters: ") as error:
        DataConfig(filters=("motion>0.5", text))
    assert message in str(error.value)


def test_array_merge_gives_the_histograms_of_a_single_process_run(scored, tmp_path):
    from slurm.shard_merge import merge_parts, run_task

    folder = scored["scored"].parent / "videos"
    argv = [
        "videos",
        "--input",
        str(folder),
        "--out",
        str(tmp_path),
        "--clip-frames",
        "16",
        "--size",
        str(SIZE),
    ]
    assert [run_task(argv, task, 2) for task in range(2)] == [0, 0]
    merged = merge_parts(tmp_path, 2, input_spec=str(folder))
    single = json.loads((scored["scored"] / "manifest.json").read_text())
    assert merged["score_histograms"] == single["score_histograms"] and merged["scores"] == single["scores"]


def _aesthetic_folder(folder: Path) -> Path:
    """A random-init aesthetic model in the `--aesthetic-model` format (tiny vision tower)."""
    import torch
    from safetensors.torch import save_file

    from data_pipeline.aesthetic import AestheticModel

    config = {
        "embed_dim": 16,
        "vision": {"layers": 1, "width": 32, "head_width": 16, "patch_size": 8, "image_size": 32},
    }
    config["head"] = [8]
    torch.manual_seed(0)
    model = AestheticModel(config["embed_dim"], config["vision"], config["head"])
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    save_file(
        {name: tensor.contiguous() for name, tensor in model.state_dict().items()},
        folder / "model.safetensors",
    )
    return folder


def test_aesthetic_model_adds_a_score_that_filters_can_use(scored, tmp_path):
    from data_pipeline.aesthetic import aesthetic

    model = _aesthetic_folder(tmp_path / "aesthetic")
    folder = scored["scored"].parent / "videos"
    out = tmp_path / "shards"
    args = ["videos", "--input", str(folder), "--clip-frames", "16", "--size", str(SIZE)]
    assert main([*args, "--out", str(out), "--aesthetic-model", str(model)]) == 0
    metas = _metas(out)
    values = {key: meta["scores"]["aesthetic"] for key, meta in metas.items()}
    assert len(set(values.values())) > 2  # the score depends on the content
    frames = list(decode_mp4((folder / "static.mp4").read_bytes())[:16])  # the first clip's frames
    assert (
        abs(values[min(k for k in values if k.startswith("static"))] - aesthetic(str(model), frames)) < 1e-3
    )
    assert json.loads((out / "manifest.json").read_text())["scores"] == [
        "aesthetic",
        "cuts",
        "motion",
        "sharpness",
    ]
    threshold = sorted(values.values())[len(values) // 2]
    cfg = DataConfig(
        shards=f"{out}/shard-000000.tar", filters=(f"aesthetic>{threshold}",), frames=4, height=32, width=32
    )
    seen, _ = _seen(cfg, 6 * len(values))
    assert {key for _, key in seen} == {key for key, value in values.items() if value > threshold}


def test_a_bad_aesthetic_model_folder_is_named(scored, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    args = ["videos", "--input", str(scored["scored"].parent / "videos"), "--out", str(tmp_path / "out")]
    assert main([*args, "--aesthetic-model", str(tmp_path / "empty")]) == 2
    assert f"{tmp_path / 'empty' / 'config.json'} is missing" in capsys.readouterr().err
