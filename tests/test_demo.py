"""`lvd demo --quick`: the whole chain on real media, and a re-run that continues instead of redoing."""

from __future__ import annotations

import json

import av
import pytest
from conftest import run_lvd


@pytest.mark.slow
@pytest.mark.multirank
def test_quick_demo_runs_the_whole_chain_and_resumes(tmp_path, media_dir):
    out = tmp_path / "demo"
    result = run_lvd("demo", "--quick", "--out", str(out), timeout=1800)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    for manifest in (out / "shards" / "videos" / "manifest.json", out / "shards" / "images" / "manifest.json"):
        assert json.loads(manifest.read_text())["samples"] > 0
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
    assert "TensorBoard" in result.stdout and str(out) in result.stdout

    again = run_lvd("demo", "--quick", "--out", str(out), timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("already done") >= 10
