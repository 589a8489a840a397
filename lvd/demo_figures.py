"""The demo's figures against their goals, and the contact sheets of its videos.

    VAE reconstruction of the held-out clips      PSNR >= 25 dB at 64x64 (SSIM beside it)
    text-to-video frame FID vs held-out frames    <= 0.5 x the FID of the untrained denoiser
      (beside it, what the FID can reach: real training frames, and the VAE's reconstructions of
      them, against the held-out frames; and the denoisers against the VAE's reconstructions)
    motion of the text-to-video samples           mean frame-to-frame L1 in 0.5-2 x that of real clips
    SCuts of each 128-frame long video            <= 1

In `--quick` the same figures are computed and reported, but none has a goal: quick only proves
the chain.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from lvd.demo_data import read_mp4, real_clips
from lvd.demo_metrics import fid, frame_features, motion_l1, psnr, reconstruct, ssim
from lvd.demo_report import Figure, Sheet

if TYPE_CHECKING:
    from lvd.demo import Paths, Sizes, Videos

PSNR_GOAL = 25.0
FID_RATIO_GOAL = 0.5
MOTION_RANGE = (0.5, 2.0)
SCUTS_GOAL = 1


def _goal(full: bool, met: bool) -> bool | None:
    return met if full else None


Say = Callable[[str], None]


def vae_figures(paths: Paths, sizes: Sizes, full: bool, say: Say) -> tuple[list[Figure], Sheet]:
    """PSNR and SSIM of the exported VAE on the held-out clips, and a sheet of some of them."""
    held_out, _ = real_clips(paths.held_out, sizes.clip_frames, sizes.shard_size)
    recon = reconstruct(paths.export / "vae" / "vae", held_out)
    value = psnr(held_out, recon)
    say(f"VAE reconstruction of {len(held_out)} held-out clips: PSNR {value:.2f} dB")
    details = {"clips": len(held_out), "frames": sizes.clip_frames, "size": sizes.shard_size}
    figures = [
        Figure(name="vae_psnr_db", value=value, goal=f">= {PSNR_GOAL} dB on held-out clips at {sizes.shard_size}x{sizes.shard_size}" if full else "none (quick)", met=_goal(full, value >= PSNR_GOAL), details=details),
        Figure(name="vae_ssim", value=ssim(held_out, recon), goal="reported beside the PSNR", met=None, details=details),
    ]
    rows = []
    for number in range(min(3, len(held_out))):
        rows += [(f"held-out {number}: real", held_out[number]), (f"held-out {number}: VAE", recon[number])]
    return figures, Sheet(title="VAE reconstruction of held-out clips", rows=rows)


def sample_figures(paths: Paths, sizes: Sizes, videos: Videos, full: bool, say: Say) -> tuple[list[Figure], list[np.ndarray], list[np.ndarray]]:
    """FID of the trained and untrained samples against the held-out frames, and their motion."""
    held_out, _ = real_clips(paths.held_out, sizes.clip_frames, sizes.size, limit=sizes.fid_reference_clips)
    train, _ = real_clips(paths.train, sizes.clip_frames, sizes.size)
    trained = [read_mp4(p)[: sizes.clip_frames] for p in videos.trained]
    untrained = [read_mp4(p)[: sizes.clip_frames] for p in videos.untrained]
    features = {}
    for name, clips in (("held-out real", held_out), ("trained-denoiser", np.stack(trained)), ("untrained-denoiser", np.stack(untrained))):
        start = time.perf_counter()
        features[name] = frame_features(clips)
        say(f"Inception features of {len(features[name])} {name} frames in {time.perf_counter() - start:.0f} s")
    reference = features["held-out real"]
    fid_trained, fid_untrained = fid(features["trained-denoiser"], reference), fid(features["untrained-denoiser"], reference)
    ratio = fid_trained / fid_untrained
    say(f"frame FID vs held-out frames: trained {fid_trained:.1f}, untrained {fid_untrained:.1f} (ratio {ratio:.2f})")
    frames = {"sample_frames": len(trained) * sizes.clip_frames, "held_out_frames": int(np.prod(held_out.shape[:2])), "size": sizes.size}
    scored = train[: sizes.fid_reference_clips]  # quick: as few clips as the FID's reference
    bounds = fid_bounds(paths, scored, held_out, features, say)
    floor = {"train_frames": int(np.prod(scored.shape[:2])), "held_out_frames": frames["held_out_frames"], "size": sizes.size}
    real_motion = motion_l1(np.concatenate([train, held_out]))
    motion = motion_l1(np.stack(trained))
    low, high = MOTION_RANGE
    figures = [
        Figure(name="t2v_fid", value=fid_trained, goal=f"<= {FID_RATIO_GOAL} x untrained FID" if full else "none (quick)",
               met=_goal(full, ratio <= FID_RATIO_GOAL), details={"untrained_fid": fid_untrained, "ratio": ratio, **frames}),
        Figure(name="t2v_fid_untrained", value=fid_untrained, goal="baseline of t2v_fid", met=None, details=frames),
        Figure(name="t2v_motion_l1", value=motion, goal=f"{low}-{high} x real clips' frame-to-frame L1" if full else "none (quick)",
               met=_goal(full, low * real_motion <= motion <= high * real_motion),
               details={"real_l1": real_motion, "ratio": motion / real_motion, "untrained_l1": motion_l1(np.stack(untrained))}),
        Figure(name="t2v_fid_floor_real", value=bounds["real"], goal="reported: FID of the real training frames (a perfect denoiser and VAE)",
               met=None, details={"ratio_to_untrained": bounds["real"] / fid_untrained, **floor}),
        Figure(name="t2v_fid_floor_vae", value=bounds["vae"], goal="reported: FID of the VAE's reconstructions of the training clips (a perfect denoiser)",
               met=None, details={"ratio_to_untrained": bounds["vae"] / fid_untrained, **floor}),
        Figure(name="t2v_fid_denoiser", value=bounds["trained"], goal="reported: trained samples vs the VAE's reconstructions of the held-out clips",
               met=None, details={"untrained": bounds["untrained"], "ratio": bounds["trained"] / bounds["untrained"], **frames}),
    ]
    return figures, trained, untrained


def fid_bounds(paths: Paths, train: np.ndarray, held_out: np.ndarray, features: dict[str, np.ndarray], say: Say) -> dict[str, float]:
    """What the frame FID can reach: the real training frames against the held-out ones (the
    data's own spread), the VAE's reconstructions of the training clips against them (the best
    any denoiser can do through this VAE), and both denoisers against the VAE's reconstructions
    of the held-out clips (the denoiser judged on what the VAE can express)."""
    vae = paths.export / "vae" / "vae"
    reference = features["held-out real"]
    through_vae = frame_features(reconstruct(vae, held_out))
    bounds = {
        "real": fid(frame_features(train), reference),
        "vae": fid(frame_features(reconstruct(vae, train)), reference),
        "trained": fid(features["trained-denoiser"], through_vae),
        "untrained": fid(features["untrained-denoiser"], through_vae),
    }
    say(f"frame FID bounds: real training frames {bounds['real']:.1f}, their VAE reconstructions {bounds['vae']:.1f}; "
        f"against the VAE's held-out reconstructions: trained {bounds['trained']:.1f}, untrained {bounds['untrained']:.1f}")
    return bounds


def scuts_figures(metrics: dict[str, Any], videos: Videos, full: bool) -> list[Figure]:
    """SCuts of each long video from `lvd eval`'s output."""
    per_video = metrics.get("scuts", {}).get("per_video", {})
    figures = []
    for name, path in (("lvdm_hierarchical", videos.hierarchical), ("vidrd", videos.vidrd)):
        value = per_video.get(str(path))
        cuts = value if isinstance(value, (int, float)) else (value or {}).get("cuts") if isinstance(value, dict) else None
        figures.append(Figure(
            name=f"scuts_{name}", value=None if cuts is None else float(cuts), goal=f"<= {SCUTS_GOAL} cut in the long video" if full else "none (quick)",
            met=_goal(full, cuts is not None and cuts <= SCUTS_GOAL), details={"frames": len(read_mp4(path))},
        ))
    return figures


def compute(paths: Paths, sizes: Sizes, videos: Videos, metrics: dict[str, Any], say: Say = print) -> tuple[list[Figure], list[Sheet]]:
    """Every figure and every contact sheet of the report (`say` gets a line per part)."""
    from lvd.demo import QUICK

    full = sizes is not QUICK
    vae, vae_sheet = vae_figures(paths, sizes, full, say)
    samples, trained, untrained = sample_figures(paths, sizes, videos, full, say)
    train, captions = real_clips(paths.train, sizes.clip_frames, sizes.size)
    real_rows = _one_per_caption(train, captions)
    prompts = (paths.samples / "prompts.txt").read_text().splitlines()
    sheets = [
        Sheet(title="text-to-video samples (trained denoiser)", rows=[(f"t2v: {p}", c) for p, c in zip(prompts, trained, strict=False)] + real_rows),
        Sheet(title="text-to-video samples (untrained denoiser)", rows=[(f"untrained: {p}", c) for p, c in zip(prompts, untrained, strict=False)] + real_rows),
    ]
    for title, path in (("lvdm-hierarchical", videos.hierarchical), ("vidrd", videos.vidrd)):
        frames = read_mp4(path)
        parts = np.array_split(np.arange(len(frames)), 4)
        rows = [(f"{title} {idx[0]}-{idx[-1]}", frames[idx]) for idx in parts]
        sheets.append(Sheet(title=f"{title}: {len(frames)} frames", rows=rows + real_rows))
    sheets.append(vae_sheet)
    return vae + samples + scuts_figures(metrics, videos, full), sheets


def _one_per_caption(clips: np.ndarray, captions: list[str]) -> list[tuple[str, np.ndarray]]:
    seen: dict[str, int] = {}
    for number, caption in enumerate(captions):
        seen.setdefault(caption, number)
    return [(f"real: {caption}", clips[number]) for caption, number in seen.items()]
