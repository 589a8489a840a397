"""`lvd plan` on the video_dit scale configs: causal latent frames, real token counts, attention
counted as a fused kernel saves it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from common.config import load_config
from trainer.config import TrainJobConfig
from trainer.plan import activation_bytes, make_plan, measure

REPO = Path(__file__).resolve().parent.parent


class _Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = x * self.scale
        return F.scaled_dot_product_attention(q, q, q)


def test_planner_counts_attention_as_a_fused_kernel_saves_it() -> None:
    heads, length, dim = 4, 4096, 64
    saved = activation_bytes(_Attention(), (1, heads, length, dim), checkpointed=False, dtype=torch.float32)
    # x (for the scale's gradient), q (= k = v), the output and one log-sum-exp per row: no
    # (L x L) score matrix (PyTorch's reference path saves two of them).
    assert saved == 4 * (3 * heads * length * dim + heads * length)


@pytest.mark.parametrize(
    ("name", "nodes", "tokens", "min_params"),
    [("video-dit-1.3b.yaml", 8, 21 * 30 * 52, 1.3e9), ("video-dit-5b.yaml", 16, 13 * 45 * 80, 5.0e9)],
)
def test_plan_of_the_video_dit_scale_configs(name: str, nodes: int, tokens: int, min_params: float) -> None:
    cfg = load_config(TrainJobConfig, REPO / "configs" / "scale" / name)
    counts = measure(cfg, dtype=torch.bfloat16)
    assert counts.tokens_per_sample == tokens and 10_000 <= tokens <= 75_000
    assert counts.trainable_params >= min_params
    assert counts.activation_bytes_per_sample_ckpt * 8 < counts.activation_bytes_per_sample
    plan = make_plan(
        cfg, counts, config_name=name, gpu="h100", nodes=nodes, gpus_per_node=8, zero_stage=cfg.train.zero_stage,
        act_ckpt=True, mfu=0.4, samples=10_000_000,
    )  # fmt: skip
    assert plan.fits and plan.max_micro_batch >= cfg.train.micro_batch_size
    print(
        f"{name}: {counts.trainable_params / 1e9:.3f}e9 parameters, {tokens} tokens, activations per clip "
        f"{counts.activation_bytes_per_sample / 2**30:.1f} GB without / "
        f"{counts.activation_bytes_per_sample_ckpt / 2**30:.2f} GB with checkpointing"
    )
