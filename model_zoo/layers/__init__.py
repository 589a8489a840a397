"""Shared building blocks of the model zoo (attention over space and time, embeddings,
adaptive norms, factorised ResNet blocks, video/frame layouts). Model files compose them."""

from model_zoo.layers.attention import (
    CrossAttention,
    FeedForward,
    RelativePositionBias,
    SelfAttention,
    apply_rotary,
    rotary_tables,
)
from model_zoo.layers.embeddings import TimestepEmbedding, sincos_position_3d, sinusoidal_embedding
from model_zoo.layers.norm import AdaGroupNorm, modulate
from model_zoo.layers.resnet import Downsample, ResBlock, TemporalConv, Upsample, zero_module
from model_zoo.layers.transformer import DiTBlock, SpatialTransformer, TemporalTransformer
from model_zoo.layers.video import (
    frames_to_tokens,
    frames_to_video,
    per_frame,
    tokens_to_frames,
    video_to_frames,
)

__all__ = [
    "AdaGroupNorm",
    "CrossAttention",
    "DiTBlock",
    "Downsample",
    "FeedForward",
    "RelativePositionBias",
    "ResBlock",
    "SelfAttention",
    "SpatialTransformer",
    "TemporalConv",
    "TemporalTransformer",
    "TimestepEmbedding",
    "Upsample",
    "apply_rotary",
    "frames_to_tokens",
    "frames_to_video",
    "modulate",
    "per_frame",
    "rotary_tables",
    "sincos_position_3d",
    "sinusoidal_embedding",
    "tokens_to_frames",
    "video_to_frames",
    "zero_module",
]
