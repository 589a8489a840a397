"""The measurements of benchmarks/fidelity.py on constructed videos whose answer is known, and
where it looks for seams (not a run of the benchmark: that needs a FULL demo folder)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from benchmarks.paper_fidelity.cases import BLEND_FRAMES, BLEND_OVERLAP, chunk_seams, refinement_seams
from benchmarks.paper_fidelity.runs import TIME_FACTOR, Pair, entry, shows_direction
from metrics.mawe import MaweConfig
from metrics.seams import anchor_similarity, consecutive_correlations, seam_mawe
from sampler.strategies.blending import BlendingConfig, merge_chunks, split_chunks


def texture(seed: int) -> np.ndarray:
    """A smooth random RGB picture, 96 x 96."""
    small = np.random.default_rng(seed).integers(0, 255, (16, 16, 3)).astype(np.uint8)
    return cv2.resize(small, (96, 96), interpolation=cv2.INTER_CUBIC)


def panning(frames: int, cut_every: int | None) -> list[np.ndarray]:
    """A camera panning over a texture, one pixel per frame; with `cut_every`, every other
    chunk of that many frames shows another texture (a hard cut at each chunk seam)."""
    pictures = texture(1), texture(2)
    return [
        np.roll(pictures[(i // cut_every) % 2 if cut_every else 0], i, axis=1)[:64, :64]
        for i in range(frames)
    ]


def test_seam_mawe_ratio_sees_a_hard_cut_at_every_seam():
    config, seams = MaweConfig(size=64), [8, 16, 24]
    smooth, cut = seam_mawe(panning(32, None), seams, config), seam_mawe(panning(32, 8), seams, config)
    assert smooth["seams"] == cut["seams"] == seams
    assert smooth["seam"]["pairs"] == 3 and smooth["interior"]["pairs"] == 28
    assert smooth["ratio"] < 2
    assert cut["ratio"] > 50 * smooth["ratio"]
    assert cut["seam"]["warp_error"] > 20 * smooth["seam"]["warp_error"]
    with pytest.raises(ValueError, match="seams"):
        seam_mawe(panning(8, None), [0, 40], config)


def test_interframe_correlation_of_identical_independent_and_constant_frames():
    picture = texture(3)
    np.testing.assert_allclose(consecutive_correlations([picture] * 4), [1.0, 1.0, 1.0])
    inverted = consecutive_correlations([picture, 255 - picture])
    np.testing.assert_allclose(inverted, [-1.0])
    rng = np.random.default_rng(0)
    independent = consecutive_correlations([rng.integers(0, 255, (64, 64, 3)) for _ in range(6)])
    assert np.abs(independent).max() < 0.05
    assert consecutive_correlations([np.full((8, 8, 3), 7), picture[:8, :8]]).tolist() == [0.0]


def test_anchor_similarity_is_the_mean_cosine_to_the_anchor_row():
    features = np.array([[1.0, 0.0], [2.0, 0.0], [0.0, 3.0], [1.0, 1.0]])
    assert anchor_similarity(features, 0, [1]) == pytest.approx(1.0)
    assert anchor_similarity(features, 0, [2]) == pytest.approx(0.0)
    assert anchor_similarity(features, 0, [1, 2, 3]) == pytest.approx((1 + 0 + 2**-0.5) / 3)


def test_refinement_seams_are_where_the_merged_video_changes_chunk():
    """Label each refinement chunk's frames with its index; the merged video switches label
    exactly at the seams the benchmark measures (in latent frames, times the VAE's time factor)."""
    config = BlendingConfig(blend_frames=BLEND_FRAMES, blend_overlap=BLEND_OVERLAP)
    frames = 128
    chunks = split_chunks(torch.zeros(1, 1, frames // TIME_FACTOR, 1, 1), config)
    labelled = [torch.full_like(chunk, float(index)) for index, chunk in enumerate(chunks)]
    labels = merge_chunks(labelled, frames // TIME_FACTOR, config).flatten()
    switches = [int(i) for i in torch.nonzero(labels[1:] != labels[:-1]).flatten() + 1]
    assert (
        refinement_seams(frames)
        == [TIME_FACTOR * s for s in switches]
        == [16, 26, 36, 46, 56, 66, 76, 86, 96, 106, 116, 126]
    )
    assert chunk_seams(48, 8) == [16, 32]


def test_a_result_line_says_whether_the_run_shows_the_papers_direction():
    assert shows_direction(1.0, 2.0, "lower") and not shows_direction(3.0, 2.0, "lower")
    assert shows_direction(0.9, 0.5, "higher") and not shows_direction(0.5, 0.5, "higher")
    assert shows_direction(None, 0.5, "higher") is None
    pair = Pair("x", ["--strategy", "vidrd"], [], ["--alpha", "0"])
    line = entry("n", pair, measurement="m", unit="u", better="lower", values=(1.0, 2.0), detail={"k": 1})
    assert line["goal"] == line["ablation_value"] == 2.0 and line["value"] == 1.0
    assert line["shows_paper_direction"] is True and line["ablation"] == "--alpha 0"
    assert line["detail"] == {"flags": "--strategy vidrd", "k": 1}
