"""`lvd shard latents`: each clip's posterior draw is a function of (--seed, the clip's key) only."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import model_zoo
from data_pipeline.latents import clip_generator
from data_pipeline.shard_cli import main as shard_main
from data_pipeline.stages import load_npy
from data_pipeline.tario import iter_samples
from lvd.shard_cmd import load_encoder
from lvd.shard_cmd import main as lvd_shard


class Interrupted(Exception):
    """Stands in for a job killed part-way."""


@pytest.fixture(scope="module")
def vae_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("vae")
    torch.manual_seed(0)
    model_zoo.save_pretrained(model_zoo.build_model("video_vae", "tiny"), folder)
    return folder


def _args(video_shards: str, vae: Path, out: Path, *extra: str) -> list[str]:
    shards = video_shards.split("/{")[0]
    return [
        *("latents", "--input", shards, "--vae", str(vae), "--out", str(out), "--frames", "8"),
        *("--height", "32", "--width", "32", "--shard-size-mb", "0.001", *extra),
    ]


def _latents(out: Path) -> dict[str, np.ndarray]:
    manifest = json.loads((out / "manifest.json").read_text())
    return {
        sample.key: load_npy(sample.files["latents.npy"])
        for entry in manifest["shards"]
        for sample in iter_samples(out / entry["path"])
    }


def _same(first: dict[str, np.ndarray], second: dict[str, np.ndarray], atol: float = 0.0) -> bool:
    return first.keys() == second.keys() and all(
        np.allclose(first[key], second[key], rtol=0.0, atol=atol) for key in first
    )


def test_clip_generator_depends_on_seed_and_key_only():
    def draw(seed: int, key: str) -> torch.Tensor:
        return torch.randn(4, generator=clip_generator(seed, key))

    assert torch.equal(draw(0, "a"), draw(0, "a"))
    assert not torch.equal(draw(0, "a"), draw(0, "b")) and not torch.equal(draw(0, "a"), draw(1, "a"))


@pytest.mark.slow
def test_same_latents_in_two_runs_after_a_resume_and_in_other_batches(video_shards, vae_folder, tmp_path):
    torch.manual_seed(1)
    assert lvd_shard(_args(video_shards, vae_folder, tmp_path / "first")) == 0
    first = _latents(tmp_path / "first")
    assert len(first) >= 4 and len(json.loads((tmp_path / "first" / "manifest.json").read_text())["shards"]) >= 3

    # The global RNG's state must not matter.
    torch.manual_seed(2)
    assert lvd_shard(_args(video_shards, vae_folder, tmp_path / "second")) == 0
    assert _same(_latents(tmp_path / "second"), first)

    # Killed after two encoder calls, then resumed by a fresh command (the global RNG elsewhere).
    calls = []

    def dies_after_two_batches(folder: str, **options):
        encoder, text = load_encoder(folder, **options)

        def encode(video: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
            if len(calls) == 2:
                raise Interrupted
            calls.append(len(generators))
            return encoder.encode(video, generators)

        return type(encoder)(encode), text

    resumed = tmp_path / "resumed"
    with pytest.raises(Interrupted):
        shard_main(_args(video_shards, vae_folder, resumed), load_encoder=dies_after_two_batches)
    assert not (resumed / "manifest.json").exists() and list(resumed.glob("shard-*.tar"))
    torch.manual_seed(3)
    assert lvd_shard(_args(video_shards, vae_folder, resumed)) == 0
    assert _same(_latents(resumed), first)

    # Another batching draws the same noise per clip (the encoder's float sums may round otherwise
    # in another batch size); another seed draws other noise.
    assert lvd_shard(_args(video_shards, vae_folder, tmp_path / "batch3", "--batch-size", "3")) == 0
    assert _same(_latents(tmp_path / "batch3"), first, atol=1e-5)
    assert lvd_shard(_args(video_shards, vae_folder, tmp_path / "seed7", "--seed", "7")) == 0
    reseeded = _latents(tmp_path / "seed7")
    assert reseeded.keys() == first.keys() and not any(np.array_equal(reseeded[k], first[k]) for k in first)
