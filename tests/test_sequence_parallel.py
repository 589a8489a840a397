"""Ulysses sequence parallelism: the DiT families on 2 real gloo ranks give the single-device
outputs and gradients (self- and cross-attention, 3-D RoPE, a token count not divisible by 2);
clear errors for what it does not support."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from model_zoo import build_model
from model_zoo.layers.sequence_parallel import Collectives, apply_ulysses

CASES = {
    # family/flavor -> (input (B, C, T, H, W) shape, tokens): 3 * 3 * 3 = 27 tokens, odd.
    "dit/tiny": ((2, 4, 3, 6, 6), 27),
    "video_dit/tiny": ((2, 16, 3, 6, 6), 27),
}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _inputs(model: torch.nn.Module, shape: tuple[int, ...]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    torch.manual_seed(1)
    x = torch.randn(*shape)
    return x, model.example_inputs(x)


def _model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(*name.split("/"))
    # Zero-initialised gates and output layers would hide the attention from the output: perturb all.
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    return model


def _forward_backward(model: torch.nn.Module, x: torch.Tensor, kwargs: dict[str, torch.Tensor]):
    model.zero_grad()
    out = model(x, **kwargs)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _rank(rank: int, port: int, results: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    from trainer.sequence_parallel import group_collectives

    try:
        for name, (shape, _) in CASES.items():
            model = _model(name)
            x, kwargs = _inputs(model, shape)
            ref_out, ref_grads = _forward_backward(model, x, kwargs)
            apply_ulysses(model, group_collectives(dist.group.WORLD, rank, 2))
            out, grads = _forward_backward(model, x, kwargs)
            for grad in grads.values():  # each rank holds its tokens' part: the sum is the gradient
                dist.all_reduce(grad)
            out_err = (out - ref_out).abs().max().item()
            grad_err = max((grads[n] - g).abs().max().item() / (g.abs().max().item() + 1e-12) for n, g in ref_grads.items())
            missing = sorted(set(ref_grads) - set(grads))
            if rank == 0:
                results[name] = (out_err, grad_err, missing, ref_out.abs().max().item())
    finally:
        dist.destroy_process_group()


@pytest.mark.multirank
@pytest.mark.slow  # two spawned interpreters: ~20 s alone, longer on a loaded machine
@pytest.mark.extended  # the 2-rank training and sampling equality tests cover the same path end to end
def test_ulysses_equals_single_device_on_two_ranks() -> None:
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_rank, args=(_free_port(), results), nprocs=2, join=True)
        results = dict(results)
    assert set(results) == set(CASES)
    for name, (out_err, grad_err, missing, scale) in results.items():
        assert scale > 1e-3, name  # a non-trivial output
        assert not missing, (name, missing)
        assert out_err < 1e-5, (name, out_err)
        assert grad_err < 1e-5, (name, grad_err)


def _fake(size: int) -> Collectives:
    return Collectives(rank=0, size=size, all_to_all=lambda x: x, all_gather=lambda x: x[None])


def test_heads_not_divisible_is_a_clear_error() -> None:
    model = build_model("video_dit", "tiny")  # 2 heads
    with pytest.raises(ValueError, match="2 attention heads, not divisible by the SP degree 3"):
        apply_ulysses(model, _fake(3))


def test_joint_text_attention_and_unet_are_refused() -> None:
    with pytest.raises(ValueError, match="text_attention=joint"):
        apply_ulysses(build_model("video_dit", "tiny", text_attention="joint"), _fake(2))
    with pytest.raises(ValueError, match="not a DiT"):
        apply_ulysses(build_model("unet3d", "tiny"), _fake(2))


def test_one_rank_group_is_the_identity() -> None:
    """SP degree 1 through the same code path (pad, all-to-all, gather) changes no bit."""
    for name, (shape, _) in CASES.items():
        model = _model(name)
        x, kwargs = _inputs(model, shape)
        with torch.no_grad():
            reference = model(x, **kwargs)
            apply_ulysses(model, _fake(1))
            assert torch.equal(model(x, **kwargs), reference), name


TRAIN_CASES = {
    # dit (self- + cross-attention): 5 frames at 24x40 -> latents 3x6x10 -> 3*3*5 = 45 tokens (odd:
    # padded), ZeRO-2 with activation checkpointing.
    "dit-odd-tokens-zero2-ckpt": ("configs/tiny/dit.yaml", ["data.frames=5", "data.height=24", "data.width=40",
                                                            "train.zero_stage=2", "train.act_ckpt=true"]),
    # video_dit (3-D RoPE, QK-norm, cross-attention over masked text): 5 frames at 48x48 -> 2x3x3 = 18 tokens, ZeRO-3.
    "video_dit-rope-zero3": ("configs/tiny/video_dit.yaml", ["data.height=48", "data.width=48", "train.zero_stage=3"]),
}


def _train(run_dir, config: str, shards: str, *extra: str, nproc: int) -> None:
    from tests.conftest import run_lvd

    result = run_lvd(
        "train", "--nproc", str(nproc), "--config", config, f"data.shards={shards}", f"run.dir={run_dir}",
        "train.micro_batch_size=1", "train.steps=3", "train.warmup_steps=0", "train.checkpoint_every=0",
        "run.log_every=1", "run.progress=quiet", *extra, env={"OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.mark.multirank
@pytest.mark.parametrize("case", list(TRAIN_CASES))
def test_training_sp2_on_two_ranks_equals_one_rank(case, tmp_path, video_shards) -> None:
    """`lvd train --nproc 2 train.sp_size=2` (both ranks read the same clip, each runs half the tokens)
    gives the losses, gradient norms and weights of one rank training on that clip alone, step by step."""
    config, extra = TRAIN_CASES[case]
    assert_sp_training_equals_one_rank(tmp_path, config, video_shards, extra, ["train.sp_size=2"])


def assert_sp_training_equals_one_rank(tmp_path: Path, config: str, video_shards: str, extra: list[str], layout: list[str]) -> None:
    """3 steps of `config` + `extra` on 1 rank and on 2 ranks with `layout` (the SP keys): loss and
    gradient norm at each step to 1e-5 relative, and the final weights to 1e-5."""
    from trainer.engine import consolidated_state_dict
    from trainer.monitor import read_metrics

    _train(tmp_path / "sp1", config, video_shards, *extra, nproc=1)
    _train(tmp_path / "sp2", config, video_shards, *extra, *layout, nproc=2)
    ref, ours = read_metrics(tmp_path / "sp1"), read_metrics(tmp_path / "sp2")
    assert sorted(ref) == sorted(ours) == [1, 2, 3]
    for step in ref:
        for key in ("loss", "grad_norm"):
            assert ours[step][key] == pytest.approx(ref[step][key], rel=1e-5, abs=1e-7), (step, key)
    tag = "checkpoints/step_00000003"
    theirs, mine = (consolidated_state_dict(tmp_path / run / tag, "model") for run in ("sp1", "sp2"))
    assert mine.keys() == theirs.keys()
    worst = max((mine[name] - theirs[name]).abs().max().item() for name in mine)
    assert worst < 1e-5, worst


@pytest.mark.multirank
def test_sampling_sp2_on_two_ranks_equals_one_rank(tmp_path) -> None:
    """`lvd sample --nproc 2 --sp 2` with a DiT: the follower rank runs every denoising forward on
    half the tokens with the leader; the latents match one rank's to 1e-5 (fp32: the token-wise
    matmuls run on another number of rows, which may round differently) and the mp4 is the same."""
    import subprocess
    import sys

    from sampler.cli import main
    from sampler.tiny import tiny_pipeline

    pipe = tiny_pipeline(tmp_path / "pipe", "diffusion", seed=0, denoiser="dit")
    # 24x40 px -> latents 6x10 -> 3x5 patches: 15 tokens a frame, 8 frames: 120; 3 frames: 45 (odd).
    argv = ["--model", str(pipe), "--strategy", "ddim", "--frames", "5", "--prompt", "a red car", "--steps", "3",
            "--height", "24", "--width", "40", "--device", "cpu", "--no-progress"]
    assert main([*argv, "--out", str(tmp_path / "one" / "v.mp4")]) == 0
    result = subprocess.run(
        [sys.executable, "-m", "sampler.cli", *argv, "--nproc", "2", "--sp", "2", "--out", str(tmp_path / "two" / "v.mp4")],
        cwd=Path(__file__).resolve().parent.parent, env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert_parts_match(tmp_path / "one" / "v.parts", tmp_path / "two" / "v.parts")
    report = json.loads((tmp_path / "two" / "v.json").read_text())
    assert report["world_size"] == 1  # the strategy saw one rank: the SP group's leader
    assert (tmp_path / "one" / "v.mp4").read_bytes() == (tmp_path / "two" / "v.mp4").read_bytes()


def _child_of_rank(launcher: int, rank: int) -> int:
    """The pid of the launcher's child that runs `rank` (Linux /proc)."""
    for child in Path(f"/proc/{launcher}/task/{launcher}/children").read_text().split():
        environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in environ:
            return int(child)
    raise AssertionError(f"no child of {launcher} runs rank {rank}")


