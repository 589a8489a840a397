"""The `train.lora` section: low-rank adapters on the trained denoiser (docs/methods.md, 'LoRA')."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    "unet3d": (r".*\.(self_attn|cross_attn|attn)\.(qkv|q|kv|out)",),
    "dit": (r"blocks\.\d+\.(attn|cross_attn)\.(qkv|q|kv|out)",),
}
"""Per family, the module-name patterns adapted when `train.lora.targets` is empty: the attention
projections (the unet3d's spatial self-/cross-attention and its temporal attention)."""


@dataclass(frozen=True, kw_only=True)
class LoraConfig:
    rank: int = 0
    """Rank r of each adapter (0: no LoRA, the whole network trains)."""
    alpha: float = 0.0
    """Scale numerator: the adapter adds (alpha / rank) * B A to a weight (0: alpha = rank)."""
    targets: tuple[str, ...] = ()
    """Regular expressions matched against whole module names of the trained network (empty: the
    family's attention projections, `DEFAULT_TARGETS`); e.g. `['.*\\.spatial\\..*\\.(qkv|q|kv|out)']`
    leaves the unet3d's temporal attention out."""

    def __post_init__(self) -> None:
        if self.rank < 0:
            raise ValueError(f"rank: must be >= 0, got {self.rank}")
        if self.alpha < 0:
            raise ValueError(f"alpha: must be >= 0, got {self.alpha}")

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def scale(self) -> float:
        """alpha / rank, the factor of B A."""
        return (self.alpha or self.rank) / self.rank
