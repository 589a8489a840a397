"""Load a network by path, the format detected from the folder (see docs/methods.md,
'Pretrained weights').

A path is one of: an lvd model folder (`config.json` with `_family`); a diffusers model folder
(`config.json` with `_class_name`: UNet3DConditionModel, UNet2DConditionModel, AutoencoderKL);
a transformers model folder (`config.json` with `architectures`: CLIPTextModel, T5EncoderModel,
CLIPVisionModelWithProjection); an open_clip checkpoint folder (`open_clip_config.json` with
`model_cfg`, beside `open_clip_model.safetensors` or `open_clip_pytorch_model.bin`: the layout
open_clip's own hub loading reads), whose text tower serves as text encoder; or a pipeline folder
(`model_index.json`: a diffusers pipeline or an `lvd export`), whose subfolder for the asked role
is used. `load(path, role)` returns the
lvd network and a sentence saying what was loaded from where, for the run log.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from torch import nn

from model_zoo.pretrained import from_pretrained

OPEN_CLIP = "OpenCLIP"
"""The class name `model_class` gives an open_clip checkpoint folder."""
OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
"""The weights files open_clip's hub loading reads, in its order of preference."""
TextLayer = Literal["last", "penultimate"]

Role = Literal["denoiser", "vae", "text_encoder", "image_encoder"]
SUBFOLDERS: dict[str, tuple[str, ...]] = {
    "denoiser": ("unet", "denoiser", "model"),
    "vae": ("vae",),
    "text_encoder": ("text_encoder",),
    "image_encoder": ("image_encoder",),
}
ROLE_CLASSES: dict[str, tuple[str, ...]] = {
    "denoiser": ("UNet3DConditionModel", "UNet2DConditionModel"),
    "vae": ("AutoencoderKL",),
    "text_encoder": ("CLIPTextModel", "CLIPTextModelWithProjection", "T5EncoderModel", OPEN_CLIP),
    "image_encoder": ("CLIPVisionModelWithProjection",),
}


def resolve(path: str | Path, role: Role) -> tuple[Path, dict[str, Any]]:
    """The model folder `path` names for `role` (a pipeline folder's subfolder) and its config.json."""
    folder = Path(path)
    if (folder / OPEN_CLIP_CONFIG).is_file():  # before config.json: hub folders may hold both
        return folder, _open_clip_config(folder / OPEN_CLIP_CONFIG)
    if (folder / "config.json").is_file():
        return folder, json.loads((folder / "config.json").read_text())
    if (folder / "model_index.json").is_file():
        for name in SUBFOLDERS[role]:
            if (folder / name / "config.json").is_file():
                return resolve(folder / name, role)
        raise FileNotFoundError(f"{folder}: a pipeline folder without a {' or '.join(SUBFOLDERS[role])} subfolder")
    raise FileNotFoundError(f"{folder}: no config.json or model_index.json (not a model or pipeline folder)")


def model_class(config: dict[str, Any]) -> str:
    """'lvd:<family>', 'OpenCLIP', or the diffusers / transformers class a config.json names."""
    if "model_cfg" in config:
        return OPEN_CLIP
    if "_family" in config:
        return f"lvd:{config['_family']}"
    if "_class_name" in config:
        return str(config["_class_name"])
    names = config.get("architectures") or []
    return str(names[0]) if len(names) == 1 else "unknown"


def load(
    path: str | Path, role: Role, *, tokenizer: str | None = None, text_layer: TextLayer = "penultimate"
) -> tuple[nn.Module, str]:
    """The lvd network `path` holds for `role`, and a log line naming the source and format
    (`text_layer`: the layer an open_clip text tower's tokens come from)."""
    folder, config = resolve(path, role)
    cls = model_class(config)
    if cls.startswith("lvd:"):
        return from_pretrained(folder), f"{role}: lvd {cls[4:]} from {folder}"
    if cls not in ROLE_CLASSES[role]:
        raise ValueError(f"{folder}/config.json: a {cls}, which cannot serve as the {role} (expected one of {list(ROLE_CLASSES[role])})")
    if role == "denoiser":
        from model_zoo.importers.diffusers_unet import load_unet

        model = load_unet(folder, config)
        verb = "inflated from" if cls == "UNet2DConditionModel" else "loaded from"
        return model, f"{role}: unet3d {verb} diffusers {cls} {folder} (architecture from its config.json)"
    if role == "vae":
        return _autoencoder_kl(folder, config), f"{role}: diffusers AutoencoderKL {folder}, per frame"
    if cls == OPEN_CLIP:
        return _open_clip_text_encoder(folder, config["model_cfg"], text_layer), f"{role}: open_clip text tower {folder}, {text_layer} layer"
    if role == "text_encoder":
        return _text_encoder(folder, config, tokenizer), f"{role}: transformers {cls} {folder}"
    from model_zoo.hf_encoders import HFImageEncoder, HFImageEncoderConfig

    encoder = HFImageEncoder(HFImageEncoderConfig(hf_config=config, context_dim=config["projection_dim"], pretrained_path=str(folder)))
    return encoder, f"{role}: transformers {cls} {folder}"


