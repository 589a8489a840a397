"""Every network of the five papers, from CPU-tiny flavours to billion-parameter flavours.

Single-device PyTorch only: parallelism is applied from outside by the trainer.
"""

# Family modules register themselves on import (the registry decorator).
from model_zoo import (  # noqa: F401
    causal_vae,
    cmd,
    dit,
    hf_encoders,
    streaming,
    temporal_decoder_vae,
    text_encoder,
    unet3d,
    video_dit,
    video_vae,
    videofusion,
)
from model_zoo.counting import count_parameters, estimate_flops
from model_zoo.pretrained import from_pretrained, load_config, save_pretrained
from model_zoo.registry import build_from_config, build_model, get_family, list_models, make_config

__all__ = [
    "build_from_config",
    "build_model",
    "count_parameters",
    "estimate_flops",
    "from_pretrained",
    "get_family",
    "list_models",
    "load_config",
    "make_config",
    "save_pretrained",
]