@pytest.mark.multirank
@pytest.mark.parametrize("fault", ["kill", "stop"])
def test_sampling_with_a_dead_or_hung_sp_follower_stops(fault, tmp_path) -> None:
    """`lvd sample --nproc 2 --sp 2`: once the leader has started the video, the follower is killed
    (SIGKILL) or hangs (SIGSTOP). The leader, waiting for it in the next all-to-all, fails at once on
    the closed connection, or after LVD_COLLECTIVE_TIMEOUT=20 s (the SP group's timeout; torch gives a
    new group 30 minutes otherwise); the launcher stops the rest and names the ranks; no mp4."""
    import signal
    import subprocess
    import sys
    import time

    from sampler.tiny import tiny_pipeline

    pipe = tiny_pipeline(tmp_path / "pipe", "diffusion", seed=0, denoiser="dit")
    video = tmp_path / "two" / "v.mp4"
    argv = ["--model", str(pipe), "--strategy", "ddim", "--frames", "5", "--prompt", "a red car", "--steps", "500",
            "--height", "24", "--width", "40", "--device", "cpu", "--no-progress", "--nproc", "2", "--sp", "2", "--out", str(video)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "sampler.cli", *argv], cwd=Path(__file__).resolve().parent.parent,
        env={**os.environ, "OMP_NUM_THREADS": "1", "LVD_COLLECTIVE_TIMEOUT": "20"},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 300
        while not (video.with_suffix(".parts") / "params.json").is_file():  # the leader has begun the video
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.05)
        os.kill(_child_of_rank(proc.pid, 1), signal.SIGKILL if fault == "kill" else signal.SIGSTOP)
        hit = time.monotonic()
        _, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:  # the launcher and its ranks
            os.killpg(proc.pid, signal.SIGKILL)
    elapsed = time.monotonic() - hit
    assert proc.returncode != 0, err[-3000:]
    if fault == "kill":
        assert "lvd: rank 1 of 2 was killed by SIGKILL" in err, err[-3000:]
        assert elapsed < 20
    else:
        assert "lvd: rank 0 of 2 exited with code 1; stopping rank(s) 1" in err, err[-3000:]
        assert 20 < elapsed < 90
    assert not video.exists()


