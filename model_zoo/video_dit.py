"""Current-generation video DiT: 3-D RoPE, QK-norm, shared adaLN modulation, text by
cross-attention over a masked variable-length encoder output (or joint MM-DiT attention).

x (B, C, T, H, W) is cut into (pt, ph, pw) patches -> tokens (B, N, D), N = T/pt * H/ph * W/pw.
Positions enter only as axial rotary embeddings of queries and keys over (t, h, w), so attention
scores depend on position differences alone. Queries and keys are RMS-normalised per head.
The timestep conditions every block through one modulation MLP shared by all blocks, plus a
learned per-block offset (PixArt-α, Wan); `modulation="per_block"` builds DiT's per-block adaLN
instead, for comparison. Text tokens (B, S, context_dim) with a mask (B, S) are embedded once
and read by cross-attention (`text_attention="cross"`) or join the video tokens in one attention
with their own weights (`"joint"`, SD3's MM-DiT); padded tokens never reach a video token.
Gates and the final linear map are zero-initialised: every block starts as the identity and the
initial prediction is zero, whatever the diffusion objective.

See docs/methods.md, 'Video DiT with 3-D RoPE and shared modulation'.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from model_zoo.layers import TimestepEmbedding, modulate, zero_module
from model_zoo.layers.attention import AttentionCore, SequenceShard, attention_heads, merge_heads
from model_zoo.pretrained import PretrainedMixin
from model_zoo.registry import register_family

MODULATIONS = 6
"""(shift, scale, gate) for the attention and for the MLP of a block."""


@dataclass(frozen=True, kw_only=True)
class VideoDiTConfig:
    in_channels: int = 16
    """Channels of the input latent (a causal video VAE's 16)."""
    out_channels: int | None = None
    """Channels of the prediction; None means in_channels."""
    patch_size: tuple[int, int, int] = (1, 2, 2)
    """3-D patch (pt, ph, pw); T, H and W must be divisible by it."""
    hidden_size: int = 1536
    """Token width D."""
    depth: int = 30
    """Number of transformer blocks."""
    num_heads: int = 12
    """Attention heads; the head width hidden_size / num_heads must be even and at least 6 (3-D RoPE)."""
    mlp_ratio: float = 4.0
    """MLP hidden width as a multiple of hidden_size."""
    mlp: Literal["gelu", "swiglu"] = "gelu"
    """GELU(tanh) MLP, or the gated SwiGLU MLP."""
    modulation: Literal["shared", "per_block"] = "shared"
    """One adaLN modulation MLP for all blocks + per-block offsets, or one per block (DiT)."""
    text_attention: Literal["cross", "joint"] = "cross"
    """Text by cross-attention in every block, or joint (MM-DiT) attention over video + text tokens."""
    context_dim: int = 4096
    """Width of the text encoder's tokens (T5-XXL: 4096)."""
    context_tokens: int = 512
    """Text tokens of `example_inputs` (FLOP and memory planning); forward takes any length."""
    rope_theta: float = 10000.0
    """Base of the rotary frequencies."""


FLAVORS: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden_size=64, depth=2, num_heads=2, context_dim=32, context_tokens=8, mlp="swiglu"),
    # Wan-1.3B-like: 30 blocks of width 1536, 12 heads of 128, MLP 8960 (ratio 5.83), T5-XXL text.
    "1.3b": dict(mlp_ratio=8960 / 1536),
    # Wan-14B-class depth at a 5B-class width: 32 blocks of width 3072, 24 heads of 128.
    "5b": dict(hidden_size=3072, depth=32, num_heads=24, mlp_ratio=4.0, mlp="swiglu"),
}


