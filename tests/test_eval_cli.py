"""`lvd eval` end to end on the real videos: the JSON keys and content, "not computed" answers,
argument validation, and the user-weights paths (FVD, CLIPSIM) with stand-in local files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from safetensors.torch import save_file

from metrics.cli import main
from metrics.clipsim import load_clip

ALL_METRICS = "scuts,mawe,fid,kid,fvd-proxy,drift,fvd,clipsim"
TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def run_eval(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, (json.loads(captured.out) if code == 0 else {}), captured.err


@pytest.fixture(scope="module")
def videos(media_dir: Path) -> dict[str, str]:
    return {name: str(media_dir / "videos" / f"{name}.mp4") for name in ("bikes", "carphone_pristine")}


def test_all_metrics_print_one_json_object_with_named_networks(capsys, videos) -> None:
    code, result, _ = run_eval(
        capsys, "--video", videos["carphone_pristine"], "--reference", videos["bikes"], "--metrics", ALL_METRICS,
        "--max-frames", "4", "--chunk-frames", "2", "--flow-size", "64",
    )  # fmt: skip
    assert code == 0 and list(result) == ALL_METRICS.split(",")
    assert result["scuts"]["per_video"][videos["carphone_pristine"]]["cuts"] == 0
    assert "AdaptiveDetector" in result["scuts"]["detector"]
    assert "opencv-dis" in result["mawe"]["flow"] and "RAFT" in result["mawe"]["flow"]
    assert result["mawe"]["frame_size"] == [64, 64] and result["mawe"]["value"] > 0
    for name in ("fid", "kid", "fvd-proxy"):
        assert (
            result[name]["computed"]
            and result[name]["value"] > 0
            and "InceptionV3" in result[name]["network"]
        )
    assert result["fid"]["frames"] == {"video": 4, "reference": 4}
    assert "NOT FVD" in result["fvd-proxy"]["name"] and result["fvd-proxy"]["windows"] == {
        "video": 3,
        "reference": 3,
    }
    drift = result["drift"]["per_video"][videos["carphone_pristine"]]
    assert drift["chunk_start_frames"] == [0, 2] and drift["frechet"][0] == pytest.approx(0.0, abs=1e-6)
    assert result["fvd"] == {"computed": False, "reason": "needs local I3D weights (--i3d)"}
    assert result["clipsim"] == {"computed": False, "reason": "needs local CLIP weights (--clip)"}


def test_set_metrics_without_reference_say_why(capsys, videos) -> None:
    code, result, _ = run_eval(capsys, "--video", videos["bikes"], "--metrics", "fid,kid,fvd-proxy")
    assert code == 0
    for name in ("fid", "kid", "fvd-proxy"):
        assert result[name]["computed"] is False and "--reference" in result[name]["reason"]


def test_too_few_frames_is_reported_not_faked(capsys, videos) -> None:
    argv = ["--video", videos["bikes"], "--reference", videos["carphone_pristine"], "--max-frames", "1"]
    code, result, _ = run_eval(capsys, *argv, "--metrics", "fid,mawe,drift,fvd-proxy")
    assert code == 0
    assert result["fid"]["computed"] is False and ">= 2 frames" in result["fid"]["reason"]
    assert result["mawe"]["computed"] is False
    assert result["mawe"]["per_video"][videos["bikes"]]["reason"] == "needs at least 2 frames"
    assert result["drift"]["computed"] is False and result["fvd-proxy"]["computed"] is False


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--metrics", "fid,psnr"], "unknown metric"),
        (["--chunk-frames", "1"], "must be >= 2"),
        (["--i3d", "/nonexistent/i3d.pt"], "no such file"),
        (["--clip", "/nonexistent/clip"], "no such file"),
    ],
)
def test_bad_arguments_exit_2_with_a_message(capsys, videos, argv: list[str], message: str) -> None:
    code, _, err = run_eval(capsys, "--video", videos["bikes"], *argv)
    assert code == 2 and message in err


def test_missing_video_exits_2(capsys) -> None:
    code, _, err = run_eval(capsys, "--video", "/nonexistent/video.mp4")
    assert code == 2 and "no such file" in err


def test_i3d_file_that_is_not_torchscript_exits_2(capsys, videos, tmp_path: Path) -> None:
    bogus = tmp_path / "i3d.pt"
    bogus.write_bytes(b"not a model")
    code, _, err = run_eval(capsys, "--video", videos["bikes"], "--reference", videos["bikes"], "--metrics", "fvd",
                            "--i3d", str(bogus))  # fmt: skip
    assert code == 2 and "not a TorchScript file" in err


class StandInI3D(torch.nn.Module):
    """Plumbing stand-in with the i3d_torchscript.pt call signature (NOT an I3D network)."""

    def forward(
        self, videos: torch.Tensor, rescale: bool, resize: bool, return_features: bool
    ) -> torch.Tensor:
        assert videos.shape[1:] == (3, 16, 224, 224) and not rescale and not resize and return_features
        return torch.cat([videos.mean(dim=(2, 3, 4)), videos.std(dim=(2, 3, 4))], dim=1)  # (B, 6)


def test_fvd_runs_user_torchscript_on_16_frame_clips(capsys, videos, tmp_path: Path) -> None:
    weights = tmp_path / "i3d_torchscript.pt"
    torch.jit.script(StandInI3D()).save(str(weights))
    base = ["--metrics", "fvd", "--i3d", str(weights), "--max-frames", "32"]
    code, same, _ = run_eval(capsys, "--video", videos["bikes"], "--reference", videos["bikes"], *base)
    assert code == 0 and same["fvd"]["clips"] == {"video": 2, "reference": 2}
    assert same["fvd"]["value"] == pytest.approx(0.0, abs=1e-6) and str(weights) in same["fvd"]["network"]
    code, other, _ = run_eval(
        capsys, "--video", videos["bikes"], "--reference", videos["carphone_pristine"], *base
    )
    assert code == 0 and other["fvd"]["value"] > 1e-3


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An open_clip local-dir folder with a tiny random CLIP (stands in for real local weights)."""
    folder = tmp_path_factory.mktemp("tiny_clip")
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP}))
    torch.manual_seed(0)
    save_file(open_clip.CLIP(**TINY_CLIP).state_dict(), str(folder / "open_clip_model.safetensors"))
    return folder


