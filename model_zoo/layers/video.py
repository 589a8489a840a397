"""Video <-> frame layouts.

The U-Net runs on a *frame layout*: a 4-D tensor (B*T, C, H, W) in `channels_last` memory
format, i.e. physically (B, T, H, W, C). In that layout per-frame 2-D convolutions are plain
`Conv2d` calls, the tokens of each frame (B*T, H*W, C) and of each clip (B, T*H*W, C) are
free views, and the (B, C, T, H, W) video is a `channels_last_3d` view of the same memory.
"""

from __future__ import annotations

from torch import Tensor


def video_to_frames(video: Tensor) -> Tensor:
    """(B, C, T, H, W) -> (B*T, C, H, W) in channels_last memory format (one copy at most)."""
    b, c, t, h, w = video.shape
    frames = video.permute(0, 2, 3, 4, 1).reshape(b * t, h, w, c)  # (B*T, H, W, C)
    return frames.permute(0, 3, 1, 2)  # (B*T, C, H, W), channels_last strides


def frames_to_video(frames: Tensor, num_frames: int) -> Tensor:
    """(B*T, C, H, W) -> (B, C, T, H, W); a view when `frames` is channels_last."""
    bt, c, h, w = frames.shape
    tokens = frames.permute(0, 2, 3, 1).reshape(bt // num_frames, num_frames, h, w, c)  # (B, T, H, W, C)
    return tokens.permute(0, 4, 1, 2, 3)  # (B, C, T, H, W)


def frames_to_tokens(frames: Tensor) -> Tensor:
    """(N, C, H, W) -> (N, H*W, C) tokens; a view when `frames` is channels_last."""
    n, c, h, w = frames.shape
    return frames.permute(0, 2, 3, 1).reshape(n, h * w, c)  # (N, H*W, C)


def tokens_to_frames(tokens: Tensor, height: int, width: int) -> Tensor:
    """(N, H*W, C) -> (N, C, H, W) with channels_last strides (a view of contiguous tokens)."""
    n, _, c = tokens.shape
    return tokens.reshape(n, height, width, c).permute(0, 3, 1, 2)  # (N, C, H, W)


def per_frame(emb: Tensor, num_frames: int) -> Tensor:
    """Per-sample (B, D) or per-frame (B, T, D) embedding -> (B*T, D), matching the frame layout."""
    if emb.dim() == 3:
        return emb.reshape(-1, emb.shape[-1])  # (B*T, D)
    return emb.repeat_interleave(num_frames, dim=0)  # (B*T, D)
