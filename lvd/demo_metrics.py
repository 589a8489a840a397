"""The demo's figures, computed in-process on uint8 clips (N, T, H, W, 3):

- VAE reconstruction PSNR and SSIM of an exported VAE on clips it was not trained on;
- frame FID between two sets of frames with the TF-FID InceptionV3 of `lvd eval`;
- motion: mean absolute frame-to-frame difference (pixels scaled to 0..1).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import model_zoo
from data_pipeline.stages import to_unit_range
from metrics import inception
from metrics.feature_stats import frechet_distance
from sampler.video_io import to_uint8_frames


@torch.no_grad()
def reconstruct(vae_dir: Path, clips: np.ndarray) -> np.ndarray:
    """Encode (posterior mean) and decode each clip with an exported VAE folder; uint8 out."""
    vae = model_zoo.from_pretrained(vae_dir).eval()
    out = []
    for clip in clips:
        video = to_unit_range(clip[None]).contiguous()  # (1, 3, T, H, W) in [-1, 1]
        out.append(to_uint8_frames(vae.decode(vae.encode(video).mode())))
    return np.stack(out)


def psnr(reference: np.ndarray, test: np.ndarray) -> float:
    """Mean over clips of the PSNR (dB, peak 255) of each clip."""
    diff = reference.astype(np.float64) - test.astype(np.float64)
    mse = (diff**2).reshape(len(reference), -1).mean(axis=1)
    return float(np.mean(10.0 * np.log10(255.0**2 / np.maximum(mse, 1e-10))))


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]  # (1, 1, size, size)


def ssim(reference: np.ndarray, test: np.ndarray) -> float:
    """Mean SSIM (Gaussian window 11 / 1.5, per RGB channel, valid region) over all frames."""
    a = torch.from_numpy(reference.reshape(-1, *reference.shape[-3:])).double().permute(0, 3, 1, 2) / 255.0
    b = torch.from_numpy(test.reshape(-1, *test.shape[-3:])).double().permute(0, 3, 1, 2) / 255.0
    a, b = a.reshape(-1, 1, *a.shape[-2:]), b.reshape(-1, 1, *b.shape[-2:])  # (N*3, 1, H, W)
    window = _gaussian_window()
    mu_a, mu_b = F.conv2d(a, window), F.conv2d(b, window)
    var_a = F.conv2d(a * a, window) - mu_a**2
    var_b = F.conv2d(b * b, window) - mu_b**2
    cov = F.conv2d(a * b, window) - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    value = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return float(value.mean())


def motion_l1(clips: np.ndarray) -> float:
    """Mean |frame[t+1] - frame[t]| over clips, frames, pixels and channels (0..1 scale)."""
    frames = clips.astype(np.float32) / 255.0
    return float(np.abs(np.diff(frames, axis=1)).mean())


def frame_features(clips: np.ndarray, threads: int | None = None) -> np.ndarray:
    """(N*T, 2048) Inception pool features of every frame of the clips, with `threads` torch
    threads (default: every CPU; the demo's other stages are done when its figures run)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads or os.cpu_count() or 1)
    try:
        return inception.frame_features(iter(clips.reshape(-1, *clips.shape[-3:])))
    finally:
        torch.set_num_threads(before)


def fid(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Frechet distance between two sets of Inception features (as `lvd eval --metrics fid`)."""
    return float(frechet_distance(features_a, features_b))
