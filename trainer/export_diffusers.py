"""`lvd export --format diffusers`: a run's checkpoint -> a folder diffusers'
`TextToVideoSDPipeline.from_pretrained` loads (ModelScope-layout unet3d, AutoencoderKL, CLIP text
encoder, DDIM scheduler). Runs diffusers has no pipeline class for are written in lvd's layout,
and the returned message says so. See docs/methods.md, 'Pretrained weights'."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import model_zoo
from common.files import replacing_folder
from model_zoo.importers import diffusers_export
from trainer.export import export


def export_diffusers(run_dir: Path, out: Path, *, step: int | None = None, ema: bool = False) -> tuple[Path, str]:
    """Write the diffusers folder of a run's checkpoint (or lvd's layout when diffusers has no
    class for it) and a sentence saying which was written."""
    with tempfile.TemporaryDirectory() as tmp:
        lvd = export(run_dir, Path(tmp) / "lvd", step=step, ema=ema)
        return out, lvd_to_diffusers(lvd, out)


def lvd_to_diffusers(lvd: Path, out: Path) -> str:
    """Write the lvd pipeline folder `lvd` into `out` as a TextToVideoSDPipeline folder, or as a
    copy of lvd's layout when diffusers has no class for it; a sentence saying which."""
    index = json.loads((lvd / "model_index.json").read_text())
    try:
        if index.get("task") != "diffusion":
            raise ValueError(f"task {index.get('task')!r} is not plain text-to-video diffusion")
        networks = {name: model_zoo.from_pretrained(lvd / name) for name in ("denoiser", "vae", "text_encoder")}
        with replacing_folder(out) as folder:
            _write_pipeline(networks, lvd, folder)
    except (ValueError, FileNotFoundError) as why:
        with replacing_folder(out) as folder:
            shutil.copytree(lvd, folder, dirs_exist_ok=True)
        return f"diffusers has no pipeline class for this run ({why}): wrote lvd's layout"
    return "wrote a diffusers TextToVideoSDPipeline folder"


def _write_pipeline(networks: dict, lvd: Path, folder: Path) -> None:
    import diffusers

    diffusers_export.write_unet(networks["denoiser"], folder / "unet")
    diffusers_export.write_vae(networks["vae"], folder / "vae")
    tokenizer = diffusers_export.write_text_encoder(networks["text_encoder"], folder)
    shutil.copytree(lvd / "scheduler", folder / "scheduler")
    index = {
        "_class_name": "TextToVideoSDPipeline",
        "_diffusers_version": diffusers.__version__,
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", tokenizer],
        "unet": ["diffusers", "UNet3DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
