"""The latent cache at full shape: `lvd shard latents` with buckets, with any VAE and text encoder
the trainer takes (lvd, diffusers AutoencoderKL, causal VAE; lvd, CLIP, T5), the empty caption's
embedding recorded once and used for dropped captions, and the text-encoder check at training."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from common.config import load_config
from data_pipeline.buckets import build_buckets, choose_bucket, scheduled_bucket
from data_pipeline.config import DataConfig
from data_pipeline.latents import NULL_CAPTION, clip_generator
from data_pipeline.loader import build_loader
from data_pipeline.stages import ClipShape, decode_clip, load_npy, to_unit_range
from data_pipeline.tario import iter_samples
from lvd.shard_cmd import main as lvd_shard
from trainer.config import TrainJobConfig
from trainer.loop import train

REPO = Path(__file__).resolve().parent.parent
BUCKETS = "8x32x64,8x32x48"  # the wide clips (bikes 2.35, bigbuckbunny 1.78) and carphone (1.22)
SMALL = ["data.height=32", "data.width=32", "train.micro_batch_size=2", "run.log_every=1", "train.warmup_steps=1"]


def _train_cfg(name: str, run_dir: Path, shards: Path, *extra: str) -> TrainJobConfig:
    overrides = [*SMALL, f"data.shards={shards}", f"run.dir={run_dir}", "data.latent=true", *extra]
    return load_config(TrainJobConfig, REPO / "configs" / "tiny" / name, overrides)


def _samples(out: Path) -> dict[str, dict[str, bytes]]:
    manifest = json.loads((out / "manifest.json").read_text())
    return {s.key: s.files for entry in manifest["shards"] for s in iter_samples(out / entry["path"])}


def _shard(video_shards: str, vae: Path, out: Path, *extra: str) -> dict:
    args = ["latents", "--input", video_shards, "--vae", str(vae), "--out", str(out)]
    args += ["--frames", "8", "--height", "32", "--width", "32", "--shard-size-mb", "0.02", *extra]
    assert lvd_shard(args) == 0
    return json.loads((out / "manifest.json").read_text())


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An lvd pipeline folder with a tiny video VAE and text encoder (seeded random weights)."""
    import model_zoo

    root = tmp_path_factory.mktemp("pipeline")
    for name, family in (("vae", "video_vae"), ("text_encoder", "text_encoder")):
        torch.manual_seed(0)
        model_zoo.save_pretrained(model_zoo.build_model(family, "tiny"), root / name)
    (root / "model_index.json").write_text(json.dumps({"vae": ["model_zoo", "video_vae"], "text_encoder": ["model_zoo", "text_encoder"]}))
    return root


