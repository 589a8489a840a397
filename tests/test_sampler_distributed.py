"""`lvd sample` across processes: 2 ranks give the same videos as 1 rank, and a run killed with
SIGKILL resumes from its finished chunks to the same bytes as an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from sampler.cli import main
from sampler.tiny import tiny_pipeline

REPO = Path(__file__).resolve().parent.parent
COMMON = ["--steps", "3", "--height", "32", "--width", "32", "--device", "cpu", "--no-progress"]


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("pipelines")
    tasks = ("lvdm_prediction", "lvdm_interpolation", "streaming", "diffusion")
    return {task: str(tiny_pipeline(root / task, task, seed=index)) for index, task in enumerate(tasks)}


def cli_subprocess(argv: list[str]) -> subprocess.Popen[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "sampler.cli", *argv],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def parts(video: Path) -> dict[str, dict]:
    return {
        path.name: load_file(str(path)) for path in sorted(video.with_suffix(".parts").glob("*.safetensors"))
    }


def assert_same_outputs(one: Path, two: Path) -> None:
    assert one.read_bytes() == two.read_bytes()
    parts_one, parts_two = parts(one), parts(two)
    assert parts_one.keys() == parts_two.keys()
    for name, tensors in parts_one.items():
        for key, value in tensors.items():
            assert value.equal(parts_two[name][key]), (name, key)


def one_rank_then_many(argv: list[str], tmp_path: Path, nproc: int) -> dict:
    """`argv` for one prompt, in-process on 1 rank into `one/`, then on `nproc` ranks into
    `many/`: asserts the two give the same mp4 and parts, returns the `nproc`-rank report."""
    assert main([*argv, "--out", str(tmp_path / "one" / "v.mp4")]) == 0
    proc = cli_subprocess([*argv, "--out", str(tmp_path / "many" / "v.mp4"), "--nproc", str(nproc)])
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output
    assert_same_outputs(tmp_path / "one" / "v.mp4", tmp_path / "many" / "v.mp4")
    return json.loads((tmp_path / "many" / "v.json").read_text())


def strategy_argv(strategy: str, pipelines: dict[str, str]) -> list[str]:
    if strategy == "lvdm-hierarchical":
        model = ["--model", pipelines["lvdm_prediction"], "--model2", pipelines["lvdm_interpolation"]]
        return [*model, "--frames", "30", "--stride", "3"]
    model = ["--model", pipelines["streaming"], "--model2", pipelines["diffusion"]]  # the refiner, at 64 x 64
    return [*model, "--frames", "36", "--clip-frames", "4", "--F", "6", "--O", "2"]


@pytest.mark.multirank
@pytest.mark.parametrize("strategy", ["lvdm-hierarchical", "streaming"])
def test_two_ranks_equal_one_rank(strategy, pipelines, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red bicycle\na grey cat\n")
    argv = [*strategy_argv(strategy, pipelines), "--strategy", strategy, "--prompts", str(prompts), *COMMON]
    assert main([*argv, "--out", str(tmp_path / "one" / "v.mp4")]) == 0
    proc = cli_subprocess([*argv, "--out", str(tmp_path / "two" / "v.mp4"), "--nproc", "2"])
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output
    for index in range(2):
        video = f"v-{index:03d}.mp4"
        assert_same_outputs(tmp_path / "one" / video, tmp_path / "two" / video)
        report = json.loads((tmp_path / "two" / video).with_suffix(".json").read_text())
        assert report["world_size"] == 2
        assert [rank["computed"] > 0 for rank in report["ranks"]] == [True, True]  # both ranks did work
        if strategy == "lvdm-hierarchical":
            # The first keyframe clip on both ranks (guidance branches split), the other keyframes
            # on the video's owner; meanwhile the other rank fills gaps.
            owner, other = report["ranks"][index], report["ranks"][1 - index]
            assert 0 < other["timings"]["keyframes"] < owner["timings"]["keyframes"]
            assert other["timings"]["gaps"] > 0
        else:  # CAM + APM on both ranks (guidance branches split), and both decoded pixels
            assert all(
                rank["timings"]["stream"] > 0 and rank["timings"]["decode"] > 0 for rank in report["ranks"]
            )
        assert not list((tmp_path / "two" / video).with_suffix(".parts").glob("frames-*"))


@pytest.mark.multirank
def test_three_ranks_refine_blending_chunks_like_one_rank(pipelines, tmp_path):
    """4 blending chunks on 3 ranks: rank 1 owns chunk 1 alone and trades overlaps with both
    neighbours every step (point-to-point, `NeighbourExchange`)."""
    argv = [
        *strategy_argv("streaming", pipelines),
        "--strategy",
        "streaming",
        "--prompt",
        "a red bicycle",
        *COMMON,
    ]
    report = one_rank_then_many(argv, tmp_path, 3)
    assert len(list((tmp_path / "one" / "v.parts").glob("refined-*"))) == 4
    assert [rank["timings"]["refine"] > 0 for rank in report["ranks"]] == [True, True, True]


@pytest.mark.multirank
def test_one_prompt_on_two_ranks_splits_the_guidance_branches(pipelines, tmp_path):
    """A sequential strategy with a single prompt: both ranks work on it in lockstep, same bytes."""
    argv = ["--model", pipelines["lvdm_prediction"], "--strategy", "lvdm-autoregressive", "--frames", "24"]
    argv += ["--prompt", "a red bicycle", *COMMON]
    report = one_rank_then_many(argv, tmp_path, 2)
    assert all(rank["timings"]["chunk"] > 0 and rank["timings"]["decode"] > 0 for rank in report["ranks"])
    assert report["units_computed"] == len(list((tmp_path / "one" / "v.parts").glob("chunk-*")))


@pytest.mark.slow
def test_kill_and_resume_gives_the_same_video(pipelines, tmp_path):
    argv = ["--model", pipelines["lvdm_prediction"], "--strategy", "lvdm-autoregressive", "--frames", "160"]
    argv += ["--prompt", "a red bicycle", *COMMON]
    assert main([*argv, "--out", str(tmp_path / "full" / "v.mp4")]) == 0
    video = tmp_path / "killed" / "v.mp4"
    proc = cli_subprocess([*argv, "--out", str(video)])
    chunks = video.with_suffix(".parts")
    deadline = time.monotonic() + 120
    while len(list(chunks.glob("chunk-*.safetensors"))) < 3:
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = {path: path.stat().st_mtime_ns for path in chunks.glob("chunk-*.safetensors")}
    assert 3 <= len(finished) < 27 and not video.exists()
    assert main([*argv, "--out", str(video)]) == 0
    assert all(path.stat().st_mtime_ns == mtime for path, mtime in finished.items())  # not recomputed
    report = json.loads(video.with_suffix(".json").read_text())
    assert report["units_reused"] == len(finished) and report["units_computed"] == 27 - len(finished)
    assert_same_outputs(tmp_path / "full" / "v.mp4", video)