def rope_axes(head_dim: int) -> tuple[int, int, int]:
    """Channels of a head given to (t, h, w) rotary angles: h and w get 2*(d//6) each, t the rest."""
    spatial = 2 * (head_dim // 6)
    return head_dim - 2 * spatial, spatial, spatial


def rope_3d(
    grid: tuple[int, int, int],
    head_dim: int,
    device: torch.device | str,
    *,
    theta: float = 10000.0,
    offset: tuple[int, int, int] = (0, 0, 0),
) -> tuple[Tensor, Tensor]:
    """cos/sin tables (t*h*w, head_dim/2) of axial 3-D rotary embedding, t slowest.

    Token (i, j, k) rotates its channel pairs by angles i*f_t, j*f_h and k*f_w (RoFormer's
    frequencies per axis, on the axis' share of the head, `rope_axes`); `offset` shifts all positions.
    """
    angles = []
    for axis, (size, dims) in enumerate(zip(grid, rope_axes(head_dim), strict=True)):
        freqs = 1.0 / theta ** (torch.arange(dims // 2, device=device, dtype=torch.float32) / (dims // 2))
        positions = torch.arange(size, device=device, dtype=torch.float32) + offset[axis]
        shape = [1, 1, 1, dims // 2]
        shape[axis] = size
        angles.append((positions[:, None] * freqs[None]).view(shape).expand(*grid, dims // 2))
    table = torch.cat(angles, dim=-1).reshape(-1, head_dim // 2)  # (N, head_dim/2)
    return table.cos(), table.sin()


class Attention(nn.Module):
    """Multi-head attention with RMS-normalised queries and keys (QK-norm).

    Queries come from x (B, L, D), keys/values from `source` (B, S, D); without `queries` only keys
    and values are made (the last block's text tokens, whose outputs nobody reads). `attend`
    runs the attention itself, so MM-DiT can join two streams' projections. A self-attention's
    `core` (None: `attention_heads`) may be replaced from outside (sequence parallelism).
    """

    def __init__(self, dim: int, heads: int, *, queries: bool = True) -> None:
        super().__init__()
        self.heads = heads
        self.core: AttentionCore | None = None
        self.q = nn.Linear(dim, dim) if queries else None
        self.q_norm = nn.RMSNorm(dim // heads, eps=1e-6) if queries else None
        self.kv = nn.Linear(dim, 2 * dim)
        self.k_norm = nn.RMSNorm(dim // heads, eps=1e-6)

    def project(self, x: Tensor, source: Tensor) -> tuple[Tensor | None, Tensor, Tensor]:
        """Normalised q (B, h, L, d) (None without `queries`), k (B, h, S, d) and v (B, h, S, d)."""
        b, length, dim = x.shape
        q = None
        if self.q is not None:
            q = self.q_norm(self.q(x).view(b, length, self.heads, dim // self.heads)).transpose(1, 2)
        kv = self.kv(source).view(b, source.shape[1], 2, self.heads, dim // self.heads)
        k, v = kv.unbind(2)  # 2 x (B, S, h, d)
        return q, self.k_norm(k).transpose(1, 2), v.transpose(1, 2)


def attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    rotary: tuple[Tensor, Tensor] | None,
    key_mask: Tensor | None,
    core: AttentionCore | None = None,
) -> Tensor:
    """Scaled dot-product attention of (B, h, L, d) heads -> (B, L, h*d); rotary applies to the
    first N queries/keys (the video tokens), `key_mask` (B, S) hides padded keys; `core` (None:
    `attention_heads`) computes the heads."""
    mask = key_mask[:, None, None, :] if key_mask is not None else None
    return merge_heads((core or attention_heads)(q, k, v, rotary, mask))


class MLP(nn.Module):
    """Token MLP: GELU(tanh), or SwiGLU (fc1(x) * SiLU(gate(x)))."""

    def __init__(self, dim: int, ratio: float, kind: Literal["gelu", "swiglu"]) -> None:
        super().__init__()
        hidden = int(round(dim * ratio))
        self.fc1 = nn.Linear(dim, hidden)
        self.gate = nn.Linear(dim, hidden) if kind == "swiglu" else None
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        h = (
            self.fc1(x) * F.silu(self.gate(x))
            if self.gate is not None
            else F.gelu(self.fc1(x), approximate="tanh")
        )
        return self.fc2(h)  # (B, L, D)


class Modulation(nn.Module):
    """A block's adaLN parameters (B, 6, D): the shared ones plus a learned offset, or (per_block)
    its own zero-initialised Linear(SiLU(time embedding))."""

    def __init__(self, dim: int, per_block: bool) -> None:
        super().__init__()
        self.linear = zero_module(nn.Linear(dim, MODULATIONS * dim)) if per_block else None
        self.offset = None if per_block else nn.Parameter(torch.zeros(MODULATIONS, dim))

    def forward(self, cond: Tensor) -> Tensor:
        """cond: the time embedding (B, D) when per-block, else the shared modulation (B, 6, D)."""
        if self.linear is not None:
            return self.linear(F.silu(cond)).unflatten(-1, (MODULATIONS, -1))
        return cond + self.offset


class Stream(nn.Module):
    """One token stream's norms, modulation, output projection and MLP around an attention (video,
    or MM-DiT's text; without `with_mlp` the stream only feeds the attention: the last block's text)."""

    def __init__(self, config: VideoDiTConfig, *, with_mlp: bool = True) -> None:
        super().__init__()
        dim = config.hidden_size
        self.modulation = Modulation(dim, config.modulation == "per_block")
        self.norm_attn = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.out = nn.Linear(dim, dim) if with_mlp else None
        self.norm_mlp = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6) if with_mlp else None
        self.mlp = MLP(dim, config.mlp_ratio, config.mlp) if with_mlp else None


class VideoDiTBlock(nn.Module):
    """x = x + g1 * Attn(mod(LN x)); [x = x + CrossAttn(LN x, text)]; x = x + g2 * MLP(mod(LN x)).

    In joint mode the attention runs over [video; text] tokens, each stream with its own
    projections, modulation and MLP (the last block's text stream stops after the attention).
    """

    def __init__(self, config: VideoDiTConfig, *, last: bool) -> None:
        super().__init__()
        dim, heads = config.hidden_size, config.num_heads
        self.joint = config.text_attention == "joint"
        self.video = Stream(config)
        self.attn = Attention(dim, heads)
        self.text = Stream(config, with_mlp=not last) if self.joint else None
        self.text_attn = Attention(dim, heads, queries=not last) if self.joint else None
        self.norm_cross = nn.LayerNorm(dim, eps=1e-6) if not self.joint else None
        self.cross_attn = Attention(dim, heads) if not self.joint else None
        self.cross_out = zero_module(nn.Linear(dim, dim)) if not self.joint else None

    def forward(
        self,
        x: Tensor,
        text: Tensor,
        text_mask: Tensor,
        cond: tuple[Tensor, Tensor],
        rotary: tuple[Tensor, Tensor],
    ) -> tuple[Tensor, Tensor]:
        """x (B, N, D) video tokens, text (B, S, D), text_mask (B, S), cond: the (video, text)
        streams' input to `Modulation`."""
        vs, vsc, vg, ms, msc, mg = self.video.modulation(cond[0]).unbind(1)  # 6 x (B, D)
        h = modulate(self.video.norm_attn(x), vs, vsc)
        if self.text is None:
            out = attend(*self.attn.project(h, h), rotary, None, self.attn.core)  # (B, N, D)
            x = x + vg[:, None] * self.video.out(out)
            x = x + self.cross_out(
                attend(*self.cross_attn.project(self.norm_cross(x), text), None, text_mask)
            )
        else:
            x, text = self._joint(x, h, vg, text, text_mask, cond[1], rotary)
        return x + mg[:, None] * self.video.mlp(modulate(self.video.norm_mlp(x), ms, msc)), text

    def _joint(
        self,
        x: Tensor,
        h: Tensor,
        gate: Tensor,
        text: Tensor,
        text_mask: Tensor,
        cond: Tensor,
        rotary: tuple[Tensor, Tensor],
    ) -> tuple[Tensor, Tensor]:
        ts, tsc, tg, tms, tmsc, tmg = self.text.modulation(cond).unbind(1)  # 6 x (B, D)
        c = modulate(self.text.norm_attn(text), ts, tsc)
        qv, kv, vv = self.attn.project(h, h)
        qt, kt, vt = self.text_attn.project(c, c)
        keep = torch.cat([text_mask.new_ones(x.shape[:2]), text_mask], dim=1)  # (B, N+S)
        queries = qv if qt is None else torch.cat([qv, qt], 2)
        out = attend(queries, torch.cat([kv, kt], 2), torch.cat([vv, vt], 2), rotary, keep)  # (B, N[+S], D)
        x = x + gate[:, None] * self.video.out(out[:, : x.shape[1]])
        if self.text.out is not None:
            text = text + tg[:, None] * self.text.out(out[:, x.shape[1] :])
            text = text + tmg[:, None] * self.text.mlp(modulate(self.text.norm_mlp(text), tms, tmsc))
        return x, text


class FinalLayer(nn.Module):
    """LN modulated by (learned offset + time embedding), then a zero-initialised linear map to patches."""

    def __init__(self, dim: int, patch_values: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.offset = nn.Parameter(torch.zeros(2, dim))
        self.linear = zero_module(nn.Linear(dim, patch_values))

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        shift, scale = (self.offset + emb[:, None]).unbind(1)  # 2 x (B, D)
        return self.linear(modulate(self.norm(x), shift, scale))  # (B, N, pt*ph*pw*C_out)


class SharedModulation(nn.Module):
    """The one adaLN MLP of all blocks: SiLU -> Linear(D, streams*6*D), zero-initialised."""

    def __init__(self, dim: int, streams: int) -> None:
        super().__init__()
        self.linear = zero_module(nn.Linear(dim, streams * MODULATIONS * dim))

    def forward(self, emb: Tensor) -> Tensor:
        return self.linear(F.silu(emb)).unflatten(-1, (-1, MODULATIONS, emb.shape[-1]))  # (B, streams, 6, D)


@register_family("video_dit", VideoDiTConfig, FLAVORS)
class VideoDiT(PretrainedMixin, nn.Module):
    """Video DiT with 3-D RoPE, QK-norm and shared adaLN (see the module docstring)."""

    def __init__(self, config: VideoDiTConfig) -> None:
        super().__init__()
        head_dim = config.hidden_size // config.num_heads
        if config.hidden_size % config.num_heads or min(rope_axes(head_dim)) < 2 or head_dim % 2:
            raise ValueError(
                f"video_dit: hidden_size {config.hidden_size} / num_heads {config.num_heads} must give an "
                "even head width of at least 6 (3-D rotary embedding)"
            )
        self.config = config
        pt, ph, pw = config.patch_size
        dim = config.hidden_size
        self.out_channels = config.out_channels or config.in_channels
        self.patch_embed = nn.Linear(pt * ph * pw * config.in_channels, dim)
        self.text_embed = nn.Sequential(
            nn.Linear(config.context_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim)
        )
        self.time_embed = TimestepEmbedding(dim)
        streams = 2 if config.text_attention == "joint" else 1
        self.shared = SharedModulation(dim, streams) if config.modulation == "shared" else None
        self.blocks = nn.ModuleList(
            [VideoDiTBlock(config, last=i == config.depth - 1) for i in range(config.depth)]
        )
        self.final = FinalLayer(dim, pt * ph * pw * self.out_channels)
        # Set from outside to run the blocks on a part of the token sequence (sequence parallelism).
        self.sequence_shard: SequenceShard | None = None

    def forward(self, x: Tensor, t: Tensor, *, context: Tensor, context_mask: Tensor | None = None) -> Tensor:
        """x (B, C, T, H, W), t (B,), context (B, S, context_dim), context_mask (B, S) bool
        (True = a real token; None = all real) -> (B, C_out, T, H, W)."""
        pt, ph, pw = self.config.patch_size
        _, _, t_len, h, w = x.shape
        grid = (t_len // pt, h // ph, w // pw)
        if grid[0] * pt != t_len or grid[1] * ph != h or grid[2] * pw != w:
            raise ValueError(
                f"video_dit: input (T, H, W) = {(t_len, h, w)} is not divisible by patch_size {(pt, ph, pw)}"
            )
        tokens = self.patch_embed(
            rearrange(x, "b c (t pt) (h ph) (w pw) -> b (t h w) (pt ph pw c)", pt=pt, ph=ph, pw=pw)
        )
        text = self.text_embed(context)  # (B, S, D)
        mask = (
            context_mask.bool()
            if context_mask is not None
            else torch.ones(context.shape[:2], dtype=torch.bool, device=x.device)
        )
        emb = self.time_embed(t).to(tokens.dtype)  # (B, D)
        rotary = rope_3d(
            grid, self.config.hidden_size // self.config.num_heads, x.device, theta=self.config.rope_theta
        )
        # Per stream (video, text): the shared modulation (B, 6, D), or the time embedding (B, D).
        cond = self.shared(emb).unbind(1) if self.shared is not None else (emb,)
        cond = (cond[0], cond[-1])
        shard = self.sequence_shard
        if shard is not None:
            tokens = shard.shard(tokens)  # (B, N_local, D); rotary keeps the global positions
        for block in self.blocks:
            tokens, text = block(tokens, text, mask, cond, rotary)
        patches = self.final(tokens, emb)  # (B, N, pt*ph*pw*C_out)
        if shard is not None:
            patches = shard.gather(patches)
        return rearrange(
            patches,
            "b (t h w) (pt ph pw c) -> b c (t pt) (h ph) (w pw)",
            t=grid[0],
            h=grid[1],
            w=grid[2],
            pt=pt,
            ph=ph,
            pw=pw,
        )  # (B, C_out, T, H, W)

    def example_inputs(self, x: Tensor) -> dict[str, Tensor]:
        """Forward keyword arguments for x: timesteps, `context_tokens` text tokens, a mask that pads
        the last quarter of every sample but the first."""
        b = x.shape[0]
        length = self.config.context_tokens
        mask = torch.ones(b, length, dtype=torch.bool, device=x.device)
        mask[1:, length - length // 4 :] = False
        return {
            "t": torch.linspace(50, 950, b, device=x.device).long(),
            "context": torch.randn(b, length, self.config.context_dim, device=x.device),
            "context_mask": mask,
        }

    def example_input(self, batch_size: int = 2, num_frames: int = 4, size: int = 16) -> Tensor:
        """A random latent clip (B, C, T, size, size) on the model's device."""
        device = self.patch_embed.weight.device
        return torch.randn(batch_size, self.config.in_channels, num_frames, size, size, device=device)

    def checkpoint_modules(self) -> list[nn.Module]:
        """The transformer blocks (the trainer may wrap them with activation checkpointing)."""
        return list(self.blocks)