@pytest.fixture(scope="module")
def bucketed(video_shards: str, pipeline: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bucketed") / "latents"
    _shard(video_shards, pipeline, out, "--buckets", BUCKETS)
    return out


def test_bucketed_cache_keeps_each_clips_bucket_and_trains_on_both(bucketed, pipeline, video_shards, tmp_path):
    manifest = json.loads((bucketed / "manifest.json").read_text())
    buckets = build_buckets(DataConfig(buckets=tuple(BUCKETS.split(","))), 1)
    latent_shapes = {"8x32x64": (4, 4, 8, 16), "8x32x48": (4, 4, 8, 12)}  # tiny video VAE: /2 in time, /4 in space
    counts = dict.fromkeys(latent_shapes, 0)
    for files in _samples(bucketed).values():
        meta = json.loads(files["json"])
        expected = buckets[choose_bucket(buckets, meta)].shape  # the loader's rule, on the source clip's size
        assert meta["bucket"] == f"{expected.frames}x{expected.height}x{expected.width}"
        assert load_npy(files["latents.npy"]).shape == latent_shapes[meta["bucket"]] == tuple(meta["latent_shape"])
        counts[meta["bucket"]] += 1
    assert manifest["buckets"] == counts and min(counts.values()) > 0 and sum(counts.values()) == manifest["samples"]

    # The loader batches the cache by bucket, in the bucket schedule the ranks share.
    data = DataConfig(shards=str(bucketed), latent=True, buckets=tuple(BUCKETS.split(",")), shuffle_buffer=4)
    loader = build_loader(data, rank=0, world_size=1, batch_size=2, seed=0, tokenizer=None)
    for number in range(4):
        batch = next(loader)
        name = BUCKETS.split(",")[scheduled_bucket(0, number, 2)]
        assert batch["latents"].shape[1:] == latent_shapes[name] and {m["bucket"] for m in batch["meta"]} == {name}
    state = loader.state_dict()  # a resumed loader continues with the same batches (held clips included)
    resumed = build_loader(data, rank=0, world_size=1, batch_size=2, seed=0, tokenizer=None)
    resumed.load_state_dict(state)
    for _ in range(4):
        expected, again = next(loader), next(resumed)
        assert [m["__key__"] for m in again["meta"]] == [m["__key__"] for m in expected["meta"]]
        assert torch.equal(again["latents"], expected["latents"])

    # Two training steps: one per bucket (a round of the schedule visits each once).
    cfg = _train_cfg(
        "unet3d.yaml", tmp_path / "run", bucketed, f"data.buckets=[{BUCKETS}]", "train.steps=2",
        "train.checkpoint_every=2", f"model.text_encoder={pipeline / 'text_encoder'}",
    )  # fmt: skip
    assert train(cfg) == 0
    from trainer.checkpoint import read_rank_state

    flops = read_rank_state(tmp_path / "run" / "checkpoints", "step_00000002", 0).counters.flops_by_shape
    assert len(flops) == 2, flops


def test_diffusers_autoencoder_kl_and_clip_folders_encode_as_diffusers_and_transformers_do(video_shards, tmp_path):
    """--vae <diffusers AutoencoderKL folder>: the cached latents are, per frame, diffusers' posterior
    mean x scaling_factor (--posterior mean), or mean + std x the clip's seeded noise, times
    scaling_factor (the default sample, noise from clip_generator(--seed, key) over (c, t, h, w)).
    --text-encoder <CLIPTextModel folder>: the cached embeddings are its last hidden states."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTokenizer

    from tests.hf_checkpoints import write_pipeline

    hf = write_pipeline(tmp_path / "hf")
    vae = AutoencoderKL.from_pretrained(hf / "vae").eval()
    clip = CLIPTextModel.from_pretrained(hf / "text_encoder").eval()
    tokenizer = CLIPTokenizer.from_pretrained(hf / "tokenizer")
    scale = vae.config.scaling_factor
    mean_manifest = _shard(video_shards, hf / "vae", tmp_path / "mean", "--posterior", "mean", "--text-encoder", str(hf / "text_encoder"))
    _shard(video_shards, hf / "vae", tmp_path / "sample", "--seed", "3")
    assert mean_manifest["text_encoder"]["class"] == "CLIPTextModel" and not mean_manifest["text_encoder"]["token_mask"]
    pixels = {s.key: s.files for path in sorted(Path(video_shards).parent.glob("*.tar")) for s in iter_samples(path)}
    means, samples = _samples(tmp_path / "mean"), _samples(tmp_path / "sample")
    shape = ClipShape(frames=8, frame_stride=1, height=32, width=32)
    for key in list(means)[:4]:
        frames = to_unit_range(decode_clip(pixels[key]["mp4"], shape, None)[None])[0].permute(1, 0, 2, 3)  # (T, 3, H, W)
        with torch.no_grad():
            posterior = vae.encode(frames.contiguous()).latent_dist  # per frame: (T, c, h, w)
            caption = means[key]["txt"].decode()
            ids = tokenizer([caption], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
            text = clip(input_ids=ids).last_hidden_state[0]
        mean = posterior.mean.permute(1, 0, 2, 3)  # (c, T, h, w)
        noise = torch.randn(mean.shape, generator=clip_generator(3, key))
        np.testing.assert_allclose(load_npy(means[key]["latents.npy"]), (mean * scale).numpy(), atol=1e-5)
        drawn = (mean + posterior.std.permute(1, 0, 2, 3) * noise) * scale
        np.testing.assert_allclose(load_npy(samples[key]["latents.npy"]), drawn.numpy(), atol=1e-5)
        np.testing.assert_allclose(load_npy(means[key]["text_emb.npy"]), text.numpy(), atol=1e-5)
        assert "text_mask.npy" not in means[key]


def _t5_folder(root: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    words = ["<pad>", "</s>", "<unk>", "a", "the", "video", "of", "bikes", "car", "phone", "bunny"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(root / "tokenizer")
    torch.manual_seed(0)
    T5EncoderModel(T5Config(vocab_size=len(words), d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2)).save_pretrained(root / "t5")
    return root / "t5"


def test_null_caption_recorded_once_and_given_for_dropped_captions(bucketed, pipeline, video_shards, tmp_path):
    manifest = json.loads((bucketed / "manifest.json").read_text())
    record = manifest["text_encoder"]
    assert record["class"] == "lvd:text_encoder" and record["source"] == str((pipeline / "text_encoder").resolve())
    assert record["null_caption"] == NULL_CAPTION and sorted(p.name for p in bucketed.glob("*.npz")) == [NULL_CAPTION]
    null = np.load(bucketed / NULL_CAPTION)["text_emb"]
    import model_zoo

    encoder = model_zoo.from_pretrained(pipeline / "text_encoder").eval()
    with torch.no_grad():
        np.testing.assert_allclose(null, encoder(encoder.tokenize([""]))[0].numpy(), atol=1e-6)
    assert not any(json.loads(files["json"]).get("caption") == "" for files in _samples(bucketed).values())

    # Dropped captions (p_uncond = 1) carry the recorded embedding; kept ones their own.
    data = DataConfig(shards=str(bucketed), latent=True, buckets=tuple(BUCKETS.split(",")), shuffle_buffer=4, p_uncond=1.0)
    batch = next(build_loader(data, rank=0, world_size=1, batch_size=2, seed=0, tokenizer=None))
    assert batch["caption"] == [""] * len(batch["caption"])
    torch.testing.assert_close(batch["text_emb"], torch.from_numpy(null).expand_as(batch["text_emb"]))
    kept = next(build_loader(DataConfig(shards=str(bucketed), latent=True, buckets=data.buckets, p_uncond=0.0), rank=0, world_size=1, batch_size=2, seed=0, tokenizer=None))
    files = _samples(bucketed)[kept["meta"][0]["__key__"]]
    torch.testing.assert_close(kept["text_emb"][0], torch.from_numpy(load_npy(files["text_emb.npy"])))

    # T5: the token mask is cached with each embedding, and the empty caption's with its embedding.
    t5 = _t5_folder(tmp_path)
    out = tmp_path / "t5_cache"
    manifest = _shard(video_shards, pipeline / "vae", out, "--text-encoder", str(t5), "--tokenizer", str(tmp_path / "tokenizer"))
    assert manifest["text_encoder"]["class"] == "T5EncoderModel" and manifest["text_encoder"]["token_mask"]
    some = next(iter(_samples(out).values()))
    mask = load_npy(some["text_mask.npy"])
    assert load_npy(some["text_emb.npy"]).shape == (77, 16) and 0 < mask.sum() < 77
    assert np.abs(load_npy(some["text_emb.npy"])[mask == 0]).max() == 0
    dropped = next(build_loader(DataConfig(shards=str(out), latent=True, p_uncond=1.0), rank=0, world_size=1, batch_size=2, seed=0, tokenizer=None))
    torch.testing.assert_close(dropped["text_mask"], torch.from_numpy(np.load(out / NULL_CAPTION)["text_mask"]).expand(2, 77))


def test_training_on_a_cache_of_another_text_encoder_is_one_error_naming_both(bucketed, pipeline, tmp_path, capsys):
    cfg = _train_cfg("unet3d.yaml", tmp_path / "run", bucketed, f"data.buckets=[{BUCKETS}]", "train.steps=1")
    assert train(cfg) == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if "latent cache" in line]
    assert len(lines) == 1
    assert str((pipeline / "text_encoder").resolve()) in lines[0] and "model.text_encoder is text_encoder/tiny" in lines[0]


def test_videofusion_trains_on_a_causal_vae_cache(video_shards, tmp_path):
    """16-channel latents of a causal VAE export: the videofusion task takes the latent channels
    from model.overrides.out_channels, like every latent-shard task."""
    import model_zoo

    torch.manual_seed(0)
    model_zoo.save_pretrained(model_zoo.build_model("causal_vae", "tiny"), tmp_path / "causal_vae")
    manifest = _shard(video_shards, tmp_path / "causal_vae", tmp_path / "latents", "--frames", "5")
    some = next(iter(_samples(tmp_path / "latents").values()))
    assert load_npy(some["latents.npy"]).shape == (16, 2, 4, 4) and manifest["buckets"] == {"5x32x32": manifest["samples"]}
    cfg = _train_cfg("videofusion.yaml", tmp_path / "run", tmp_path / "latents", "data.frames=5", "model.overrides={out_channels: 16}",
                     "train.steps=2", "train.checkpoint_every=0")  # fmt: skip
    assert train(cfg) == 0
    from trainer.monitor import read_metrics

    records = read_metrics(tmp_path / "run")
    assert sorted(records) == [1, 2] and all(np.isfinite(r["loss"]) for r in records.values())