def test_plan_measures_per_rank_activations_and_the_all_to_all() -> None:
    """`lvd plan` with train.sp_size=2: per-rank activations about half of SP=1's (the sequence is
    split), the all-to-all volume counted; the FLOPs of a sample do not change."""
    from common.config import load_config
    from trainer.config import TrainJobConfig
    from trainer.plan import measure

    repo = Path(__file__).resolve().parent.parent
    counts = {
        sp: measure(
            load_config(TrainJobConfig, repo / "configs/tiny/video_dit.yaml",
                        ["data.shards=unused", "data.height=256", "data.width=256", f"train.sp_size={sp}"]),
            dtype=torch.float32,
        )
        for sp in (1, 2)
    }
    ratio = counts[2].activation_bytes_per_sample / counts[1].activation_bytes_per_sample
    assert 0.45 < ratio < 0.6, ratio
    assert counts[1].all_to_all_elements_per_sample == 0 and counts[2].all_to_all_elements_per_sample > 0
    assert counts[2].train_flops_per_sample == counts[1].train_flops_per_sample


def _sp_run_with_fault(run_dir: Path, shards: str, **env: str):
    """A 4-step `lvd train --nproc 2 train.sp_size=2` run under `env` (an LVD_FAULT); the result
    and its wall time."""
    import time

    from tests.conftest import run_lvd

    config, extra = TRAIN_CASES["dit-odd-tokens-zero2-ckpt"]
    started = time.monotonic()
    result = run_lvd(
        "train", "--nproc", "2", "--config", config, f"data.shards={shards}", f"run.dir={run_dir}",
        "train.micro_batch_size=1", "train.steps=4", "train.warmup_steps=0", "train.checkpoint_every=0",
        "run.log_every=1", "run.progress=quiet", "train.sp_size=2", *extra,
        env={"OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", **env}, timeout=600,
    )  # fmt: skip
    return result, time.monotonic() - started


