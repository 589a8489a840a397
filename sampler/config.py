"""The typed parameters of one `lvd sample` command: the command-wide knobs, and the chosen
strategy's own config (its dataclass in `sampler/strategies/<name>.py`).

Frame-count knobs of the strategies (l, k, N, M, F, O, chunk lengths, keyframe stride) count
*latent* frames; only `frames` counts pixel frames (a video VAE with time downsampling f_t
needs ⌈frames / f_t⌉ latent frames).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from common.pipeline_folder import is_pipeline_folder, read_index
from sampler.pipeline import recorded_size
from sampler.strategies import STRATEGIES
from sampler.strategies.common import DIFFUSION_SAMPLERS, FLOW_SAMPLERS

SAMPLERS = (*DIFFUSION_SAMPLERS, *FLOW_SAMPLERS)
"""Every `--sampler` choice."""

RUNTIME_FIELDS = ("nproc", "progress", "sp", "sp_ring")
"""Fields that do not change the result: a resumed run may differ in them."""


@dataclass(frozen=True, kw_only=True)
class SampleConfig:
    """One sampling command; its result parameters go into `<out>.json` and `<out>.parts/params.json`."""

    model: str
    """Exported pipeline folder (`lvd export`): the prediction model for LVDM, the StreamingT2V model."""
    model2: str | None = None
    """Second pipeline: LVDM's interpolation model (lvdm-hierarchical), StreamingT2V's high-resolution
    text-to-video refiner (streaming, unless --no-refine)."""
    lora: str | None = None
    """LoRA adapter folder (`lvd export` of a LoRA run, peft layout) merged into --model's denoiser,
    which must be the base it was trained on."""
    lora_scale: float = 1.0
    """Factor of the LoRA update (0: the base alone)."""
    strategy: str = field(default="ddim", metadata={"choices": tuple(STRATEGIES)})
    """Long-video strategy (docs/methods.md §6)."""
    frames: int = 16
    """Pixel frames of each output video."""
    prompts: tuple[str, ...] = field(metadata={"flag": False})
    """One video per prompt."""
    out: str
    """Output .mp4; with several prompts video i goes to `<stem>-<i:03d>.mp4`."""
    seed: int = 0
    """Base seed; video i uses seed + i, and every unit of work its own stream of it."""
    nproc: int = 1
    """Local ranks to launch (ignored under torchrun / srun, whose environment sets the ranks)."""
    sp: int = 1
    """Sequence-parallel degree: each group of `sp` consecutive ranks runs every denoising forward
    of a DiT --model together (Ulysses); the strategy's own rank parallelism runs over the groups
    (ranks / sp of them). The number of ranks must be divisible by it."""
    sp_ring: int = 1
    """Ring degree of --sp: 1 is Ulysses alone (the heads must be divisible by --sp), --sp pure ring
    attention (any head count), between them the hybrid (Ulysses over --sp / --sp-ring ranks, a
    ring over --sp-ring). Must divide --sp."""
    steps: int = 50
    """Sampling steps (denoising calls; Heun makes two per step but the last)."""
    eta: float = 0.0
    """DDIM η (LVDM's long-video script used 1.0)."""
    sampler: str | None = field(
        default=None,
        metadata={"choices": SAMPLERS, "flag_default": "ddim for ε/v/x0 models, euler for flow-matching models"},
    )
    """--model's sampler: ddim or dpmpp_2m (DPM-Solver++(2M)) for ε/v/x0 models, euler or heun for
    flow-matching models (--model2 uses its model's default)."""
    shift: float | None = field(default=None, metadata={"flag_default": "the --model export's"})
    """Timestep shift s of a flow-matching --model, t' = s t / (1 + (s-1) t)."""
    image: str | None = None
    """PNG/JPEG image that conditions the first frame (image-to-video), fitted to --height/--width by
    scaling and center-cropping: --strategy ddim with an image-conditioned --model (objective.image_rate),
    or lvdm-autoregressive (the image's latent as the first clip's condition)."""
    guidance: float = 7.5
    """Text classifier-free guidance scale g (VidRD 10, StreamingT2V 7.5); 1 disables it."""
    height: int = field(default=256, metadata={"flag_default": "the --model's training size"})
    """Pixel height (a multiple of the VAE's spatial factor)."""
    width: int = field(default=256, metadata={"flag_default": "the --model's training size"})
    """Pixel width (a multiple of the VAE's spatial factor)."""
    fps: int = 8
    """Frame rate written into the mp4."""
    device: str = "auto"
    """cpu, cuda, cuda:N, or auto (cuda when available)."""
    decode_context: int = 1
    """Latent frames of the previous chunk prepended when decoding a chunk (then cut off), so a
    3-D VAE sees temporal context across chunk borders."""
    progress: bool = field(default=True, metadata={"alias": "--quiet"})
    """Progress on the rank that writes: tqdm bars on a terminal, plain 'lvd sample:' lines otherwise."""
    strategy_config: Any = field(default=None, metadata={"flag": False})
    """The strategy's own knobs, an instance of its `STRATEGIES[strategy].config`; None: its defaults."""

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {self.strategy!r}; valid: {', '.join(STRATEGIES)}")
        spec = STRATEGIES[self.strategy]
        if self.strategy_config is None:
            object.__setattr__(self, "strategy_config", spec.config())
        if type(self.strategy_config) is not spec.config:
            raise ValueError(f"--strategy {self.strategy} takes a {spec.config.__name__}, not {self.strategy_config!r}")
        if self.frames < 1 or self.steps < 1 or self.nproc < 1:
            raise ValueError("frames, steps and nproc must be >= 1")
        if self.sp < 1 or (self.nproc > 1 and self.nproc % self.sp):
            raise ValueError(f"--sp {self.sp} must be >= 1 and divide --nproc {self.nproc}")
        if self.sp_ring < 1 or self.sp % self.sp_ring:
            raise ValueError(f"--sp-ring {self.sp_ring} must be >= 1 and divide --sp {self.sp}")
        if spec.needs_model2 and self.model2 is None:
            raise ValueError(f"{self.strategy} needs --model2 ({' or '.join(spec.model2_tasks)} export)")
        if not self.prompts:
            raise ValueError("give at least one prompt")

    def result_params(self) -> dict[str, Any]:
        """The parameters that determine the videos (what a resumed run must repeat): the command's
        and its strategy's, in one flat dict."""
        params = {
            spec.name: getattr(self, spec.name)
            for spec in fields(self)
            if spec.name not in (*RUNTIME_FIELDS, "strategy_config")
        }
        params["prompts"] = list(self.prompts)
        return {**params, **asdict(self.strategy_config)}


def trained_size(folder: str | Path) -> tuple[int, int] | None:
    """(height, width) of the clips the pipeline was trained on (`lvd export` records it), if known."""
    return recorded_size(read_index(folder).entries) if is_pipeline_folder(folder) else None
