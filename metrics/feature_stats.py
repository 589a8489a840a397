"""Distances between two sets of feature vectors: Fréchet distance (FID), KID, and the video
descriptors of the Fréchet video-feature proxy and the drift curve.

Fréchet distance (Heusel et al. 2017) between Gaussians fitted to sets A and B:
    d² = |μ_A − μ_B|² + tr(Σ_A) + tr(Σ_B) − 2 tr((Σ_A Σ_B)^½).
tr((Σ_A Σ_B)^½) is computed exactly without a d x d matrix square root when a set has fewer
samples than dimensions: with centred, (n−1)^-½-scaled features X_A, X_B (so Σ = XᵀX), the
non-zero eigenvalues of Σ_A Σ_B are those of M Mᵀ with M = X_A X_Bᵀ, hence the trace is the sum
of the singular values of M. With many samples the symmetric form Σ_A^½ Σ_B Σ_A^½ is used.
Both need >= 2 samples per set; with fewer samples than dimensions the covariances are
rank-deficient and the figure is a biased small-sample estimate (the output states both counts).
"""

from __future__ import annotations

import numpy as np


def _scaled_centred(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = features.mean(axis=0)
    return mean, (features - mean) / np.sqrt(len(features) - 1)


def _trace_sqrt_product(scaled_a: np.ndarray, scaled_b: np.ndarray) -> float:
    samples, dims = min(len(scaled_a), len(scaled_b)), scaled_a.shape[1]
    if samples <= dims:
        return float(np.linalg.svd(scaled_a @ scaled_b.T, compute_uv=False).sum())
    eigenvalues, eigenvectors = np.linalg.eigh(scaled_a.T @ scaled_a)
    sqrt_a = (eigenvectors * np.sqrt(np.clip(eigenvalues, 0.0, None))) @ eigenvectors.T
    inner = sqrt_a @ (scaled_b.T @ scaled_b) @ sqrt_a
    return float(np.sqrt(np.clip(np.linalg.eigvalsh(inner), 0.0, None)).sum())


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to (N_a, D) and (N_b, D) features; N >= 2 each."""
    if len(features_a) < 2 or len(features_b) < 2:
        raise ValueError(
            f"a covariance needs >= 2 samples per set, got {len(features_a)} and {len(features_b)}"
        )
    mean_a, scaled_a = _scaled_centred(features_a.astype(np.float64))
    mean_b, scaled_b = _scaled_centred(features_b.astype(np.float64))
    traces = np.sum(scaled_a**2) + np.sum(scaled_b**2)
    distance = np.sum((mean_a - mean_b) ** 2) + traces - 2.0 * _trace_sqrt_product(scaled_a, scaled_b)
    return float(max(distance, 0.0))


def _polynomial_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD² with the cubic kernel k(a, b) = (a·b / d + 1)³ of KID (Bińkowski et al. 2018)."""
    dims, m = x.shape[1], len(x)
    k_xx, k_yy, k_xy = ((u @ v.T / dims + 1.0) ** 3 for u, v in ((x, x), (y, y), (x, y)))
    within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(within - 2.0 * k_xy.mean())


def kernel_inception_distance(
    features_a: np.ndarray,
    features_b: np.ndarray,
    *,
    subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 0,
) -> dict[str, float | int]:
    """KID: mean and std of the unbiased MMD² over random equal-size subsets (without replacement).
    The subset size is min(subset_size, N_a, N_b); when both sets are that size, one subset is exact."""
    size = min(subset_size, len(features_a), len(features_b))
    if size < 2:
        raise ValueError(f"KID needs >= 2 samples per set, got {len(features_a)} and {len(features_b)}")
    rng = np.random.default_rng(seed)
    draws = 1 if len(features_a) == len(features_b) == size else subsets
    values = [
        _polynomial_mmd2(
            features_a[rng.choice(len(features_a), size, replace=False)],
            features_b[rng.choice(len(features_b), size, replace=False)],
        )
        for _ in range(draws)
    ]
    return {
        "value": float(np.mean(values)),
        "std": float(np.std(values)),
        "subset_size": size,
        "subsets": draws,
    }


def window_descriptors(features: np.ndarray, window: int) -> np.ndarray:
    """Video descriptors of the Fréchet video-feature proxy, one per window of `window` frames
    taken with stride window // 2: concat(mean_t f_t, mean_t |f_{t+1} − f_t|) over the window,
    i.e. appearance and frame-to-frame feature change. (N, D) -> (num_windows, 2D)."""
    if len(features) < window:
        return np.zeros((0, 2 * features.shape[1]))
    descriptors = []
    for start in range(0, len(features) - window + 1, max(window // 2, 1)):
        chunk = features[start : start + window]
        descriptors.append(np.concatenate([chunk.mean(axis=0), np.abs(np.diff(chunk, axis=0)).mean(axis=0)]))
    return np.stack(descriptors)


def drift_curve(features: np.ndarray, chunk_frames: int) -> dict[str, list[float] | list[int]]:
    """Per non-overlapping chunk k of `chunk_frames` frames: Fréchet distance and squared distance
    of mean features between chunk k and chunk 0 (a trailing chunk of < 2 frames is dropped)."""
    chunks = [features[start : start + chunk_frames] for start in range(0, len(features), chunk_frames)]
    chunks = [chunk for chunk in chunks if len(chunk) >= 2]
    if not chunks:
        raise ValueError(f"a drift curve needs >= 2 frames, got {len(features)}")
    first = chunks[0]
    return {
        "frechet": [frechet_distance(chunk, first) for chunk in chunks],
        "mean_feature_sq_distance": [float(np.sum((chunk.mean(0) - first.mean(0)) ** 2)) for chunk in chunks],
        "chunk_start_frames": [index * chunk_frames for index in range(len(chunks))],
    }
