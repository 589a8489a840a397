"""`lvd demo`: its pure helpers (split, crops, figures, report pieces), and `lvd demo --quick`
through the whole chain on real media with its report, then a re-run that continues instead of
redoing."""

from __future__ import annotations

import json
import random
import re

import av
import numpy as np
import pytest
from conftest import run_lvd
from PIL import Image

from data_pipeline.tario import iter_samples
from lvd.demo_data import crop_clips, is_held_out, shard_paths, split_shards, write_shards
from lvd.demo_metrics import motion_l1, psnr, ssim
from lvd.demo_report import (
    Figure,
    Sheet,
    contact_sheet,
    evenly,
    loss_plot,
    read_losses,
    smoothed,
    write_report,
)

FIGURES = {
    "vae_psnr_db", "vae_ssim", "t2v_fid", "t2v_fid_untrained", "t2v_motion_l1", "scuts_lvdm_hierarchical", "scuts_vidrd",
    "t2v_fid_floor_real", "t2v_fid_floor_vae", "t2v_fid_denoiser",
}


def _clip(seed: int, frames: int = 4, size: int = 16) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (frames, size, size, 3), dtype=np.uint8)


def test_every_fourth_clip_of_a_source_is_held_out():
    assert [n for n in range(12) if is_held_out({"clip": n}, 4)] == [3, 7, 11]
    assert not is_held_out({}, 4)


def test_split_keeps_every_sample_once_and_holds_out_by_clip_number(tmp_path):
    samples = [
        (f"{source}_{clip:03d}", {"json": json.dumps({"source": source, "clip": clip}).encode(), "txt": source.encode()})
        for source in ("a", "b") for clip in range(6)
    ]
    write_shards(tmp_path / "all", samples, 3)
    counts = split_shards(tmp_path / "all", tmp_path / "train", tmp_path / "held_out", 4)
    assert counts == {"train": 10, "held_out": 2}
    keys = {name: [s.key for p in shard_paths(tmp_path / name) for s in iter_samples(p)] for name in ("train", "held_out")}
    assert sorted(keys["held_out"]) == ["a_003", "b_003"]
    assert sorted(keys["train"] + keys["held_out"]) == sorted(key for key, _ in samples)
    with pytest.raises(ValueError, match="without samples"):
        split_shards(tmp_path / "all", tmp_path / "t2", tmp_path / "h2", 100)


def test_write_shards_deals_samples_round_robin_and_lists_them(tmp_path):
    samples = [(f"k{n}", {"txt": b"x"}) for n in range(5)]
    assert write_shards(tmp_path / "s", samples, 2, note="n") == 5
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["samples"] == 5 and manifest["note"] == "n"
    assert [entry["samples"] for entry in manifest["shards"]] == [3, 2]
    assert [s.key for s in iter_samples(shard_paths(tmp_path / "s")[1])] == ["k1", "k3"]


def test_crop_windows_keep_the_pixel_scale():
    clip = _clip(0, size=20)
    crops = crop_clips(clip, 8, 5, random.Random(0))
    assert len(crops) == 5 and all(c.shape == (4, 8, 8, 3) for c in crops)
    for crop in crops:  # each window is a verbatim part of the clip
        hits = [(top, left) for top in range(13) for left in range(13) if np.array_equal(clip[:, top : top + 8, left : left + 8], crop)]
        assert hits
    with pytest.raises(ValueError):
        crop_clips(clip, 32, 1, random.Random(0))


def test_psnr_and_ssim_of_known_cases():
    clip = _clip(1)[None]
    assert psnr(clip, clip) == pytest.approx(10 * np.log10(255**2 / 1e-10))  # mse clamped at 1e-10
    shifted = np.clip(clip.astype(int) + 5, 0, 255).astype(np.uint8)
    mse = ((shifted.astype(float) - clip) ** 2).mean()
    assert psnr(clip, shifted) == pytest.approx(10 * np.log10(255**2 / mse))
    assert ssim(clip, clip) == pytest.approx(1.0)
    assert ssim(clip, _clip(2)[None]) < 0.1
    assert 0.5 < ssim(clip, shifted) < 1.0


def test_motion_l1_is_zero_for_a_still_clip_and_exact_for_a_ramp():
    still = np.repeat(_clip(3)[:1], 4, axis=0)[None]
    assert motion_l1(still) == 0.0
    ramp = np.stack([np.full((8, 8, 3), 10 * t, np.uint8) for t in range(4)])[None]
    assert motion_l1(ramp) == pytest.approx(10 / 255)


def test_contact_sheet_has_one_row_per_clip_and_evenly_spaced_frames():
    assert list(evenly(np.arange(10), 4)) == [0, 3, 6, 9]
    assert len(evenly(np.arange(3), 8)) == 3
    rows = [("a", _clip(4, frames=16)), ("b", _clip(5, frames=3))]
    sheet = contact_sheet(rows, scale=2, columns=8)
    assert sheet.size == (180 + 8 * (32 + 2), 2 * (32 + 2))
    first_tile = np.asarray(sheet)[0:32, 180:212]
    assert np.array_equal(first_tile[::2, ::2], rows[0][1][0])


