"""Real-format random checkpoints for the import tests: small diffusers / transformers models
written with their own `save_pretrained`, laid out as a diffusers pipeline folder
(unet/, vae/, text_encoder/, tokenizer/, image_encoder/). Nothing is downloaded: the CLIP
tokenizer's vocabulary and merges are the BPE tables open_clip ships."""

from __future__ import annotations

import json
from pathlib import Path

import torch

UNET2D = dict(
    block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=1,
    norm_num_groups=8,
    cross_attention_dim=32,
    attention_head_dim=(4, 8),
)
VAE = dict(
    block_out_channels=(16, 32),
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    scaling_factor=0.5,
)
CLIP_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, vocab_size=49408)
CLIP_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8, projection_dim=24)


def randomise(model: torch.nn.Module, scale: float = 0.2) -> None:
    """Every tensor random (zero-initialised output layers included), so no term hides behind a zero."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * scale)


def write_tokenizer(folder: Path) -> Path:
    """A transformers CLIPTokenizer folder from open_clip's bundled BPE vocabulary."""
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPTokenizer

    bpe = SimpleTokenizer()
    names = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {names.get(token, token): index for token, index in bpe.encoder.items()}
    merges = [" ".join(pair) for pair, _ in sorted(bpe.bpe_ranks.items(), key=lambda item: item[1])]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token="<|endoftext|>", model_max_length=77)
    tokenizer.save_pretrained(folder)
    return folder


def write_pipeline(root: Path, *, seed: int = 0) -> Path:
    """A diffusers-layout folder with unet (SD UNet2DConditionModel), vae (AutoencoderKL),
    text_encoder (CLIPTextModel) + tokenizer and image_encoder (CLIPVisionModelWithProjection)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    root.mkdir(parents=True, exist_ok=True)
    unet = UNet2DConditionModel.from_config(UNET2D)
    randomise(unet)
    unet.save_pretrained(root / "unet")
    vae = AutoencoderKL.from_config(VAE)
    randomise(vae, 0.1)
    vae.save_pretrained(root / "vae")
    CLIPTextModel(CLIPTextConfig(**CLIP_TEXT)).save_pretrained(root / "text_encoder")
    CLIPVisionModelWithProjection(CLIPVisionConfig(**CLIP_VISION)).save_pretrained(root / "image_encoder")
    write_tokenizer(root / "tokenizer")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return root


T5_WORDS = ["<pad>", "</s>", "<unk>", "a", "cat", "on", "the", "mat", "dog", "runs", "red", "car"]


def write_t5(root: Path, *, d_model: int = 32, seed: int = 0) -> Path:
    """A transformers T5EncoderModel folder (root/text_encoder) with a word-level fast tokenizer
    beside it (root/tokenizer), as in a diffusers pipeline folder; returns the model folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(T5_WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    tokenizer.save_pretrained(root / "tokenizer")
    torch.manual_seed(seed)
    config = T5Config(vocab_size=len(T5_WORDS), d_model=d_model, d_kv=8, d_ff=64, num_layers=2, num_heads=2)
    T5EncoderModel(config).save_pretrained(root / "text_encoder")
    return root / "text_encoder"


OPEN_CLIP_MODEL = dict(
    embed_dim=24,
    vision_cfg=dict(image_size=32, patch_size=8, width=32, layers=1, head_width=16),
    text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=3),
)


def write_open_clip(folder: Path, *, seed: int = 0) -> Path:
    """An open_clip checkpoint folder as open_clip's hub loading reads it: open_clip_config.json
    (`model_cfg`) and open_clip_model.safetensors of a small random CLIP built by open_clip."""
    import open_clip
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    model = open_clip.CLIP(**OPEN_CLIP_MODEL)
    randomise(model, 0.05)
    folder.mkdir(parents=True, exist_ok=True)
    config = {"model_cfg": OPEN_CLIP_MODEL, "preprocess_cfg": {"mean": [0.5] * 3, "std": [0.5] * 3}}
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    return folder
