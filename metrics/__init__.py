"""Video metrics of `lvd eval`: SCuts, MAWE, frame FID/KID, a Fréchet video-feature proxy,
per-chunk drift, and FVD from user-supplied I3D weights.

A layer of its own: the metrics read video files, generated or real, and never the sampler that
wrote them; they may import data_pipeline (decoding, scene detection) and common only."""

from metrics.feature_stats import (
    drift_curve,
    frechet_distance,
    kernel_inception_distance,
    window_descriptors,
)
from metrics.frames import FrameSelection, read_frames
from metrics.inception import frame_features
from metrics.mawe import MaweConfig, mawe
from metrics.scuts import scene_cuts

__all__ = [
    "FrameSelection",
    "MaweConfig",
    "drift_curve",
    "frame_features",
    "frechet_distance",
    "kernel_inception_distance",
    "mawe",
    "read_frames",
    "scene_cuts",
    "window_descriptors",
]
