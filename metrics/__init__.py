"""Video metrics of `lvd eval` (SPEC §5): SCuts, MAWE, frame FID/KID, a Fréchet video-feature
proxy, per-chunk drift, and FVD from user-supplied I3D weights."""

from sampler.metrics.feature_stats import (
    drift_curve,
    frechet_distance,
    kernel_inception_distance,
    window_descriptors,
)
from sampler.metrics.frames import FrameSelection, read_frames
from sampler.metrics.inception import frame_features
from sampler.metrics.mawe import MaweConfig, mawe
from sampler.metrics.scuts import scene_cuts

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