def test_loss_reader_skips_missing_and_non_finite_values(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [{"step": 1, "loss": 1.0}, {"step": 2, "loss": float("nan")}, {"step": 3, "other": 1}, {"step": 4, "loss": 0.5}]
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    assert read_losses(path) == ([1, 4], [1.0, 0.5])
    assert read_losses(tmp_path / "missing.jsonl") == ([], [])
    assert smoothed([2.0, 2.0, 2.0]) == pytest.approx([2.0, 2.0, 2.0])  # bias-corrected
    assert loss_plot("x", [1, 2, 3], [1.0, 0.5, 0.25]).size == (480, 260)
    assert loss_plot("x", [], []).size == (480, 260)


def test_report_lists_figures_sheets_and_curves(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1 / s}) + "\n" for s in range(1, 6)))
    figures = [Figure(name="a", value=1.0, goal=">= 0", met=True), Figure(name="b", value=None, goal="-", met=None)]
    json_path, html_path = write_report(tmp_path, figures, [Sheet(title="S 1", rows=[("r", _clip(6))])], {"run": run}, {"mode": "x"})
    report = json.loads(json_path.read_text())
    assert report["all_met"] is True and set(report["figures"]) == {"a", "b"} and report["mode"] == "x"
    for path in [*report["contact_sheets"].values(), *report["loss_curves"].values()]:
        assert Image.open(tmp_path / path).format == "PNG"
        assert path in html_path.read_text()


@pytest.mark.slow
@pytest.mark.multirank
def test_quick_demo_runs_the_whole_chain_writes_its_report_and_resumes(tmp_path, media_dir):
    out = tmp_path / "demo"
    result = run_lvd("demo", "--quick", "--out", str(out), timeout=1800)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    for manifest in ("videos", "images", "train", "held_out", "vae_windows", "latents"):
        assert json.loads((out / "shards" / manifest / "manifest.json").read_text())["samples"] > 0
    assert list((out / "runs" / "t2v" / "tb").glob("events.out.tfevents.*"))
    for name in ("vae", "t2v", "lvdm_prediction", "lvdm_interpolation"):
        assert (out / "export" / name / "model_index.json").is_file()
    for video in ("lvdm-hierarchical", "vidrd"):
        path = out / "videos" / f"{video}.mp4"
        with av.open(str(path)) as container:
            frames = sum(1 for _ in container.decode(video=0))
        assert frames >= 128, (video, frames)
        assert json.loads(path.with_suffix(".json").read_text())["params"]["strategy"] == video
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"scuts", "mawe"} <= set(metrics)

    report = json.loads((out / "report.json").read_text())
    assert set(report["figures"]) == FIGURES
    for figure in report["figures"].values():
        assert {"value", "goal", "met"} <= set(figure) and figure["met"] is None  # quick: no goals
        assert figure["value"] is not None
    assert len(report["contact_sheets"]) >= 5 and len(report["loss_curves"]) == 4
    page = (out / "report.html").read_text()
    for path in [*report["contact_sheets"].values(), *report["loss_curves"].values()]:
        assert Image.open(out / path).format == "PNG" and path in page
    assert report["stage_seconds"] and report["mode"] == "quick"
    assert "TensorBoard" in result.stdout and str(out / "report.html") in result.stdout
    assert "lvd train: step" in result.stdout  # the training stages' progress reaches the console

    report_bytes = (out / "report.json").read_bytes()
    stages = re.findall(r"^\[(\d+)\] .* \.\.\.$", result.stdout, re.MULTILINE)
    again = run_lvd("demo", "--quick", "--quiet", "--out", str(out), timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    # Every stage of the first run, the figures included, is skipped: nothing is redone.
    assert re.findall(r"^\[(\d+)\] .*: already done \(", again.stdout, re.MULTILINE) == stages
    assert len(stages) >= 20 and " ..." not in again.stdout
    assert (out / "report.json").read_bytes() == report_bytes
    assert "lvd train: step" not in again.stdout and str(out / "report.html") in again.stdout


def test_echo_throttles_step_lines_and_passes_the_others_in_order(capsys):
    """Step lines are throttled (the last one always shows); other progress lines (weights
    sources, done) are echoed as they come, after the step line they follow."""
    import io

    from lvd.demo_stages import Echo

    text = "lvd train: model: random init\nlvd train: step 1/3 loss=1\nlvd train: step 2/3 loss=1\nnoise\nlvd train: done, 3 steps\n"
    Echo("", io.StringIO(), quiet=False).pump(io.BytesIO(text.encode()))
    assert [line.strip() for line in capsys.readouterr().out.splitlines()] == [
        "lvd train: model: random init", "lvd train: step 1/3 loss=1", "lvd train: step 2/3 loss=1", "lvd train: done, 3 steps",
    ]