def _autoencoder_kl(folder: Path, config: dict[str, Any]) -> nn.Module:
    from model_zoo.temporal_decoder_vae import TemporalDecoderVAE, TemporalDecoderVAEConfig

    expected = {"act_fn": "silu", "use_quant_conv": True, "use_post_quant_conv": True, "mid_block_add_attention": True}
    wrong = {k: config[k] for k, v in expected.items() if k in config and config[k] != v}
    if config.get("out_channels", 3) != config.get("in_channels", 3) or wrong:
        raise ValueError(f"{folder}/config.json: options outside the Stable Diffusion AutoencoderKL layout: {wrong or config}")
    blocks = list(config.get("block_out_channels", (64,)))
    for key, kind in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        if list(config.get(key, [kind] * len(blocks))) != [kind] * len(blocks):
            raise ValueError(f"{folder}/config.json: {key}={config[key]} (only {kind} blocks are supported)")
    vae_config = TemporalDecoderVAEConfig(
        in_channels=config.get("in_channels", 3),
        block_out_channels=tuple(blocks),
        layers_per_block=config.get("layers_per_block", 1),
        latent_channels=config.get("latent_channels", 4),
        norm_num_groups=config.get("norm_num_groups", 32),
        scale_factor=config.get("scaling_factor", 0.18215),
        shift_factor=config.get("shift_factor") or 0.0,
        pretrained_path=str(folder),
    )
    return TemporalDecoderVAE(vae_config)


def _text_encoder(folder: Path, config: dict[str, Any], tokenizer: str | None) -> nn.Module:
    from model_zoo.hf_encoders import HFTextEncoder, HFTextEncoderConfig

    tokenizer_folder = Path(tokenizer) if tokenizer else folder.parent / "tokenizer"
    if not tokenizer_folder.is_dir():
        raise FileNotFoundError(f"{folder}: no tokenizer at {tokenizer_folder} (give model.tokenizer=PATH)")
    t5 = config.get("model_type") == "t5"
    encoder_config = HFTextEncoderConfig(
        hf_config=config,
        tokenizer_path=str(tokenizer_folder.resolve()),
        context_dim=int(config["d_model"] if t5 else config["hidden_size"]),
        pretrained_path=str(folder),
    )
    return HFTextEncoder(encoder_config)


def _open_clip_config(path: Path) -> dict[str, Any]:
    """An open_clip_config.json, checked to hold a `model_cfg` with a `text_cfg`."""
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from error
    model_cfg = config.get("model_cfg") if isinstance(config, dict) else None
    if not isinstance(model_cfg, dict) or not isinstance(model_cfg.get("text_cfg"), dict):
        raise ValueError(f"{path}: no 'model_cfg' with a 'text_cfg' (not an open_clip checkpoint config)")
    return config


def _open_clip_text_encoder(folder: Path, model_cfg: dict[str, Any], layer: TextLayer) -> nn.Module:
    """The text tower of an open_clip checkpoint folder, returning the tokens of `layer`."""
    from model_zoo.text_encoder import TextEncoder, TextEncoderConfig

    weights = next((folder / name for name in OPEN_CLIP_WEIGHTS if (folder / name).is_file()), None)
    if weights is None:
        raise FileNotFoundError(f"{folder / OPEN_CLIP_WEIGHTS[0]}: missing weights file (or {OPEN_CLIP_WEIGHTS[1]})")
    where = folder / OPEN_CLIP_CONFIG
    text_cfg = dict(model_cfg["text_cfg"])
    unsupported = sorted(k for k in ("hf_model_name", "hf_tokenizer_name") if text_cfg.get(k))
    if unsupported:
        raise ValueError(f"{where}: text_cfg {unsupported}: Hugging Face text towers are not supported (only open_clip's own)")
    from open_clip.model import CLIPTextCfg

    try:
        width = CLIPTextCfg(**text_cfg).width
    except TypeError as error:
        raise ValueError(f"{where}: text_cfg: {error}") from error
    config = TextEncoderConfig(
        arch=None,
        text_cfg=text_cfg,
        context_dim=int(width),
        embed_dim=int(model_cfg.get("embed_dim", width)),
        context_length=int(text_cfg.get("context_length", 77)),
        layer=layer,
        quick_gelu=bool(model_cfg.get("quick_gelu", False)),
        pretrained_path=str(weights),
    )
    try:
        return TextEncoder(config)
    except RuntimeError as error:  # a strict load_state_dict that does not fit
        detail = " ".join(str(error).split())[:400]
        raise ValueError(f"{weights}: does not fit the text_cfg of {where}: {detail}") from error
