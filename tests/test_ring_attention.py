"""Ring attention and the Ulysses x ring hybrid: the online-softmax fold is exact (fully masked
blocks included), training and sampling with a 2-rank ring equal one rank, a 2 x 2 hybrid on 4
real gloo ranks gives the single-device outputs and gradients, clear errors."""

from __future__ import annotations

import datetime
import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from model_zoo import build_model
from model_zoo.layers.sequence_parallel import Collectives, apply_ring, ring_block, usp_groups
from tests.test_sequence_parallel import (
    TRAIN_CASES,
    _forward_backward,
    _free_port,
    assert_parts_match,
    assert_sp_training_equals_one_rank,
)

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("fused", [True, False], ids=["cpu-flash-kernels", "plain-matmuls"])
def test_ring_block_fold_is_exact_with_fully_masked_blocks(fused, monkeypatch) -> None:
    """Keys folded block by block (a fully masked block first, one in the middle, one partly
    masked) give F.scaled_dot_product_attention's output and gradients, with no NaN; through the
    CPU flash kernels and through the plain path other devices take."""
    import model_zoo.layers.sequence_parallel as sp

    monkeypatch.setattr(sp, "FUSED_DEVICES", ("cpu",) if fused else ())
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 8, dtype=torch.float64, requires_grad=True),
               *(torch.randn(2, 3, 16, 8, dtype=torch.float64, requires_grad=True) for _ in range(2)))
    valid = torch.ones(16, dtype=torch.bool)
    valid[4:8] = valid[13:] = False  # block 1 fully masked, block 3 partly
    reference = F.scaled_dot_product_attention(q, k, v, attn_mask=valid[None, None, None])
    state = (torch.full((2, 3, 5, 1), float("-inf"), dtype=torch.float64),
             torch.zeros(2, 3, 5, 1, dtype=torch.float64), torch.zeros(2, 3, 5, 8, dtype=torch.float64))
    for part in (1, 0, 3, 2):  # a fully masked block before any real key
        keys = slice(4 * part, 4 * part + 4)
        state = ring_block(q, k[:, :, keys], v[:, :, keys], valid[keys], state)
    out = state[2] / state[1]
    assert (out - reference).abs().max().item() < 1e-12
    weight = torch.randn_like(out)
    ours = torch.autograd.grad((out * weight).sum(), (q, k, v))
    theirs = torch.autograd.grad((reference * weight).sum(), (q, k, v))
    for mine, ref in zip(ours, theirs, strict=True):
        assert not mine.isnan().any()
        assert (mine - ref).abs().max().item() < 1e-12
    assert ours[1][:, :, 4:8].abs().max() == 0 and ours[1][:, :, 13:].abs().max() == 0  # masked keys: no gradient


def test_usp_layout_makes_ulysses_groups_contiguous() -> None:
    heads, rings = usp_groups(8, 2)
    assert heads == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert rings == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert usp_groups(2, 2) == ([[0], [1]], [[0, 1]])
    with pytest.raises(ValueError, match="ring degree 3 does not divide the SP degree 4"):
        usp_groups(4, 3)


def _fake(rank: int, size: int) -> Collectives:
    return Collectives(rank=rank, size=size, all_to_all=lambda x: x, all_gather=lambda x: x[None],
                       ring_shift=lambda x, _: x)


def test_heads_not_divisible_by_the_ulysses_degree_name_sp_ring() -> None:
    model = build_model("dit", "tiny", num_heads=2, hidden_size=48)
    with pytest.raises(ValueError, match=r"2 attention heads, not divisible by the Ulysses degree 3 = SP degree 6 / sp_ring 2; raise train.sp_ring"):
        apply_ring(model, _fake(0, 6), _fake(0, 3), _fake(0, 2))
    apply_ring(build_model("dit", "tiny", num_heads=3, hidden_size=48), _fake(0, 2), _fake(0, 1), _fake(0, 2))


