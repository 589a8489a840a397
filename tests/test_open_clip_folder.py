"""`model.text_encoder=PATH` takes an open_clip checkpoint folder (open_clip_config.json with
`model_cfg` + open_clip_model.safetensors), the text tower's tokens of the chosen layer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import open_clip
import pytest
import torch
from conftest import run_lvd
from hf_checkpoints import write_open_clip

from model_zoo.importers.folders import load

PROMPTS = ["a red bicycle leaning on a wall", ""]


@pytest.fixture(scope="module")
def open_clip_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_open_clip(tmp_path_factory.mktemp("open_clip") / "ViT-tiny")


def _open_clip_tokens(folder: Path, layer: int) -> torch.Tensor:
    """What open_clip itself computes on the folder's weights: the text transformer's tokens after
    `layer` blocks, then ln_final (Stable Diffusion 2.x's FrozenOpenCLIPEmbedder)."""
    model = open_clip.create_model(f"local-dir:{folder}", pretrained=str(folder / "open_clip_model.safetensors")).eval()
    tokens = open_clip.get_tokenizer(f"local-dir:{folder}")(PROMPTS)
    with torch.no_grad():
        x = model.token_embedding(tokens) + model.positional_embedding
        for block in model.transformer.resblocks[:layer]:
            x = block(x, attn_mask=model.attn_mask)
        return model.ln_final(x)


@pytest.mark.parametrize(("layer", "blocks"), [("penultimate", 2), ("last", 3)])
def test_open_clip_folder_gives_open_clips_own_tokens(open_clip_folder: Path, layer: str, blocks: int) -> None:
    encoder, line = load(open_clip_folder, "text_encoder", text_layer=layer)
    assert line == f"text_encoder: open_clip text tower {open_clip_folder}, {layer} layer"
    assert encoder.config.context_dim == 32
    ours = encoder.encode_prompts(PROMPTS)
    assert ours.shape == (2, 77, 32)
    torch.testing.assert_close(ours, _open_clip_tokens(open_clip_folder, blocks), rtol=1e-5, atol=1e-5)


def test_open_clip_folder_round_trips_through_save_pretrained(open_clip_folder: Path, tmp_path: Path) -> None:
    from model_zoo import from_pretrained

    encoder, _ = load(open_clip_folder, "text_encoder")
    encoder.save_pretrained(tmp_path / "saved")
    again = from_pretrained(tmp_path / "saved")
    torch.testing.assert_close(again.encode_prompts(PROMPTS), encoder.encode_prompts(PROMPTS))


@pytest.mark.parametrize(
    ("damage", "named"),
    [
        ("no_weights", "open_clip_model.safetensors: missing weights file"),
        ("not_json", "open_clip_config.json: not valid JSON"),
        ("no_model_cfg", "open_clip_config.json: no 'model_cfg' with a 'text_cfg'"),
        ("unknown_key", "open_clip_config.json: text_cfg:"),
        ("wrong_width", "open_clip_model.safetensors: does not fit the text_cfg of"),
    ],
)
def test_a_broken_open_clip_folder_is_one_error_naming_the_file(open_clip_folder: Path, tmp_path: Path, damage: str, named: str) -> None:
    folder = Path(shutil.copytree(open_clip_folder, tmp_path / "broken"))
    config_path = folder / "open_clip_config.json"
    config = json.loads(config_path.read_text())
    if damage == "no_weights":
        (folder / "open_clip_model.safetensors").unlink()
    elif damage == "not_json":
        config_path.write_text("{model_cfg:")
    elif damage == "no_model_cfg":
        config_path.write_text(json.dumps({"preprocess_cfg": {}}))
    elif damage == "unknown_key":
        config["model_cfg"]["text_cfg"]["depth"] = 3
        config_path.write_text(json.dumps(config))
    else:
        config["model_cfg"]["text_cfg"]["width"] = 64
        config_path.write_text(json.dumps(config))
    with pytest.raises((ValueError, FileNotFoundError)) as error:
        load(folder, "text_encoder")
    assert named in str(error.value) and str(folder) in str(error.value)


@pytest.mark.slow
def test_train_with_an_open_clip_text_encoder_folder(open_clip_folder: Path, tmp_path: Path, video_shards: str) -> None:
    run = run_lvd(
        "train", "--config", "configs/tiny/unet3d.yaml", f"data.shards={video_shards}", "data.height=32", "data.width=32",
        "train.micro_batch_size=2", "train.steps=2", f"run.dir={tmp_path / 'run'}", f"model.text_encoder={open_clip_folder}",
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"text_encoder: open_clip text tower {open_clip_folder}, penultimate layer" in run.stdout + run.stderr