@pytest.mark.multirank
@pytest.mark.extended  # the launcher's part is the sampling test's and test_cli's; this is the training run's
def test_a_killed_sp_rank_stops_its_group_naming_it(tmp_path, video_shards) -> None:
    """Rank 1 of an SP group dies (SIGKILL) as step 2 begins, while rank 0 waits for it in the first
    all-to-all of that step: `lvd train --nproc` stops rank 0 too and exits non-zero within seconds
    (not the process group's collective timeout), naming the dead rank."""
    from trainer.monitor import read_metrics

    result, elapsed = _sp_run_with_fault(tmp_path / "run", video_shards, LVD_FAULT="kill_rank:1:2")
    assert result.returncode != 0, result.stderr[-3000:]
    assert "lvd: rank 1 of 2 was killed by SIGKILL" in result.stderr, result.stderr[-3000:]
    assert sorted(read_metrics(tmp_path / "run")) == [1]  # step 1 done, step 2 never finished
    assert elapsed < 240, elapsed


@pytest.mark.multirank
def test_a_hung_sp_rank_fails_its_group_after_the_collective_timeout(tmp_path, video_shards) -> None:
    """Rank 1 of an SP group hangs (SIGSTOP) as step 2 begins: no process exits, so only the timeout
    of the SP group's all-to-all ends rank 0's wait. With LVD_COLLECTIVE_TIMEOUT=20 rank 0 fails
    after 20 s (the SP group was built with that timeout, not torch's 30 minutes for a new group),
    and the launcher stops the hung rank, naming both."""
    from trainer.monitor import read_metrics

    timeout = 20
    result, elapsed = _sp_run_with_fault(tmp_path / "run", video_shards, LVD_FAULT="stop_rank:1:2", LVD_COLLECTIVE_TIMEOUT=str(timeout))
    assert result.returncode != 0, result.stderr[-3000:]
    assert "lvd: rank 0 of 2 exited with code 1; stopping rank(s) 1" in result.stderr, result.stderr[-3000:]
    assert sorted(read_metrics(tmp_path / "run")) == [1]
    assert timeout < elapsed < 300, elapsed


def assert_parts_match(one_dir: Path, two_dir: Path) -> None:
    """The saved latents of two `lvd sample` runs: the same units, every tensor within 1e-5."""
    from safetensors.torch import load_file

    one, two = (sorted(folder.glob("*.safetensors")) for folder in (one_dir, two_dir))
    assert [p.name for p in one] == [p.name for p in two] and one
    for a, b in zip(one, two, strict=True):
        left, right = load_file(str(a)), load_file(str(b))
        for key in left:
            assert (left[key].float() - right[key].float()).abs().max().item() < 1e-5, (a.name, key)