def test_clip_weights_are_loaded_not_random(tiny_clip_dir: Path) -> None:
    torch.manual_seed(0)
    expected = open_clip.CLIP(**TINY_CLIP).state_dict()
    loaded = load_clip(tiny_clip_dir).model.state_dict()
    for key in ("visual.conv1.weight", "token_embedding.weight", "text_projection"):
        torch.testing.assert_close(loaded[key], expected[key])


def test_clipsim_with_local_weights_uses_prompt_and_caption(capsys, videos, tiny_clip_dir: Path) -> None:
    base = [
        "--video",
        videos["carphone_pristine"],
        "--metrics",
        "clipsim",
        "--clip",
        str(tiny_clip_dir),
        "--max-frames",
        "3",
    ]
    code, caption, _ = run_eval(capsys, *base)
    assert code == 0 and caption["clipsim"]["computed"]
    per_video = caption["clipsim"]["per_video"][videos["carphone_pristine"]]
    assert per_video["frames"] == 3 and -1.0 <= per_video["clipsim"] <= 1.0
    assert (
        per_video["prompt"]
        == Path(videos["carphone_pristine"]).with_suffix(".txt").read_text().splitlines()[0].strip()
    )
    code, other, _ = run_eval(capsys, *base, "--prompt", "zzzz qqqq")
    assert other["clipsim"]["per_video"][videos["carphone_pristine"]]["prompt"] == "zzzz qqqq"
    assert not np.isclose(other["clipsim"]["value"], caption["clipsim"]["value"])


def test_clip_folder_without_weights_is_refused(capsys, videos, tmp_path: Path) -> None:
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP}))
    code, _, err = run_eval(
        capsys, "--video", videos["bikes"], "--metrics", "clipsim", "--clip", str(tmp_path)
    )
    assert code == 2 and "holds no CLIP weights" in err
