"""The typed parameters of one `lvd sample` command (every knob of SPEC §4 is a field and a flag).

Frame-count knobs of the strategies (l, k, N, M, F, O, chunk lengths, keyframe stride) count
*latent* frames; only `frames` counts pixel frames (a video VAE with time downsampling f_t
needs ⌈frames / f_t⌉ latent frames).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

Strategy = Literal["lvdm-autoregressive", "lvdm-hierarchical", "vidrd", "streaming", "videofusion", "ddim"]
STRATEGIES: tuple[str, ...] = (
    "lvdm-autoregressive",
    "lvdm-hierarchical",
    "vidrd",
    "streaming",
    "videofusion",
    "ddim",
)
PARALLEL_STRATEGIES = ("lvdm-hierarchical", "streaming")
"""Strategies whose units of one video (gaps, blending chunks) are split over ranks; the others
split whole prompts over ranks (and run the leftover prompts on all ranks in lockstep)."""
RUNTIME_FIELDS = ("nproc", "progress")
"""Fields that do not change the result: a resumed run may differ in them."""


@dataclass(frozen=True, kw_only=True)
class SampleConfig:
    """One sampling command; `asdict` of it goes into `<out>.json` and `<out>.parts/params.json`."""

    model: str
    """Exported pipeline folder (`lvd export`): the prediction model for LVDM, the StreamingT2V model."""
    model2: str | None = None
    """Second pipeline: LVDM's interpolation model (hierarchical), StreamingT2V's refiner."""
    strategy: Strategy = "ddim"
    """Long-video strategy (SPEC §4)."""
    frames: int = 16
    """Pixel frames of each output video."""
    prompts: tuple[str, ...] = ("",)
    """One video per prompt."""
    out: str = "sample.mp4"
    """Output mp4; with several prompts video i goes to `<stem>-<i:03d>.mp4`."""
    seed: int = 0
    """Base seed; video i uses seed + i, and every unit of work its own stream of it."""
    nproc: int = 1
    """Local ranks to launch (ignored under torchrun / srun, whose environment sets the ranks)."""
    steps: int = 50
    """DDIM steps (SPEC §4: 50)."""
    eta: float = 0.0
    """DDIM η (LVDM's long-video script used 1.0)."""
    guidance: float = 7.5
    """Text classifier-free guidance g (VidRD 10, StreamingT2V 7.5); 1 disables it."""
    height: int = 256
    """Pixel height (a multiple of the VAE's spatial factor)."""
    width: int = 256
    """Pixel width (a multiple of the VAE's spatial factor)."""
    fps: int = 8
    """Frame rate written into the mp4."""
    decode_context: int = 1
    """Latent frames of the previous chunk prepended when decoding a chunk (then cut off), so a
    3-D VAE sees temporal context across chunk borders."""
    clip_frames: int | None = None
    """l (LVDM), N (VidRD), window N (VideoFusion), chunk length (StreamingT2V); None: strategy default."""
    cond_frames: int = 1
    """k: latent frames an LVDM prediction clip is conditioned on."""
    perturb_level: int = 100
    """s: LVDM's conditional latent perturbation level at sampling."""
    uncond_weight: float = 0.1
    """w: LVDM's unconditional guidance ε_c + w(ε_c - ε_u)."""
    keyframe_stride: int = 3
    """LVDM hierarchical: latent frames between keyframes (interpolation clip = stride + 1)."""
    overlap: int = 4
    """M: VidRD's overlap frames."""
    alpha: float = 4.0
    """α: VidRD's past-dependent noise sampling strength."""
    beta: float = 0.4
    """β: VidRD's staged-guidance fraction of the steps."""
    lam: float | None = None
    """λ: VideoFusion's base-noise share; None takes the model's own λ."""
    blend_frames: int = 24
    """F: StreamingT2V refinement chunk length."""
    blend_overlap: int = 8
    """O: StreamingT2V refinement overlap."""
    refine_t: int = 600
    """T': SDEdit start timestep of StreamingT2V's refinement (the DDIM steps with t <= T')."""
    refine: bool = True
    """Run StreamingT2V's randomised-blending refinement after the autoregressive stage."""
    device: str = "auto"
    """cpu, cuda, cuda:N, or auto (cuda when available)."""
    progress: bool = True
    """Progress on the rank that writes: tqdm bars on a terminal, plain lines otherwise."""

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {self.strategy!r}; valid: {', '.join(STRATEGIES)}")
        if self.frames < 1 or self.steps < 1 or self.nproc < 1:
            raise ValueError("frames, steps and nproc must be >= 1")
        if self.strategy == "lvdm-hierarchical" and self.model2 is None:
            raise ValueError("lvdm-hierarchical needs --model2 (the interpolation model)")
        if not self.prompts:
            raise ValueError("give at least one prompt")

    def result_params(self) -> dict[str, Any]:
        """The parameters that determine the videos (what a resumed run must repeat)."""
        params = asdict(self)
        for name in RUNTIME_FIELDS:
            params.pop(name)
        params["prompts"] = list(self.prompts)
        return params


def trained_size(folder: str | Path) -> tuple[int, int] | None:
    """(height, width) of the clips the pipeline was trained on (`lvd export` records it), if known."""
    index_file = Path(folder) / "model_index.json"
    if not index_file.is_file():
        return None
    size = json.loads(index_file.read_text()).get("sample_size")
    return None if not size else (int(size["height"]), int(size["width"]))
