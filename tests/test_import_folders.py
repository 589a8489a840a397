"""Import by path: the format is detected from the folder, and the imported networks compute what
the diffusers / transformers models they come from compute (real-format random checkpoints)."""

from __future__ import annotations

import json

import pytest
import torch
from hf_checkpoints import write_pipeline

from model_zoo import from_pretrained
from model_zoo.importers.folders import load


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    return write_pipeline(tmp_path_factory.mktemp("sd"))


def test_vae_is_the_autoencoder_kl_per_frame_with_its_scaling_factor(pipeline) -> None:
    from diffusers import AutoencoderKL

    vae, line = load(pipeline, "vae")
    assert "AutoencoderKL" in line and vae.config.scale_factor == 0.5
    image = AutoencoderKL.from_pretrained(pipeline / "vae").eval()
    video = torch.rand(1, 3, 2, 16, 16) * 2 - 1
    with torch.no_grad():
        mean = vae.encode(video).mean  # (1, 4, 2, 8, 8)
        frames = video.permute(0, 2, 1, 3, 4).reshape(2, 3, 16, 16)
        expected = image.encode(frames).latent_dist.mean.reshape(1, 2, 4, 8, 8).permute(0, 2, 1, 3, 4)
        assert torch.allclose(mean, expected, atol=1e-5)
        got = vae.decode(mean)
        want = image.decode(mean.permute(0, 2, 1, 3, 4).reshape(2, 4, 8, 8)).sample
    assert torch.allclose(got, want.reshape(1, 2, 3, 16, 16).permute(0, 2, 1, 3, 4), atol=1e-4)


def test_clip_text_encoder_with_the_tokenizer_beside_it(pipeline) -> None:
    from transformers import CLIPTextModel

    encoder, line = load(pipeline / "text_encoder", "text_encoder")
    assert "CLIPTextModel" in line and encoder.config.context_dim == 32
    tokens = encoder.tokenize(["a cat", ""])
    assert tokens.shape == (2, 77) and tokens[0, 0] == 49406 and tokens[0, 3] == 49407
    reference = CLIPTextModel.from_pretrained(pipeline / "text_encoder").eval()
    with torch.no_grad():
        assert torch.allclose(encoder(tokens), reference(input_ids=tokens).last_hidden_state, atol=1e-5)


def test_clip_image_encoder(pipeline) -> None:
    encoder, _ = load(pipeline, "image_encoder")
    out = encoder(encoder.example_input(2))
    assert out.shape == (2, 1, 24)


def test_exported_helpers_reload_as_lvd_folders(pipeline, tmp_path) -> None:
    import shutil

    encoder, _ = load(pipeline, "text_encoder")
    encoder.save_pretrained(tmp_path / "saved")
    shutil.move(tmp_path / "saved", tmp_path / "te")  # the folder is self-contained: it holds its tokenizer
    assert json.loads((tmp_path / "te" / "config.json").read_text())["tokenizer_path"] == "tokenizer"
    again, line = load(tmp_path / "te", "text_encoder")
    tokens = encoder.tokenize(["a dog"])
    assert line.startswith("text_encoder: lvd hf_text_encoder")
    with torch.no_grad():
        assert torch.equal(again(tokens), encoder(tokens))
    vae, _ = load(pipeline, "vae")
    vae.save_pretrained(tmp_path / "vae")
    assert from_pretrained(tmp_path / "vae").config == vae.config


def test_wrong_role_and_missing_tokenizer_are_named(pipeline, tmp_path) -> None:
    with pytest.raises(ValueError, match="AutoencoderKL, which cannot serve as the text_encoder"):
        load(pipeline / "vae", "text_encoder")
    import shutil

    shutil.copytree(pipeline / "text_encoder", tmp_path / "alone" / "text_encoder")
    with pytest.raises(FileNotFoundError, match="model.tokenizer"):
        load(tmp_path / "alone" / "text_encoder", "text_encoder")
    with pytest.raises(FileNotFoundError, match="no config.json or model_index.json"):
        load(tmp_path, "vae")


def test_train_log_names_each_helpers_weights(pipeline, capsys) -> None:
    from trainer.tasks.networks import build_helper

    build_helper("video_vae/tiny", seed=3, device=torch.device("cpu"), role="vae")
    build_helper(str(pipeline), seed=4, device=torch.device("cpu"), role="text_encoder")
    out = capsys.readouterr().err
    assert "lvd train: vae: random video_vae/tiny (seed 3)" in out
    assert f"lvd train: text_encoder: transformers CLIPTextModel {pipeline / 'text_encoder'}" in out


def test_t5_encoder_uses_the_attention_mask(tmp_path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    words = ["<pad>", "</s>", "<unk>", "a", "cat", "on", "the", "mat"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>").save_pretrained(
        tmp_path / "tokenizer"
    )
    torch.manual_seed(0)
    t5 = T5EncoderModel(T5Config(vocab_size=8, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2)).eval()
    t5.save_pretrained(tmp_path / "text_encoder")
    encoder, line = load(tmp_path / "text_encoder", "text_encoder")
    assert "T5EncoderModel" in line and encoder.config.context_dim == 16
    tokens = encoder.tokenize(["a cat on the mat", "a cat"])
    with torch.no_grad():
        out = encoder(tokens)
        short = t5(input_ids=tokens[1:, :2]).last_hidden_state
    assert out.shape == (2, 77, 16) and out[1, 2:].abs().max() == 0
    assert torch.allclose(out[1, :2], short[0], atol=1e-5)