def test_sp_ring_must_divide_sp_size() -> None:
    from common.config import ConfigError, load_config
    from sampler.config import SampleConfig
    from trainer.config import TrainJobConfig

    with pytest.raises(ConfigError, match="train.sp_ring: must be >= 1 and divide sp_size 2, got 3"):
        load_config(TrainJobConfig, REPO / "configs/tiny/dit.yaml", ["data.shards=x", "train.sp_size=2", "train.sp_ring=3"])
    with pytest.raises(ValueError, match="--sp-ring 3 must be >= 1 and divide --sp 2"):
        SampleConfig(model="m", prompts=("a",), out="o.mp4", nproc=2, sp=2, sp_ring=3)


RING_TRAIN_CASES = {
    # 45 tokens: padded to 46, the last key of rank 1 is masked.
    "dit-odd-tokens-zero2-ckpt": TRAIN_CASES["dit-odd-tokens-zero2-ckpt"],
    # 3-D RoPE over two ranks' chunks, 3 heads (Ulysses over 2 ranks cannot split them).
    "video_dit-rope-3heads-zero3": (TRAIN_CASES["video_dit-rope-zero3"][0],
                                    [*TRAIN_CASES["video_dit-rope-zero3"][1], "model.overrides.num_heads=3",
                                     "model.overrides.hidden_size=48"]),
}


@pytest.mark.multirank
@pytest.mark.parametrize(
    "case",
    [  # ~30 s each alone on 2 cores; the dit case (padding) also runs in the 4-rank test: slow lane
        pytest.param(name, marks=[pytest.mark.slow] if name.startswith("dit") else [])
        for name in RING_TRAIN_CASES
    ],
)
def test_training_ring2_on_two_ranks_equals_one_rank(case, tmp_path, video_shards) -> None:
    """`lvd train --nproc 2 train.sp_size=2 train.sp_ring=2` (keys and values pass between the
    ranks) gives one rank's losses, gradient norms (each step, 1e-5 relative) and final weights."""

    config, extra = RING_TRAIN_CASES[case]
    assert_sp_training_equals_one_rank(tmp_path, config, video_shards, extra, ["train.sp_size=2", "train.sp_ring=2"])


