"""Video DiT: adaLN-Zero transformer over 3-D patches (CMD's motion model; video latent DiT).

x (B, C, T, H, W) is cut into (pt, ph, pw) patches -> tokens (B, N, D) with N = T/pt * H/ph *
W/pw, plus a fixed 3-D sin-cos position table. The timestep conditions every block by
adaLN-Zero; text tokens enter by cross-attention; a dense condition frame (CMD's content
frame, (B, C_c, H, W)) is patch-embedded with (ph, pw) patches and added to the tokens of
every time slice. The final layer is zero-initialised, so the initial prediction is zero.

See docs/methods.md, 'Video DiT (adaLN-Zero)'.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from einops import rearrange
from torch import Tensor, nn

from model_zoo.layers import DiTBlock, TimestepEmbedding, modulate, sincos_position_3d, zero_module
from model_zoo.layers.attention import SequenceShard
from model_zoo.pretrained import PretrainedMixin
from model_zoo.registry import register_family


@dataclass(frozen=True, kw_only=True)
class DiTConfig:
    in_channels: int = 4
    """Channels of the input latent."""
    out_channels: int | None = None
    """Channels of the prediction; None means in_channels."""
    patch_size: tuple[int, int, int] = (1, 2, 2)
    """3-D patch (pt, ph, pw); T, H and W must be divisible by it."""
    hidden_size: int = 1152
    """Token width D."""
    depth: int = 28
    """Number of DiT blocks."""
    num_heads: int = 16
    """Attention heads (hidden_size must be divisible by it)."""
    mlp_ratio: float = 4.0
    """MLP hidden width as a multiple of hidden_size."""
    context_dim: int | None = None
    """Width of the text tokens for cross-attention; None builds no cross-attention."""
    cond_channels: int = 0
    """Channels of the dense condition frame (CMD's content frame); 0 disables it."""


FLAVORS: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden_size=64, depth=2, num_heads=4, context_dim=32, cond_channels=4),
    # CMD motion-model sizes (DiT-S/B/L/XL).
    "S": dict(hidden_size=384, depth=12, num_heads=6),
    "B": dict(hidden_size=768, depth=12, num_heads=12),
    "L": dict(hidden_size=1024, depth=24),
    "XL": {},  # DiTConfig's defaults
    # Billion-parameter video DiT with OpenCLIP ViT-H text context.
    "1b": dict(hidden_size=1536, num_heads=24, context_dim=1024),
}


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm and a zero-initialised linear map from tokens to patch values."""

    def __init__(self, dim: int, patch_values: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.modulation = zero_module(nn.Linear(dim, 2 * dim))
        self.linear = zero_module(nn.Linear(dim, patch_values))

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        shift, scale = self.modulation(nn.functional.silu(cond)).chunk(2, dim=-1)  # 2 x (B, D)
        return self.linear(modulate(self.norm(x), shift, scale))  # (B, N, pt*ph*pw*C_out)


@register_family("dit", DiTConfig, FLAVORS)
class DiT(PretrainedMixin, nn.Module):
    """adaLN-Zero video DiT (see the module docstring)."""

    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        self.config = config
        pt, ph, pw = config.patch_size
        dim = config.hidden_size
        self.out_channels = config.out_channels or config.in_channels
        self.patch_embed = nn.Linear(pt * ph * pw * config.in_channels, dim)
        self.cond_embed = nn.Linear(ph * pw * config.cond_channels, dim) if config.cond_channels else None
        self.time_embed = TimestepEmbedding(dim)
        self.blocks = nn.ModuleList(
            [
                DiTBlock(dim, config.num_heads, context_dim=config.context_dim, mlp_ratio=config.mlp_ratio)
                for _ in range(config.depth)
            ]
        )
        self.final = FinalLayer(dim, pt * ph * pw * self.out_channels)
        # Set from outside to run the blocks on a part of the token sequence (sequence parallelism).
        self.sequence_shard: SequenceShard | None = None

    def _embed(self, x: Tensor, cond_frame: Tensor | None) -> Tensor:
        pt, ph, pw = self.config.patch_size
        b, _, t, h, w = x.shape
        grid = (t // pt, h // ph, w // pw)
        patches = rearrange(x, "b c (t pt) (h ph) (w pw) -> b (t h w) (pt ph pw c)", pt=pt, ph=ph, pw=pw)
        tokens = self.patch_embed(patches)  # (B, N, D)
        # The fixed table follows the tokens' dtype, so bf16 training keeps a bf16 residual stream.
        tokens = tokens + sincos_position_3d(grid, self.config.hidden_size, x.device).to(tokens.dtype)
        if cond_frame is not None:
            if self.cond_embed is None:
                raise ValueError("cond_frame was given but this DiT has cond_channels=0")
            cond = rearrange(cond_frame, "b c (h ph) (w pw) -> b (h w) (ph pw c)", ph=ph, pw=pw)
            tokens = (
                tokens.view(b, grid[0], grid[1] * grid[2], -1) + self.cond_embed(cond)[:, None]
            )  # (B, t, h*w, D)
            tokens = tokens.view(b, -1, self.config.hidden_size)  # (B, N, D)
        return tokens

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        *,
        context: Tensor | None = None,
        cond_frame: Tensor | None = None,
        context_mask: Tensor | None = None,
    ) -> Tensor:
        """x (B, C, T, H, W), t (B,), context (B, L, context_dim), cond_frame (B, C_c, H, W),
        context_mask (B, L) bool (True = a real token; None = all real) -> (B, C_out, T, H, W)."""
        pt, ph, pw = self.config.patch_size
        _, _, t_len, h, w = x.shape
        tokens = self._embed(x, cond_frame)  # (B, N, D)
        cond = self.time_embed(t)  # (B, D)
        shard = self.sequence_shard
        if shard is not None:
            tokens = shard.shard(tokens)  # (B, N_local, D), after the position table
        for block in self.blocks:
            tokens = block(tokens, cond, context, context_mask)
        patches = self.final(tokens, cond)  # (B, N, pt*ph*pw*C_out)
        if shard is not None:
            patches = shard.gather(patches)
        return rearrange(
            patches,
            "b (t h w) (pt ph pw c) -> b c (t pt) (h ph) (w pw)",
            t=t_len // pt,
            h=h // ph,
            w=w // pw,
            pt=pt,
            ph=ph,
            pw=pw,
        )  # (B, C_out, T, H, W)

    def example_inputs(self, x: Tensor) -> dict[str, Tensor]:
        """Forward keyword arguments for a sample input x: timesteps, 77 text tokens, a condition frame."""
        b, _, _, h, w = x.shape
        inputs = {"t": torch.linspace(50, 950, b, device=x.device).long()}
        if self.config.context_dim:
            inputs["context"] = torch.randn(b, 77, self.config.context_dim, device=x.device)
        if self.config.cond_channels:
            inputs["cond_frame"] = torch.randn(b, self.config.cond_channels, h, w, device=x.device)
        return inputs

    def example_input(self, batch_size: int = 2, num_frames: int = 4, size: int = 16) -> Tensor:
        """A random latent clip (B, C, T, size, size) on the model's device."""
        device = self.patch_embed.weight.device
        return torch.randn(batch_size, self.config.in_channels, num_frames, size, size, device=device)

    def checkpoint_modules(self) -> list[nn.Module]:
        """The DiT blocks (the trainer may wrap them with activation checkpointing)."""
        return list(self.blocks)
