"""Bind a pipeline's network, the prompt and the guidance into the `denoise_fn(x, t)` the strategies call.

Text classifier-free guidance uses the empty prompt as the unconditional branch;
LVDM's masked networks are bound as `MaskedPredictFn`s, their unconditional guidance is applied
by the strategy (`sampler.strategies.lvdm`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from model_zoo.diffusion.guidance import Guide, cfg
from model_zoo.diffusion.image_condition import with_image_condition
from model_zoo.diffusion.samplers import DenoiseFn
from model_zoo.unet3d import UNet3D
from sampler.pipeline import Pipeline

if TYPE_CHECKING:  # an annotation only: the strategies package imports this module
    from sampler.strategies.lvdm import MaskedPredictFn


TextBranch = Callable[[dict[str, Tensor]], DenoiseFn]
"""`branch(text)`: the denoiser with the text keywords `Pipeline.text_inputs` gives bound."""


def with_text_guidance(
    branch: TextBranch,
    pipeline: Pipeline,
    prompt: str,
    guidance: float,
    guide: Guide = cfg,
) -> DenoiseFn:
    """`branch(text)` for the prompt, wrapped in CFG against the empty prompt (with the empty
    prompt's own token mask) unless g = 1 or no text."""
    text = pipeline.text_inputs(prompt)
    if not text or guidance == 1.0:
        return branch(text)
    return guide(branch(text), branch(pipeline.text_inputs("")), guidance)


def denoiser_network(pipeline: Pipeline, image_latent: Tensor | None = None) -> Callable[..., Tensor]:
    """The pipeline's denoiser; an image-conditioned one (`Pipeline.image_conditioning`) with its
    condition channels bound: `image_latent` (1, C, h, w) in frame 0, or none (all zeros)."""
    if not pipeline.image_conditioning:
        return pipeline.denoiser
    return with_image_condition(pipeline.denoiser, image_latent)


def text_denoiser(
    pipeline: Pipeline, prompt: str, guidance: float, guide: Guide = cfg, image_latent: Tensor | None = None
) -> DenoiseFn:
    """A text-to-video denoiser (unet3d, videofusion, dit): x (B, C, T, h, w), t (B,) -> output;
    `image_latent`: the first frame's clean latent for an image-conditioned denoiser."""
    model = denoiser_network(pipeline, image_latent)

    def branch(text: dict[str, Tensor]) -> DenoiseFn:
        return lambda x, t: model(x, t, **text)

    return with_text_guidance(branch, pipeline, prompt, guidance, guide)


def conditioned_denoiser(
    model: Callable[..., Tensor], pipeline: Pipeline, prompt: str, guidance: float, guide: Guide = cfg, **cond: Tensor
) -> DenoiseFn:
    """`model(x, t, context=..., **cond)` with the prompt bound and text CFG (CMD's content model
    and motion DiT, whose dense condition is `cond_frame`)."""

    def branch(text: dict[str, Tensor]) -> DenoiseFn:
        return lambda x, t: model(x, t, **text, **cond)

    return with_text_guidance(branch, pipeline, prompt, guidance, guide)


def streaming_denoiser(
    pipeline: Pipeline,
    prompt: str,
    guidance: float,
    *,
    cond_latents: Tensor,
    anchor: Tensor | None,
    guide: Guide = cfg,
) -> DenoiseFn:
    """StreamingT2V: CAM reads `cond_latents` (B, C, F_cond, h, w), APM the `anchor` embedding (B, D)
    (None: the model without APM)."""
    model = pipeline.denoiser

    def branch(text: dict[str, Tensor]) -> DenoiseFn:
        return lambda x, t: model(x, t, **text, cond_latents=cond_latents, anchor=anchor)

    return with_text_guidance(branch, pipeline, prompt, guidance, guide)


def streaming_base(model: nn.Module) -> UNet3D:
    """StreamingT2V's frozen base on its own, without CAM and APM: a plain `unet3d` of the base's
    config whose tensors are the base's own (no copy). What APM adds inside the base's
    cross-attention layers (their α_l) is left out; every tensor of the plain U-Net must be there."""
    with torch.device("meta"):
        plain = UNet3D(model.config.base)
    names = plain.state_dict().keys()
    plain.load_state_dict(
        {k: v for k, v in model.base.state_dict().items() if k in names}, strict=True, assign=True
    )
    return plain.eval().requires_grad_(False)


def streaming_base_denoiser(
    pipeline: Pipeline, prompt: str, guidance: float, guide: Guide = cfg
) -> DenoiseFn:
    """StreamingT2V's base text-to-video U-Net alone (`streaming_base`), with the prompt and text CFG."""
    return conditioned_denoiser(streaming_base(pipeline.denoiser), pipeline, prompt, guidance, guide)


def lvdm_predict_fn(
    pipeline: Pipeline, prompt: str, guidance: float = 1.0, frame_stride: int | None = None
) -> MaskedPredictFn:
    """LVDM's masked network `(net_input (B, C+1, l, h, w), t, level) -> ε` with the prompt bound,
    and text CFG against the empty prompt on the same masked input and level unless g = 1 (then
    it is exactly the conditional network). LVDM's unconditional guidance (all masks zero) is
    applied around this by the strategy, so both guidances compose. A stride-conditioned network
    is told `frame_stride` (default: the highest stride it was trained at)."""
    model, no_condition = pipeline.denoiser, pipeline.uncond_level
    stride = frame_stride_input(pipeline, frame_stride)

    def branch(text: dict[str, Tensor]) -> MaskedPredictFn:
        def predict(net_input: Tensor, t: Tensor, level: Tensor | None) -> Tensor:
            if level is None and no_condition is not None:  # ε_u: the class training gave no-mask samples
                level = torch.full_like(t, no_condition)
            strides = {} if stride is None else {"stride": torch.full_like(t, stride)}
            return model(net_input, t, **text, level=level, **strides)

        return predict

    text = pipeline.text_inputs(prompt)
    if not text or guidance == 1.0:
        return branch(text)
    conditional, unconditional = branch(text), branch(pipeline.text_inputs(""))

    def guided(net_input: Tensor, t: Tensor, level: Tensor | None) -> Tensor:
        empty = unconditional(net_input, t, level)
        return empty + guidance * (conditional(net_input, t, level) - empty)

    return guided


def frame_stride_input(pipeline: Pipeline, frame_stride: int | None) -> int | None:
    """The frame stride to feed a stride-conditioned denoiser (None: the network takes none)."""
    if getattr(pipeline.denoiser, "stride_embed", None) is None:
        return None
    if frame_stride is not None:
        return frame_stride
    if pipeline.frame_strides is None:
        raise ValueError(f"{pipeline.path}: a stride-conditioned network, but model_index.json records no 'frame_stride'")
    return pipeline.frame_strides[1]


def counted(fn: Callable[..., Tensor], tick: Callable[[], object]) -> Callable[..., Tensor]:
    """`fn` that calls `tick()` after every call (progress over denoising steps)."""

    def wrapped(*args: Tensor) -> Tensor:
        out = fn(*args)
        tick()
        return out

    return wrapped
