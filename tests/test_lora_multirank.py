"""LoRA under real 2-rank DeepSpeed runs (gloo, `lvd train --nproc 2`), ZeRO stages 0-3: only the
adapter trains and reaches the checkpoint, the base stays bit-identical, and a resumed run goes on
from the adapter (docs/methods.md, 'LoRA')."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.multirank
REPO = Path(__file__).resolve().parent.parent
COMMON = [
    "--config", "configs/tiny/unet3d.yaml", "data.height=32", "data.width=32", "train.micro_batch_size=1",
    "train.warmup_steps=1", "train.lr=1e-2", "train.checkpoint_every=2", "run.log_every=1",
    "train.lora.rank=4", "train.lora.alpha=8",
]  # fmt: skip


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny unet3d with random non-zero weights (a fresh one's zero output layer passes no gradient)."""
    import model_zoo

    network = model_zoo.build_model("unet3d", "tiny", context_dim=32)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for param in network.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    return model_zoo.save_pretrained(network, tmp_path_factory.mktemp("base"))


def _train(run_dir: Path, shards: str, base: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "lvd", "train", "--nproc", "2", *COMMON]
    cmd += [f"data.shards={shards}", f"run.dir={run_dir}", f"model.init_from={base}", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def _checkpoint_state(run_dir: Path) -> dict[str, torch.Tensor]:
    from trainer.engine import consolidated_state_dict

    ckpt = run_dir / "checkpoints"
    return consolidated_state_dict(ckpt / (ckpt / "latest").read_text().strip(), "model")


# ZeRO-3 (partitioned weights, resume) stays in the default suite; stages 0-2 run with --all.
@pytest.mark.parametrize("stage", [pytest.param(stage, marks=pytest.mark.extended) for stage in (0, 1, 2)] + [3])
def test_two_ranks_train_only_the_adapter_under_every_zero_stage(stage, tmp_path, video_shards, base):
    from safetensors.torch import load_file

    from trainer.export import export

    done = _train(tmp_path, video_shards, base, f"train.zero_stage={stage}", "train.steps=2")
    assert done.returncode == 0, done.stderr[-3000:]
    state = _checkpoint_state(tmp_path)
    assert state and all(".lora_A." in key or ".lora_B." in key for key in state), sorted(state)[:5]
    assert any(value.abs().sum() > 0 for key, value in state.items() if ".lora_B." in key)
    merged = load_file(
        str(export(tmp_path, tmp_path / "merged", merge=True) / "denoiser" / "model.safetensors")
    )
    original = load_file(str(base / "model.safetensors"))
    adapted = {key.split(".lora_")[0] + ".weight" for key in state}
    for key, value in original.items():
        if key in adapted:
            assert not torch.equal(merged[key], value), key
        else:
            assert torch.equal(merged[key], value), key
    if stage == 3:
        before = {key: value.clone() for key, value in state.items()}
        resumed = _train(tmp_path, video_shards, base, f"train.zero_stage={stage}", "train.steps=4")
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert "resumed from" in resumed.stdout + resumed.stderr
        after = _checkpoint_state(tmp_path)
        assert set(after) == set(before) and any(not torch.equal(after[k], before[k]) for k in before)
