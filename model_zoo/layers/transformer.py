"""Transformer blocks: per-frame spatial (self + cross) attention, per-location temporal
attention for the U-Net's frame layout, and the adaLN-Zero DiT block on token sequences."""

from __future__ import annotations

from typing import Literal

from torch import Tensor, nn

from model_zoo.layers.attention import (
    CrossAttention,
    FeedForward,
    RelativePositionBias,
    SelfAttention,
    rotary_tables,
)
from model_zoo.layers.norm import modulate
from model_zoo.layers.resnet import clip_group_norm, zero_module
from model_zoo.layers.video import frames_to_tokens, tokens_to_frames


class SpatialTransformer(nn.Module):
    """LDM spatial transformer applied to every frame.

    GN -> linear proj_in -> [LN -> self-attention over the H*W tokens of a frame;
    LN -> `CrossAttention` to `context` (skipped when context is None; `context_mask` (B, S)
    bool: its real tokens, None = all); LN -> GEGLU FF] ->
    proj_out (zero-init) -> + input. Cross-attention treats the T*H*W tokens of a clip as one
    query set: per-frame cross-attention with a per-clip context is the same computation.
    """

    def __init__(
        self, channels: int, heads: int, *, context_dim: int | None, groups: int = 32, ff_mult: float = 4.0
    ) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, channels)
        self.norm_self = nn.LayerNorm(channels)
        self.self_attn = SelfAttention(channels, heads)
        self.norm_cross = nn.LayerNorm(channels) if context_dim else None
        self.cross_attn = CrossAttention(channels, context_dim, heads) if context_dim else None
        self.norm_ff = nn.LayerNorm(channels)
        self.ff = FeedForward(channels, mult=ff_mult, gated=True)
        self.proj_out = zero_module(nn.Linear(channels, channels))

    def forward(
        self, frames: Tensor, context: Tensor | None, num_frames: int, context_mask: Tensor | None = None
    ) -> Tensor:
        bt, c, h, w = frames.shape
        x = self.proj_in(frames_to_tokens(self.norm(frames)))  # (B*T, H*W, C)
        x = x + self.self_attn(self.norm_self(x))
        if self.cross_attn is not None and context is not None:
            clip = x.view(bt // num_frames, num_frames * h * w, c)  # (B, T*H*W, C)
            x = (clip + self.cross_attn(self.norm_cross(clip), context, context_mask)).view(bt, h * w, c)  # (B*T, H*W, C)
        x = x + self.ff(self.norm_ff(x))
        return frames + tokens_to_frames(self.proj_out(x), h, w)  # (B*T, C, H, W)


class TemporalTransformer(nn.Module):
    """Self-attention over time at every spatial location (LVDM's temporal transformer).

    Relative position over time is a learned per-head bias on the clipped distance
    (`position="bias"`), rotary embedding of queries/keys (`position="rope"`) or absent
    (`position="none"`). `width` sets the attention width between proj_in and proj_out
    (default: channels); `double_attention` adds a second LayerNorm + self-attention before the
    feed-forward and `clip_norm` takes the input GroupNorm's statistics over the whole clip
    (ModelScope's temporal block). The output projection is zero-initialised, so the
    block starts as the identity.
    """

    def __init__(
        self,
        channels: int,
        heads: int,
        *,
        groups: int = 32,
        ff_mult: float = 4.0,
        position: Literal["bias", "rope", "none"] = "bias",
        max_distance: int = 32,
        width: int | None = None,
        double_attention: bool = False,
        clip_norm: bool = False,
    ) -> None:
        super().__init__()
        inner = width or channels
        self.clip_norm = clip_norm
        self.heads = heads
        self.position = position
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, inner)
        self.norm_attn = nn.LayerNorm(inner)
        self.attn = SelfAttention(inner, heads)
        self.position_bias = RelativePositionBias(heads, max_distance) if position == "bias" else None
        self.norm_attn2 = nn.LayerNorm(inner) if double_attention else None
        self.attn2 = SelfAttention(inner, heads) if double_attention else None
        self.norm_ff = nn.LayerNorm(inner)
        self.ff = FeedForward(inner, mult=ff_mult, gated=True)
        self.proj_out = zero_module(nn.Linear(inner, channels))

    def forward(self, frames: Tensor, num_frames: int) -> Tensor:
        bt, c, h, w = frames.shape
        b = bt // num_frames
        normed = clip_group_norm(self.norm, frames, num_frames) if self.clip_norm else self.norm(frames)
        tokens = frames_to_tokens(normed).view(b, num_frames, h * w, c)  # (B, T, H*W, C)
        x = tokens.transpose(1, 2).reshape(b * h * w, num_frames, c)  # (B*H*W, T, C)
        x = self.proj_in(x)  # (B*H*W, T, inner)
        if self.position_bias is not None:
            x = x + self.attn(self.norm_attn(x), bias=self.position_bias(num_frames))
        elif self.position == "rope":
            rotary = rotary_tables(num_frames, x.shape[-1] // self.heads, frames.device)
            x = x + self.attn(self.norm_attn(x), rotary=rotary)
        else:
            x = x + self.attn(self.norm_attn(x))
        if self.attn2 is not None:
            x = x + self.attn2(self.norm_attn2(x))
        x = x + self.ff(self.norm_ff(x))
        x = self.proj_out(x).view(b, h * w, num_frames, c).transpose(1, 2)  # (B, T, H*W, C)
        return frames + tokens_to_frames(x.reshape(bt, h * w, c), h, w)  # (B*T, C, H, W)


class DiTBlock(nn.Module):
    """adaLN-Zero transformer block (Peebles & Xie, DiT) with optional text cross-attention.

    x = x + g1 * SelfAttn(modulate(LN(x), b1, s1)); x = x + CrossAttn(LN(x), context);
    x = x + g2 * MLP(modulate(LN(x), b2, s2)), with (b1, s1, g1, b2, s2, g2) = Linear(SiLU(c)).
    The modulation and the cross-attention output are zero-initialised, so the block is the
    identity at initialisation.
    """

    def __init__(
        self, dim: int, heads: int, *, context_dim: int | None = None, mlp_ratio: float = 4.0
    ) -> None:
        super().__init__()
        self.norm_attn = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(dim, heads, qkv_bias=True)
        self.norm_cross = nn.LayerNorm(dim, eps=1e-6) if context_dim else None
        self.cross_attn = (
            CrossAttention(dim, context_dim, heads, qkv_bias=True, zero_init=True) if context_dim else None
        )
        self.norm_mlp = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = FeedForward(dim, mult=mlp_ratio)
        self.modulation = zero_module(nn.Linear(dim, 6 * dim))

    def forward(
        self, x: Tensor, cond: Tensor, context: Tensor | None = None, context_mask: Tensor | None = None
    ) -> Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(nn.functional.silu(cond)).chunk(
            6, dim=-1
        )
        x = x + gate1[:, None] * self.attn(modulate(self.norm_attn(x), shift1, scale1))
        if self.cross_attn is not None and context is not None:
            x = x + self.cross_attn(self.norm_cross(x), context, context_mask)
        return x + gate2[:, None] * self.mlp(modulate(self.norm_mlp(x), shift2, scale2))