@pytest.mark.multirank
@pytest.mark.parametrize(
    "nproc, sp, ring",
    [(2, 2, 2), pytest.param(4, 4, 2, marks=pytest.mark.slow)],  # a pure ring; the 2 x 2 hybrid end to end
    ids=["ring2", "hybrid-2x2"],
)
def test_sampling_with_a_ring_equals_one_rank(nproc, sp, ring, tmp_path) -> None:
    """`lvd sample --nproc 2 --sp 2 --sp-ring 2` (and `--nproc 4 --sp 4 --sp-ring 2`: Ulysses
    over 2 ranks, a ring of 2) with a DiT on 45 tokens (padded): the latents match one rank's to
    1e-5, as the Ulysses sampling test."""

    from sampler.cli import main
    from sampler.tiny import tiny_pipeline

    pipe = tiny_pipeline(tmp_path / "pipe", "diffusion", seed=0, denoiser="dit")
    argv = ["--model", str(pipe), "--strategy", "ddim", "--frames", "5", "--prompt", "a red car", "--steps", "3",
            "--height", "24", "--width", "40", "--device", "cpu", "--no-progress"]
    assert main([*argv, "--out", str(tmp_path / "one" / "v.mp4")]) == 0
    result = subprocess.run(
        [sys.executable, "-m", "sampler.cli", *argv, "--nproc", str(nproc), "--sp", str(sp), "--sp-ring", str(ring),
         "--out", str(tmp_path / "two" / "v.mp4")],
        cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert_parts_match(tmp_path / "one" / "v.parts", tmp_path / "two" / "v.parts")


HYBRID_CASES = {
    # (family, overrides, input (B, C, T, H, W)): 27 tokens over 4 ranks (padded to 28).
    "dit": ("dit", dict(hidden_size=32, depth=2, num_heads=2, context_dim=16, cond_channels=0), (1, 4, 3, 6, 6)),
    "video_dit": ("video_dit", dict(hidden_size=32, depth=2, num_heads=2, context_dim=16, context_tokens=4),
                  (2, 16, 3, 6, 6)),
}


def _hybrid_rank(rank: int, port: int, results: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=4)
    from trainer.sequence_parallel import SequenceParallelGroups

    try:
        layouts = {ring: SequenceParallelGroups.build(rank, 4, sp_size=4, sp_ring=ring, timeout=datetime.timedelta(minutes=5)) for ring in (2, 4)}
        for (name, (family, overrides, shape)), ring in itertools.product(HYBRID_CASES.items(), layouts):
            groups = layouts[ring]
            torch.manual_seed(0)
            model = build_model(family, "tiny", **overrides)
            with torch.no_grad():  # zero-initialised gates would hide the attention
                for param in model.parameters():
                    param.add_(0.05 * torch.randn_like(param))
            torch.manual_seed(1)
            x = torch.randn(*shape)
            kwargs = model.example_inputs(x)
            runs = []
            for sharded in (False, True):
                if sharded:
                    groups.apply(model)
                x_in = x.clone().requires_grad_(True)
                out, grads = _forward_backward(model, x_in, kwargs)
                grads["input"] = x_in.grad
                runs.append((out, grads))
            (ref_out, ref_grads), (out, grads) = runs
            for grad in grads.values():  # each rank holds its tokens' part: the sum is the gradient
                dist.all_reduce(grad)
            out_err = (out - ref_out).abs().max().item() / ref_out.abs().max().item()
            grad_err = max((grads[n] - g).abs().max().item() / (g.abs().max().item() + 1e-12) for n, g in ref_grads.items())
            results[(name, ring, rank)] = (out_err, grad_err, sorted(set(ref_grads) ^ set(grads)))
    finally:
        dist.destroy_process_group()


@pytest.mark.multirank  # four spawned interpreters: ~20 s alone on 2 cores
def test_hybrid_2x2_and_ring_4_on_four_ranks_equal_single_device() -> None:
    """SP degree 4 = Ulysses 2 x ring 2, and a ring of 4 (keys pass 3 hops: the gradients must go
    back the opposite way), on real gloo ranks with the trainer's groups: forward output, input
    gradient and parameter gradients (summed over the group) match the unsharded model."""
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_hybrid_rank, args=(_free_port(), results), nprocs=4, join=True)
        results = dict(results)
    assert set(results) == {(name, ring, rank) for name in HYBRID_CASES for ring in (2, 4) for rank in range(4)}
    for key, (out_err, grad_err, missing) in results.items():
        assert not missing, (key, missing)
        assert out_err < 1e-5, (key, out_err)
        assert grad_err < 1e-5, (key, grad_err)


def test_plan_measures_the_ring_and_counts_its_traffic() -> None:
    """`lvd plan` with train.sp_ring: the shape-only ring runs on meta; per-rank activations are
    below SP=1's (the autograd ring keeps the visiting K/V blocks and their scores, so more than
    Ulysses'); the ring's K/V shifts are counted (2 * (R-1) of B·N/P·D a layer), the hybrid's
    head all-to-alls too; a sample's FLOPs do not change."""
    from common.config import load_config
    from trainer.config import TrainJobConfig
    from trainer.plan import measure

    def counts(*extra: str):
        return measure(load_config(TrainJobConfig, REPO / "configs/tiny/video_dit.yaml",
                                   ["data.shards=unused", "data.height=256", "data.width=256", *extra]), dtype=torch.float32)

    one, ulysses = counts(), counts("train.sp_size=2")
    ring, hybrid = counts("train.sp_size=2", "train.sp_ring=2"), counts("train.sp_size=4", "train.sp_ring=2")
    per_layer = one.tokens_per_sample // 2 * 64  # B·N/P·D, width 64
    assert ring.ring_elements_per_sample == ring.all_to_all_elements_per_sample == 2 * 2 * per_layer  # 2 layers
    assert hybrid.ring_elements_per_sample == 2 * 2 * per_layer / 2
    assert hybrid.all_to_all_elements_per_sample == hybrid.ring_elements_per_sample + 2 * 4 * per_layer / 2 / 2
    assert ulysses.ring_elements_per_sample == 0
    assert ulysses.activation_bytes_per_sample < ring.activation_bytes_per_sample < one.activation_bytes_per_sample
    assert hybrid.activation_bytes_per_sample < ring.activation_bytes_per_sample
    assert ring.train_flops_per_sample == hybrid.train_flops_per_sample == one.train_flops_per_sample
