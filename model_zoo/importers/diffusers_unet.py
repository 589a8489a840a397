"""Key mapping between `unet3d` and diffusers' `UNet3DConditionModel` / `UNet2DConditionModel`.

A ModelScope-layout `unet3d` (the `modelscope` flavour's options) holds exactly the tensors of a
diffusers `UNet3DConditionModel`, under other names and shapes: fused q|k|v and k|v projections,
split GEGLU value/gate projections, 1x1 convolutions as linears and (3, 1, 1) temporal
convolutions as (3, 1) ones. A `UNet2DConditionModel` (Stable Diffusion 1.x / 2.x) holds the
spatial subset of those tensors; inflating it leaves the temporal layers at their zero-initialised
identity. Each mapping entry relates a list of our tensors to a list of theirs whose
concatenations along dim 0 are the same numbers.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor

from model_zoo.unet3d import UNet3D, UNet3DConfig

Pairs = list[tuple[list[str], list[str]]]

UNET3D_CLASS = "UNet3DConditionModel"
UNET2D_CLASS = "UNet2DConditionModel"
_CROSS_DOWN = {UNET3D_CLASS: "CrossAttnDownBlock3D", UNET2D_CLASS: "CrossAttnDownBlock2D"}
_PLAIN_DOWN = {UNET3D_CLASS: "DownBlock3D", UNET2D_CLASS: "DownBlock2D"}
_CROSS_UP = {UNET3D_CLASS: "CrossAttnUpBlock3D", UNET2D_CLASS: "CrossAttnUpBlock2D"}
_PLAIN_UP = {UNET3D_CLASS: "UpBlock3D", UNET2D_CLASS: "UpBlock2D"}
# UNet2DConditionModel options whose value must be the Stable Diffusion one for the mapping to hold.
_SD_REQUIRED: dict[str, Any] = {
    "act_fn": "silu",
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "class_embed_type": None,
    "addition_embed_type": None,
    "encoder_hid_dim": None,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "time_cond_proj_dim": None,
    "resnet_time_scale_shift": "default",
    "resnet_out_scale_factor": 1.0,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "dual_cross_attention": False,
    "only_cross_attention": False,
    "center_input_sample": False,
    "num_class_embeds": None,
    "transformer_layers_per_block": 1,
    "reverse_transformer_layers_per_block": None,
    "attention_type": "default",
}


def unet3d_config(diffusers_config: dict[str, Any], where: str) -> UNet3DConfig:
    """The ModelScope-layout `UNet3DConfig` holding a diffusers U-Net of `diffusers_config`
    (`_class_name` UNet3DConditionModel, or UNet2DConditionModel to inflate)."""
    cls = diffusers_config.get("_class_name")
    if cls not in (UNET3D_CLASS, UNET2D_CLASS):
        raise ValueError(f"{where}: _class_name={cls!r} is not {UNET3D_CLASS} or {UNET2D_CLASS}")
    cfg = dict(diffusers_config)
    if cls == UNET2D_CLASS:
        wrong = {k: cfg[k] for k, v in _SD_REQUIRED.items() if k in cfg and cfg[k] != v}
        if wrong:
            raise ValueError(f"{where}: options outside the Stable Diffusion layout: {wrong}")
    channels = list(cfg.get("block_out_channels", (320, 640, 1280, 1280)))
    base = channels[0]
    if any(c % base for c in channels):
        raise ValueError(f"{where}: block_out_channels={channels} are not multiples of the first")
    attention = _attention_levels(cfg, cls, where)
    heads = cfg.get("attention_head_dim", 8 if cls == UNET2D_CLASS else 64)
    if cls == UNET2D_CLASS and cfg.get("num_attention_heads") is not None:
        heads = cfg["num_attention_heads"]
    head_options = _head_options(heads, channels, where)
    common = dict(
        in_channels=cfg.get("in_channels", 4),
        out_channels=cfg.get("out_channels", 4),
        model_channels=base,
        channel_mult=tuple(c // base for c in channels),
        num_res_blocks=cfg.get("layers_per_block", 2),
        attention_resolutions=tuple(2**level for level in attention),
        context_dim=cfg.get("cross_attention_dim", 1024 if cls == UNET3D_CLASS else 1280),
        num_groups=cfg.get("norm_num_groups", 32),
        norm_eps=cfg.get("norm_eps", 1e-5),
        additive_time_embedding=True,
        temporal_conv_layers=4,
        temporal_clip_norm=True,
        temporal_position="none",
        temporal_double_attention=True,
        **head_options,
    )
    if cls == UNET3D_CLASS:
        if not isinstance(heads, int):
            raise ValueError(
                f"{where}: attention_head_dim={heads} per block is not supported for {UNET3D_CLASS}"
            )
        return UNet3DConfig(input_temporal=(8, heads), **{**common, "head_dim": heads})
    # The input temporal transformer is ModelScope's 8 heads of the attention head width (SD 2.x:
    # 64), or of base / 8 channels when the image U-Net's head width varies by level (SD 1.x).
    return UNet3DConfig(input_temporal=(8, head_options.get("head_dim", base // 8)), **common)


def _attention_levels(cfg: dict[str, Any], cls: str, where: str) -> list[int]:
    down = list(cfg.get("down_block_types", ()))
    up = list(cfg.get("up_block_types", ()))
    levels = []
    for level, kind in enumerate(down):
        if kind not in (_CROSS_DOWN[cls], _PLAIN_DOWN[cls]):
            raise ValueError(f"{where}: down_block_types[{level}]={kind!r} is not supported")
        cross = kind == _CROSS_DOWN[cls]
        expected_up = _CROSS_UP[cls] if cross else _PLAIN_UP[cls]
        up_kind = up[len(down) - 1 - level] if len(up) == len(down) else None
        if up_kind != expected_up:
            raise ValueError(f"{where}: up_block_types={up} do not mirror down_block_types={down}")
        if cross:
            levels.append(level)
    return levels


def _head_options(heads: int | list[int], channels: list[int], where: str) -> dict[str, Any]:
    if isinstance(heads, int):
        return {"num_heads": heads}
    per_level = list(heads)
    head_dims = {c // h for c, h in zip(channels, per_level)}
    if len(head_dims) != 1:
        raise ValueError(f"{where}: attention heads {per_level} give no common head width over {channels}")
    return {"num_heads": per_level[0], "head_dim": head_dims.pop()}


def key_pairs(config: UNet3DConfig) -> Pairs:
    """(our keys, diffusers keys) of every tensor of a ModelScope-layout `unet3d` of `config`."""
    pairs: Pairs = []
    pairs += _linear("time_embed.mlp.0", "time_embedding.linear_1")
    pairs += _linear("time_embed.mlp.2", "time_embedding.linear_2")
    pairs += _linear("input_conv", "conv_in")
    if config.input_temporal is not None:
        pairs += _temporal("input_temporal", "transformer_in")
    levels = len(config.channel_mult)
    index = 0
    for level in range(levels):
        attention = 2**level in config.attention_resolutions
        for j in range(config.num_res_blocks):
            pairs += _block(config, f"encoder.{index}", f"down_blocks.{level}", j, attention)
            index += 1
        if level < levels - 1:
            pairs += _linear(f"encoder.{index}.conv", f"down_blocks.{level}.downsamplers.0.conv")
            index += 1
    pairs += _block(config, "middle.0", "mid_block", 0, True)
    pairs += _block(config, "middle.1", "mid_block", 1, False)
    index = 0
    for up, level in enumerate(reversed(range(levels))):
        attention = 2**level in config.attention_resolutions
        for j in range(config.num_res_blocks + 1):
            pairs += _block(config, f"decoder.{index}", f"up_blocks.{up}", j, attention)
            index += 1
        if level > 0:
            pairs += _linear(f"decoder.{index}.conv", f"up_blocks.{up}.upsamplers.0.conv")
            index += 1
    pairs += _linear("out_norm", "conv_norm_out")
    pairs += _linear("out_conv", "conv_out")
    return pairs


def _linear(ours: str, theirs: str, *, bias: bool = True) -> Pairs:
    names = ["weight", "bias"] if bias else ["weight"]
    return [([f"{ours}.{n}"], [f"{theirs}.{n}"]) for n in names]


def _block(config: UNet3DConfig, ours: str, theirs: str, j: int, attention: bool) -> Pairs:
    res = f"{theirs}.resnets.{j}"
    pairs = _linear(f"{ours}.res.in_norm", f"{res}.norm1") + _linear(f"{ours}.res.in_conv", f"{res}.conv1")
    pairs += _linear(f"{ours}.res.emb_proj", f"{res}.time_emb_proj")
    pairs += _linear(f"{ours}.res.out_norm", f"{res}.norm2") + _linear(f"{ours}.res.out_conv", f"{res}.conv2")
    pairs += _linear(f"{ours}.res.skip.proj", f"{res}.conv_shortcut")
    for stage in range(config.temporal_conv_layers):
        conv = f"{theirs}.temp_convs.{j}.conv{stage + 1}"
        pairs += _linear(f"{ours}.res.temporal.stages.{stage}.norm", f"{conv}.0")
        pairs += _linear(f"{ours}.res.temporal.stages.{stage}.conv", f"{conv}.{2 if stage == 0 else 3}")
    if attention:
        pairs += _spatial(f"{ours}.spatial", f"{theirs}.attentions.{j}")
        pairs += _temporal(f"{ours}.temporal", f"{theirs}.temp_attentions.{j}")
    return pairs


def _attention(ours: str, theirs: str, *, cross: bool) -> Pairs:
    q, k, v = (f"{theirs}.to_{n}.weight" for n in "qkv")
    pairs: Pairs = (
        [([f"{ours}.q.weight"], [q]), ([f"{ours}.kv.weight"], [k, v])]
        if cross
        else [([f"{ours}.qkv.weight"], [q, k, v])]
    )
    return pairs + _linear(f"{ours}.out", f"{theirs}.to_out.0")


def _feed_forward(ours: str, theirs: str) -> Pairs:
    pairs: Pairs = [
        ([f"{ours}.fc1.{n}", f"{ours}.fc_gate.{n}"], [f"{theirs}.net.0.proj.{n}"]) for n in ("weight", "bias")
    ]
    return pairs + _linear(f"{ours}.fc2", f"{theirs}.net.2")


def _spatial(ours: str, theirs: str) -> Pairs:
    block = f"{theirs}.transformer_blocks.0"
    pairs = _linear(f"{ours}.norm", f"{theirs}.norm") + _linear(f"{ours}.proj_in", f"{theirs}.proj_in")
    pairs += _linear(f"{ours}.norm_self", f"{block}.norm1") + _attention(
        f"{ours}.self_attn", f"{block}.attn1", cross=False
    )
    pairs += _linear(f"{ours}.norm_cross", f"{block}.norm2") + _attention(
        f"{ours}.cross_attn", f"{block}.attn2", cross=True
    )
    pairs += _linear(f"{ours}.norm_ff", f"{block}.norm3") + _feed_forward(f"{ours}.ff", f"{block}.ff")
    return pairs + _linear(f"{ours}.proj_out", f"{theirs}.proj_out")


def _temporal(ours: str, theirs: str) -> Pairs:
    block = f"{theirs}.transformer_blocks.0"
    pairs = _linear(f"{ours}.norm", f"{theirs}.norm") + _linear(f"{ours}.proj_in", f"{theirs}.proj_in")
    pairs += _linear(f"{ours}.norm_attn", f"{block}.norm1") + _attention(
        f"{ours}.attn", f"{block}.attn1", cross=False
    )
    pairs += _linear(f"{ours}.norm_attn2", f"{block}.norm2") + _attention(
        f"{ours}.attn2", f"{block}.attn2", cross=False
    )
    pairs += _linear(f"{ours}.norm_ff", f"{block}.norm3") + _feed_forward(f"{ours}.ff", f"{block}.ff")
    return pairs + _linear(f"{ours}.proj_out", f"{theirs}.proj_out")


def convert(
    source: dict[str, Tensor],
    target_shapes: dict[str, torch.Size],
    pairs: Pairs,
    *,
    where: str,
    keep_initial: frozenset[str] = frozenset(),
) -> dict[str, Tensor]:
    """Map `source` tensors onto the keys of `target_shapes` through `pairs` (source keys, target
    keys). Source keys no pair uses and target keys no pair fills (other than `keep_initial`, which
    keep the model's initialisation) are errors naming them; so is a size mismatch (both shapes)."""
    out: dict[str, Tensor] = {}
    used: set[str] = set()
    for src_keys, dst_keys in pairs:
        if all(k in source for k in src_keys) and all(k in target_shapes for k in dst_keys):
            joined = torch.cat([source[k].reshape(source[k].shape[0], -1) for k in src_keys])
            given = ", ".join(f"{k} {tuple(source[k].shape)}" for k in src_keys)
            _split_into(joined, dst_keys, target_shapes, f"{where}: {given}", out)
            used.update(src_keys)
    unknown = sorted(set(source) - used)
    missing = sorted(set(target_shapes) - set(out) - keep_initial)
    if unknown or missing:
        raise ValueError(f"{where}: unknown key(s) {_listing(unknown)}; missing key(s) {_listing(missing)}")
    return out


def _listing(keys: list[str]) -> str:
    return str(keys[:8]) + (f" and {len(keys) - 8} more" if len(keys) > 8 else "")


def _split_into(
    joined: Tensor,
    dst_keys: list[str],
    shapes: dict[str, torch.Size],
    given: str,
    out: dict[str, Tensor],
) -> None:
    sizes = [shapes[k][0] if len(shapes[k]) else 1 for k in dst_keys]
    numel = sum(shapes[k].numel() for k in dst_keys)
    if joined.numel() != numel or joined.shape[0] != sum(sizes):
        wanted = " + ".join(f"{k} {tuple(shapes[k])}" for k in dst_keys)
        raise ValueError(f"{given} does not fit {wanted}")
    for key, part in zip(dst_keys, joined.split(sizes)):
        out[key] = part.reshape(shapes[key]).clone()


def load_unet(folder: Path, diffusers_config: dict[str, Any], *, image: bool = False) -> UNet3D:
    """A `unet3d` holding the diffusers U-Net in `folder` (a 2-D one inflated: temporal layers
    keep their zero-initialised identity; with `image`, a 2-D one becomes a `unet3d` without
    temporal layers, an image network such as VideoFusion's base generator)."""
    config = unet3d_config(diffusers_config, str(folder / "config.json"))
    if image:
        if diffusers_config["_class_name"] != UNET2D_CLASS:
            raise ValueError(f"{folder}/config.json: an image network comes from a {UNET2D_CLASS}, not a {diffusers_config['_class_name']}")
        config = dataclasses.replace(config, temporal_conv=False, temporal_attention=False, input_temporal=None)
    model = UNet3D(config)
    weights = weights_file(folder)
    source = load_file(str(weights))
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    pairs = [(theirs, ours) for ours, theirs in key_pairs(config)]
    keep = (
        frozenset(_temporal_keys(shapes)) if diffusers_config["_class_name"] == UNET2D_CLASS else frozenset()
    )
    state = convert(source, shapes, pairs, where=str(weights), keep_initial=keep)
    model.load_state_dict({**model.state_dict(), **state})
    return model


def grow_inputs(model: UNet3D, *, in_channels: int, num_levels: int) -> UNet3D:
    """`model` with more input channels and a level embedding, both zero-initialised, so that its
    output is unchanged while the new channels are zero and whatever level is given (an inflated
    image U-Net becomes LVDM's masked model: latents + mask channel, perturbation level s)."""
    config = model.config
    if in_channels < config.in_channels or (config.num_levels and num_levels != config.num_levels):
        raise ValueError(
            f"cannot grow a unet3d of in_channels={config.in_channels}, num_levels={config.num_levels} "
            f"to in_channels={in_channels}, num_levels={num_levels}"
        )
    grown = UNet3D(dataclasses.replace(config, in_channels=in_channels, num_levels=num_levels))
    state = model.state_dict()
    weight = state["input_conv.weight"]  # (C, C_in, 3, 3)
    extra = weight.new_zeros(weight.shape[0], in_channels - weight.shape[1], *weight.shape[2:])
    state["input_conv.weight"] = torch.cat([weight, extra], dim=1)
    if num_levels and not config.num_levels:
        state["level_embed.weight"] = torch.zeros_like(grown.level_embed.weight)
    grown.load_state_dict(state)
    return grown


def _temporal_keys(keys: dict[str, torch.Size]) -> list[str]:
    return [k for k in keys if k.startswith("input_temporal.") or ".temporal." in k]


def weights_file(folder: Path) -> Path:
    """The safetensors weights of a diffusers / transformers model folder."""
    found = sorted(folder.glob("*.safetensors"))
    if len(found) != 1:
        raise FileNotFoundError(
            f"{folder}: expected one *.safetensors weights file, found {[p.name for p in found]}"
        )
    return found[0]
