"""CMD's content-motion autoencoder, and how its two latents are generated.

Yu et al., "Efficient Video Diffusion Models via Content-Frame Motion-Latent Decomposition"
(ICLR 2024). A TimeSformer-style encoder (divided space-time attention over (p, p) patches)
maps a clip x_{1:L} (B, 3, L, H, W) to
- a content frame: a per-pixel softmax over time of predicted logits weights the frames,
  `content = Σ_l softmax_l(w)_l · x_l` (B, 3, H, W), so it looks like an image;
- a motion latent z = (z_x, z_y): token features projected to `motion_dim` channels and
  averaged along one spatial axis: z_x (B, m, L, H/p) and z_y (B, m, L, W/p).
A transformer decoder reconstructs the clip from both.

Generation reuses the `dit` family: the content frame comes from an image DiT on a 1-frame clip
of the frame's space-to-depth (B, 3p², 1, H/p, W/p) (`content_model_config`), the motion latent from a `dit` (`motion_model_config`) that takes the
packed motion (`pack_motion`: z_x and z_y side by side, (B, m, L, 1, H/p + W/p)) and the content
frame as its dense condition (`content_condition`, aligned with the packed motion).

See docs/methods.md, 'CMD: content frame and motion latent'.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from model_zoo import dit
from model_zoo.dit import DiTConfig
from model_zoo.layers import FeedForward, SelfAttention, sincos_position_3d
from model_zoo.pretrained import PretrainedMixin
from model_zoo.registry import register_family


@dataclass(frozen=True, kw_only=True)
class CMDConfig:
    in_channels: int = 3
    """Pixel channels of the clip."""
    patch_size: int = 8
    """Spatial patch p of the transformer tokens (H and W divisible by p)."""
    hidden_size: int = 768
    """Token width D of encoder and decoder."""
    encoder_depth: int = 12
    """Divided space-time blocks of the encoder."""
    decoder_depth: int = 12
    """Divided space-time blocks of the decoder."""
    num_heads: int = 12
    """Attention heads."""
    motion_dim: int = 8
    """m: channels of each motion latent (CMD's embedding dim 8)."""


FLAVORS: dict[str, dict[str, Any]] = {
    "tiny": dict(patch_size=4, hidden_size=64, encoder_depth=2, decoder_depth=2, num_heads=4),
    # TimeSformer-B-size encoder and decoder (CMD's autoencoder is TimeSformer-based): CMDConfig's defaults.
    "paper": {},
}


class Motion(NamedTuple):
    """CMD's motion latent: z_x (B, m, L, H/p) and z_y (B, m, L, W/p)."""

    z_x: Tensor
    z_y: Tensor


class DividedSpaceTimeBlock(nn.Module):
    """TimeSformer's divided attention: time attention per patch, then space attention per frame, then MLP."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm_time = nn.LayerNorm(dim)
        self.time_attn = SelfAttention(dim, heads, qkv_bias=True)
        self.norm_space = nn.LayerNorm(dim)
        self.space_attn = SelfAttention(dim, heads, qkv_bias=True)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = FeedForward(dim)

    def forward(self, tokens: Tensor) -> Tensor:
        b, t, n, d = tokens.shape  # (B, L, N, D)
        series = tokens.transpose(1, 2).reshape(b * n, t, d)  # (B*N, L, D)
        series = series + self.time_attn(self.norm_time(series))
        frames = series.view(b, n, t, d).transpose(1, 2).reshape(b * t, n, d)  # (B*L, N, D)
        frames = frames + self.space_attn(self.norm_space(frames))
        frames = frames + self.mlp(self.norm_mlp(frames))
        return frames.view(b, t, n, d)  # (B, L, N, D)


def _patchify(video: Tensor, patch: int) -> Tensor:
    return rearrange(video, "b c t (h p) (w q) -> b t (h w) (p q c)", p=patch, q=patch)  # (B, L, N, p*p*C)


def _positions(num_frames: int, height: int, width: int, dim: int, device: torch.device) -> Tensor:
    return sincos_position_3d((num_frames, height, width), dim, device).view(num_frames, height * width, dim)


class CMDEncoder(nn.Module):
    def __init__(self, config: CMDConfig) -> None:
        super().__init__()
        p, dim = config.patch_size, config.hidden_size
        self.patch = p
        self.embed = nn.Linear(p * p * config.in_channels, dim)
        self.blocks = nn.ModuleList(
            DividedSpaceTimeBlock(dim, config.num_heads) for _ in range(config.encoder_depth)
        )
        self.norm = nn.LayerNorm(dim)
        self.content_head = nn.Linear(dim, p * p)
        self.motion_x = nn.Linear(dim, config.motion_dim)
        self.motion_y = nn.Linear(dim, config.motion_dim)

    def forward(self, video: Tensor) -> tuple[Tensor, Motion]:
        _, _, t, height, width = video.shape
        h, w = height // self.patch, width // self.patch
        tokens = self.embed(_patchify(video, self.patch))  # (B, L, N, D)
        tokens = tokens + _positions(t, h, w, tokens.shape[-1], video.device)
        for block in self.blocks:
            tokens = block(tokens)
        tokens = self.norm(tokens)
        logits = rearrange(
            self.content_head(tokens), "b t (h w) (p q) -> b t (h p) (w q)", h=h, p=self.patch, q=self.patch
        )  # (B, L, H, W)
        weights = logits.softmax(dim=1)  # per-pixel distribution over the L frames
        content = torch.einsum("bthw,bcthw->bchw", weights, video)  # (B, 3, H, W)
        grid = tokens.view(tokens.shape[0], t, h, w, -1)  # (B, L, h, w, D)
        z_x = rearrange(self.motion_x(grid.mean(dim=3)), "b t h m -> b m t h")  # (B, m, L, h)
        z_y = rearrange(self.motion_y(grid.mean(dim=2)), "b t w m -> b m t w")  # (B, m, L, w)
        return content, Motion(z_x, z_y)


class CMDDecoder(nn.Module):
    def __init__(self, config: CMDConfig) -> None:
        super().__init__()
        p, dim = config.patch_size, config.hidden_size
        self.patch = p
        self.content_embed = nn.Linear(p * p * config.in_channels, dim)
        self.motion_x = nn.Linear(config.motion_dim, dim)
        self.motion_y = nn.Linear(config.motion_dim, dim)
        self.blocks = nn.ModuleList(
            DividedSpaceTimeBlock(dim, config.num_heads) for _ in range(config.decoder_depth)
        )
        self.norm = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, p * p * config.in_channels)

    def forward(self, content: Tensor, motion: Motion) -> Tensor:
        b, _, t, h = motion.z_x.shape
        w = motion.z_y.shape[-1]
        content_tokens = self.content_embed(_patchify(content[:, :, None], self.patch))  # (B, 1, N, D)
        along_x = self.motion_x(rearrange(motion.z_x, "b m t h -> b t h m"))[:, :, :, None]  # (B, L, h, 1, D)
        along_y = self.motion_y(rearrange(motion.z_y, "b m t w -> b t w m"))[:, :, None]  # (B, L, 1, w, D)
        motion_tokens = (along_x + along_y).reshape(b, t, h * w, -1)  # (B, L, N, D)
        tokens = content_tokens + motion_tokens + _positions(t, h, w, motion_tokens.shape[-1], content.device)
        for block in self.blocks:
            tokens = block(tokens)
        patches = self.out(self.norm(tokens))  # (B, L, N, p*p*3)
        return rearrange(
            patches, "b t (h w) (p q c) -> b c t (h p) (w q)", h=h, w=w, p=self.patch, q=self.patch
        )  # (B, 3, L, H, W)


@register_family("cmd", CMDConfig, FLAVORS)
class CMDAutoencoder(PretrainedMixin, nn.Module):
    """Clip (B, 3, L, H, W) -> (content frame, motion latent) -> reconstructed clip."""

    def __init__(self, config: CMDConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = CMDEncoder(config)
        self.decoder = CMDDecoder(config)

    def encode(self, video: Tensor) -> tuple[Tensor, Motion]:
        """video (B, 3, L, H, W) -> content (B, 3, H, W), Motion(z_x (B, m, L, H/p), z_y (B, m, L, W/p))."""
        return self.encoder(video)

    def decode(self, content: Tensor, motion: Motion) -> Tensor:
        return self.decoder(content, motion)  # (B, 3, L, H, W)

    @property
    def downsample_factors(self) -> tuple[int, int, int]:
        """(time, height, width) factors from the clip to the packed motion latent's grid."""
        return (1, self.config.patch_size, self.config.patch_size)

    @property
    def latent_channels(self) -> int:
        """Channels of the packed motion latent the motion DiT denoises (`pack_motion`: m)."""
        return self.config.motion_dim

    def forward(self, video: Tensor) -> tuple[Tensor, Tensor, Motion]:
        """-> (reconstruction (B, 3, L, H, W), content frame, motion latent)."""
        content, motion = self.encode(video)
        return self.decode(content, motion), content, motion

    def contract_output(self, video: Tensor) -> Tensor:
        return self(video)[0]

    def example_input(self, batch_size: int = 2, num_frames: int = 4, size: int = 16) -> Tensor:
        device = self.encoder.embed.weight.device
        return torch.randn(batch_size, self.config.in_channels, num_frames, size, size, device=device)

    def checkpoint_modules(self) -> list[nn.Module]:
        return [m for m in self.modules() if isinstance(m, DividedSpaceTimeBlock)]


def pack_motion(motion: Motion) -> Tensor:
    """Motion latent -> the motion DiT's input (B, m, L, 1, h + w): z_x then z_y along the last
    axis, so the DiT has L·(h + w)/2 tokens, not the L·h·w/4 of a full 3-D grid."""
    return torch.cat([motion.z_x, motion.z_y], dim=-1)[:, :, :, None]  # (B, m, L, 1, h + w)


def unpack_motion(packed: Tensor, rows: int) -> Motion:
    """Inverse of `pack_motion`; `rows` is h = H/p, the length of z_x."""
    flat = packed[:, :, :, 0]  # (B, m, L, h + w)
    return Motion(flat[..., :rows], flat[..., rows:])  # (B, m, L, h), (B, m, L, w)


def patchify_content(content: Tensor, patch_size: int) -> Tensor:
    """Content frame (B, 3, H, W) -> space-to-depth (B, 3p², H/p, W/p), what the content model denoises."""
    return F.pixel_unshuffle(content, patch_size)


def unpatchify_content(patches: Tensor, patch_size: int) -> Tensor:
    """Inverse of `patchify_content`: (B, 3p², H/p, W/p) -> (B, 3, H, W)."""
    return F.pixel_shuffle(patches, patch_size)


def content_condition(content: Tensor, patch_size: int) -> Tensor:
    """Content frame (B, 3, H, W) -> the motion DiT's dense condition (B, 3p², 1, h + w), aligned
    with `pack_motion`: the space-to-depth frame averaged over the columns (at z_x's positions),
    then over the rows (at z_y's)."""
    patches = patchify_content(content, patch_size)  # (B, 3p², h, w)
    return torch.cat([patches.mean(dim=3), patches.mean(dim=2)], dim=-1)[:, :, None]  # (B, 3p², 1, h + w)


def motion_grid(config: CMDConfig, height: int, width: int) -> tuple[int, int, int]:
    """(channels, rows, columns) of one frame of the packed motion latent of H x W clips."""
    return (config.motion_dim, 1, (height + width) // config.patch_size)


def content_grid(config: CMDConfig, height: int, width: int) -> tuple[int, int, int]:
    """(channels, rows, columns) of the content frame's space-to-depth for H x W clips."""
    p = config.patch_size
    return (config.in_channels * p * p, height // p, width // p)


def motion_model_config(config: CMDConfig, size: str = "S", **overrides: Any) -> DiTConfig:
    """The `dit` config of CMD's motion model for this autoencoder (size: tiny/S/B/L/XL): patches
    of 2 motion positions along the packed axis."""
    fields = {
        **dit.FLAVORS[size],
        "in_channels": config.motion_dim,
        "cond_channels": config.in_channels * config.patch_size**2,
        "patch_size": (1, 1, 2),
    }
    return DiTConfig(**{**fields, **overrides})


def content_model_config(config: CMDConfig, size: str = "tiny", **overrides: Any) -> DiTConfig:
    """The image model generating content frames as `patchify_content` gives them (B, 3p², 1, h, w):
    a `dit` on 1-frame clips (attention over the frame's patches, text by cross-attention), the
    family of the motion model, without a dense condition."""
    fields = {**dit.FLAVORS[size], "in_channels": config.in_channels * config.patch_size**2, "cond_channels": 0}
    return DiTConfig(**{**fields, **overrides})
