"""`lvd demo`: the main job end to end on the real media that ./setup.sh installs.

    shard (real videos with scene split + captioned images as pseudo-videos)
    -> split the video clips into a training set and held-out clips (every 4th clip of a video)
    -> train a tiny video VAE on 2 ranks, on windows cut from the training clips at their own
       pixel scale -> export it (latent scale fitted)
    -> cache the VAE latents (posterior means) of the training clips at the denoisers' size
    -> train a text-to-video unet3d on the cached latents with DeepSpeed ZeRO-2 on 2 ranks
       (TensorBoard, EMA), then the LVDM prediction and interpolation models side by side
    -> export all; sample short clips for every caption from the trained and from an untrained
       denoiser (for the FID), and >= 128 frames with lvdm-hierarchical and with vidrd on 2 ranks
    -> lvd eval -> report.json (figures, goals, pass/fail) and report.html (contact sheets,
       loss curves, figures)

Every stage runs the real `lvd` subcommand in a subprocess (its output goes to logs/ and its
progress lines to the console; --quiet keeps only the stage titles and the summary) or a small
in-process step, and is skipped when its output already exists, so re-running continues instead
of redoing (training also resumes from its own checkpoints).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from common.files import replacing_folder
from common.pipeline_folder import read_index, write_index
from lvd.demo_stages import Echo, Job, Stage

REPO = Path(__file__).resolve().parent.parent
HELD_OUT_EVERY = 4
"""Every 4th clip of each source video is held out of all training."""


@dataclass(frozen=True)
class Sizes:
    shard_size: int
    """Short side of the sharded clips; the VAE trains on windows of them and is measured on
    held-out clips at this size."""
    size: int
    """Pixel height and width of the denoisers' clips and of every generated video (the clips
    are resized to it)."""
    clip_frames: int
    """Pixel frames per clip."""
    vae_steps: int
    vae_frames: int
    """Frames of the VAE's training crops (it is convolutional in time)."""
    vae_crop: int
    """Pixel side of the VAE's training windows, cut from the clips without resizing (it is
    convolutional in space: half the side is a quarter of the work per clip)."""
    vae_crops_per_clip: int
    vae_batch: int
    """Windows per rank per step."""
    vae_lr: float
    vae_latent_channels: int
    t2v_steps: int
    t2v_lr: float
    lvdm_steps: int
    lvdm_lr: float
    ema_decay: float
    sample_steps: int
    """DDIM steps of every sampled video."""
    guidance: float
    """Text CFG scale of the sampled videos."""
    prompts_per_caption: int
    """Short clips sampled per training caption for the FID and motion figures."""
    fid_reference_clips: int | None
    """Held-out clips whose frames are the FID's reference (None: every held-out clip)."""
    long_frames: int
    eval_metrics: str


FULL = Sizes(
    shard_size=64, size=32, clip_frames=16, vae_steps=2500, vae_frames=8, vae_crop=32, vae_crops_per_clip=8, vae_batch=4,
    vae_lr=2e-3, vae_latent_channels=8, t2v_steps=1500, t2v_lr=3e-3, lvdm_steps=250, lvdm_lr=3e-3, ema_decay=0.995,
    sample_steps=25, guidance=3.0, prompts_per_caption=2, fid_reference_clips=None, long_frames=128, eval_metrics="scuts,mawe",
)
"""The recipe measured in benchmarks/RESULTS.md ('The demo'): the VAE trains 2500 steps with the
squared error (held-out PSNR rose with steps and with L2: 25.2 dB at 64x64, against 23.4 dB for
600 L1 steps); the text-to-video model trains 1500 steps on 32x32 clips of cached posterior
means (600 steps gave grey blobs, 3000 gave the data's look but too little motion)."""
QUICK = Sizes(
    shard_size=32, size=32, clip_frames=8, vae_steps=10, vae_frames=8, vae_crop=16, vae_crops_per_clip=2, vae_batch=2, vae_lr=1e-3,
    vae_latent_channels=4, t2v_steps=12, t2v_lr=5e-4, lvdm_steps=8, lvdm_lr=5e-4, ema_decay=0.9,
    sample_steps=4, guidance=3.0, prompts_per_caption=1, fid_reference_clips=3, long_frames=128, eval_metrics="scuts,mawe",
)
"""Proves the chain only: every stage and figure runs, at sizes where process starts dominate.
The Inception features of the frame FID are the costliest part at these sizes (about 1 s per
frame on 2 busy cores), so the FID compares few frames: one clip per caption against 3
held-out clips."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lvd demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("demo_out"), help="folder for everything the demo writes")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and few steps (a few minutes): proves the chain only")
    parser.add_argument("--quiet", action="store_true", help="print only the stage titles and the summary, not their progress")
    parser.add_argument("--media", type=Path, default=Path(os.environ.get("LVD_MEDIA", REPO / ".cache" / "media")))
    return parser


def final_checkpoint(run_dir: Path, steps: int) -> Path:
    """Exists once the run has finished (an interrupted run is resumed by the same stage)."""
    return run_dir / "checkpoints" / f"step_{steps:08d}" / "COMPLETE"


def brace(manifest: Path) -> str:
    """The brace URL of a shard folder's shards, from its manifest."""
    shards = [s["path"] for s in json.loads(manifest.read_text())["shards"]]
    stems = sorted(Path(s).stem for s in shards)
    prefix = stems[0].rsplit("-", 1)[0]
    first, last = stems[0].rsplit("-", 1)[1], stems[-1].rsplit("-", 1)[1]
    return f"{manifest.parent}/{prefix}-{{{first}..{last}}}.tar"


def add_vae(pipeline: Path, vae_export: Path) -> None:
    """Put the exported VAE into a pipeline trained on cached latents (its run had no VAE)."""
    index = read_index(pipeline)
    if "vae" not in index.components:
        shutil.copytree(vae_export / "vae", pipeline / "vae", dirs_exist_ok=True)
        components = {**index.components, "vae": read_index(vae_export).components["vae"]}
        write_index(pipeline, task=index.task, components=components, scheduler=index.scheduler, entries=index.entries)


def untrained_copy(pipeline: Path, out: Path, seed: int = 0) -> None:
    """The pipeline with its denoiser replaced by a freshly initialised one of the same config."""
    import torch

    from model_zoo.pretrained import build_from_config, load_config, save_pretrained

    index = read_index(pipeline)
    with replacing_folder(out) as folder:
        shutil.copytree(pipeline, folder, dirs_exist_ok=True)
        torch.manual_seed(seed)
        save_pretrained(build_from_config(load_config(pipeline / "denoiser")), folder / "denoiser")
        entries = {**index.entries, "untrained": True}
        write_index(folder, task=index.task, components=index.components, scheduler=index.scheduler, entries=entries)


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    sizes = QUICK if args.quick else FULL
    out = args.out.resolve()
    media = args.media.resolve()
    if not (media / "videos").is_dir() or not (media / "images").is_dir():
        print(f"lvd demo: no media in {media} (run ./setup.sh, which installs it)", file=sys.stderr)
        return 1
    start = time.perf_counter()
    stage = Stage(out, args.quiet)
    paths = Paths(out)
    shard_and_split(stage, paths, sizes, media)
    train_all(stage, paths, sizes)
    videos = sample_all(stage, paths, sizes)
    metrics = evaluate(stage, paths, sizes, videos)
    report = write_report(stage, paths, sizes, videos, metrics, start)
    summary(paths, videos, metrics, report, time.perf_counter() - start)
    return 0


class Paths:
    """Where every stage of the demo writes."""

    def __init__(self, out: Path):
        self.out = out
        self.shards, self.runs, self.export, self.videos = out / "shards", out / "runs", out / "export", out / "videos"
        self.train, self.held_out, self.latents = self.shards / "train", self.shards / "held_out", self.shards / "latents"
        self.vae_crops = self.shards / "vae_windows"
        self.samples = out / "samples"


def shard_and_split(stage: Stage, paths: Paths, sizes: Sizes, media: Path) -> None:
    """Shard the media, then split the video clips into training and held-out shards."""
    shards = paths.shards
    stage.run("shard real videos (scene split)", shards / "videos" / "manifest.json", [
        "shard", "videos", "--input", str(media / "videos"), "--out", str(shards / "videos"), "--scene-split",
        "--clip-frames", str(sizes.clip_frames), "--size", str(sizes.shard_size), "--shard-size-mb", "0.2",
    ])
    stage.run("shard captioned images as pseudo-videos", shards / "images" / "manifest.json", [
        "shard", "images", "--input", str(media / "images"), "--out", str(shards / "images"),
        "--frames", str(sizes.clip_frames), "--size", str(sizes.shard_size), "--shard-size-mb", "0.2",
    ])
    if stage.step(f"split the video clips: every {HELD_OUT_EVERY}th clip of a video held out", paths.held_out / "manifest.json"):
        from lvd.demo_data import split_shards

        counts = split_shards(shards / "videos", paths.train, paths.held_out, HELD_OUT_EVERY)
        stage.say(f"{counts['train']} training clips, {counts['held_out']} held-out clips")


def train_all(stage: Stage, paths: Paths, sizes: Sizes) -> None:
    """VAE, latent cache, then the text-to-video and the two LVDM models, and their exports."""
    runs, export = paths.runs, paths.export
    px = [f"data.height={sizes.size}", f"data.width={sizes.size}", "run.log_every=10"]
    vae_frames = min(sizes.vae_frames, sizes.clip_frames)
    if stage.step(f"cut {sizes.vae_crops_per_clip} windows of {sizes.vae_crop}x{sizes.vae_crop} px from each training clip (VAE data)", paths.vae_crops / "manifest.json"):
        from lvd.demo_data import crop_shards

        count = crop_shards(paths.train, paths.vae_crops, sizes.vae_crop, sizes.vae_crops_per_clip)
        stage.say(f"{count} windows in {paths.vae_crops}")
    crop = [f"data.height={sizes.vae_crop}", f"data.width={sizes.vae_crop}", "run.log_every=10"]
    stage.run("train the tiny video VAE on 2 ranks", final_checkpoint(runs / "vae", sizes.vae_steps), [
        "train", "--nproc", "2", "--config", "configs/tiny/autoencoder.yaml", f"run.dir={runs / 'vae'}",
        f"train.steps={sizes.vae_steps}", f"train.checkpoint_every={sizes.vae_steps}", f"train.lr={sizes.vae_lr}",
        f"train.micro_batch_size={sizes.vae_batch}", f"objective.disc_start={sizes.vae_steps + 1}", "objective.loss_type=l2",
        f"model.overrides={{latent_channels: {sizes.vae_latent_channels}}}",
        f"data.shards={paths.vae_crops}", "data.random_crop=true", f"data.frames={vae_frames}", *crop,
    ])
    stage.run("export the VAE (latent scale fitted)", export / "vae" / "model_index.json", ["export", "--run", str(runs / "vae"), "--out", str(export / "vae")])
    if stage.step("cache the VAE latents (posterior means) of the training clips", paths.latents / "manifest.json"):
        from lvd.demo_data import cache_mean_latents

        manifest = cache_mean_latents(paths.train, export / "vae" / "vae", paths.latents, sizes.clip_frames, sizes.size)
        stage.say(f"{manifest['samples']} latent clips in {paths.latents}")
    latent = [f"data.shards={paths.latents}", "data.latent=true", f"data.frames={sizes.clip_frames}", *px,
              f"model.overrides={{out_channels: {sizes.vae_latent_channels}}}", f"train.ema_decay={sizes.ema_decay}"]
    every = max(sizes.t2v_steps // 2, 1)
    stage.run("train text-to-video unet3d on the latents, ZeRO-2 on 2 ranks", final_checkpoint(runs / "t2v", sizes.t2v_steps), [
        "train", "--nproc", "2", "--config", "configs/tiny/unet3d.yaml", f"run.dir={runs / 't2v'}", "train.zero_stage=2",
        f"train.steps={sizes.t2v_steps}", f"train.checkpoint_every={every}", f"train.lr={sizes.t2v_lr}", *latent,
    ])
    stage.together([
        Job(f"train {task} (1 rank, beside the other)", final_checkpoint(runs / task, sizes.lvdm_steps), [
            "train", "--config", f"configs/tiny/{task}.yaml", f"run.dir={runs / task}", f"train.steps={sizes.lvdm_steps}",
            f"train.checkpoint_every={sizes.lvdm_steps}", f"train.lr={sizes.lvdm_lr}", *latent,
        ])
        for task in ("lvdm_prediction", "lvdm_interpolation")
    ])
    for name in ("t2v", "lvdm_prediction", "lvdm_interpolation"):
        stage.run(f"export {name} (EMA weights)", export / name / "model_index.json", ["export", "--run", str(runs / name), "--ema", "--out", str(export / name)])
        add_vae(export / name, export / "vae")


@dataclass(frozen=True)
class Videos:
    trained: list[Path]
    untrained: list[Path]
    hierarchical: Path
    vidrd: Path


def caption_prompts(paths: Paths, sizes: Sizes) -> list[str]:
    """Each training caption `sizes.prompts_per_caption` times, in a fixed order."""
    from data_pipeline.tario import iter_samples
    from lvd.demo_data import shard_paths

    captions = sorted({s.files.get("txt", b"").decode() for p in shard_paths(paths.held_out) for s in iter_samples(p)} - {""})
    return [caption for caption in captions for _ in range(sizes.prompts_per_caption)]


def sample_all(stage: Stage, paths: Paths, sizes: Sizes) -> Videos:
    """Short clips of the trained and the untrained denoiser for every caption, and the long videos."""
    export, samples, videos = paths.export, paths.samples, paths.videos
    samples.mkdir(parents=True, exist_ok=True)
    videos.mkdir(parents=True, exist_ok=True)
    if stage.step("an untrained copy of the text-to-video denoiser (FID baseline)", export / "t2v_untrained" / "model_index.json"):
        untrained_copy(export / "t2v", export / "t2v_untrained")
    prompts = caption_prompts(paths, sizes)
    (samples / "prompts.txt").write_text("\n".join(prompts) + "\n")
    size = ["--height", str(sizes.size), "--width", str(sizes.size), "--nproc", "2", "--seed", "0"]
    short = ["--frames", str(sizes.clip_frames), "--steps", str(sizes.sample_steps), "--guidance", str(sizes.guidance), *size]
    names = [f"{i:03d}" for i in range(len(prompts))]
    for name in ("t2v", "t2v_untrained"):
        stage.run(f"sample {len(prompts)} short clips with {name}", samples / f"{name}-{names[-1]}.json", [
            "sample", "--model", str(export / name), "--strategy", "ddim", "--prompts", str(samples / "prompts.txt"),
            "--out", str(samples / f"{name}.mp4"), *short,
        ])
    long = ["--frames", str(sizes.long_frames), "--steps", str(sizes.sample_steps), "--guidance", str(sizes.guidance), *size]
    prompt = ["--prompt", "cyclists riding along a street, several different camera shots"]
    hierarchical, vidrd = videos / "lvdm-hierarchical.mp4", videos / "vidrd.mp4"
    stage.run("sample lvdm-hierarchical on 2 ranks", hierarchical.with_suffix(".json"), [
        "sample", "--model", str(export / "lvdm_prediction"), "--model2", str(export / "lvdm_interpolation"),
        "--strategy", "lvdm-hierarchical", "--out", str(hierarchical), *prompt, *long,
    ])
    stage.run("sample vidrd on 2 ranks", vidrd.with_suffix(".json"), [
        "sample", "--model", str(export / "t2v"), "--strategy", "vidrd", "--out", str(vidrd), *prompt, *long,
    ])
    return Videos(
        trained=[samples / f"t2v-{n}.mp4" for n in names], untrained=[samples / f"t2v_untrained-{n}.mp4" for n in names],
        hierarchical=hierarchical, vidrd=vidrd,
    )


def evaluate(stage: Stage, paths: Paths, sizes: Sizes, videos: Videos) -> Path:
    """`lvd eval` of the two long videos (SCuts and the other per-video metrics) into metrics.json
    (its JSON on stdout goes to the file, its progress on stderr to the log and the console)."""
    metrics = paths.out / "metrics.json"
    if stage.step(f"lvd eval ({sizes.eval_metrics}) of the long videos", metrics):
        tmp, log = metrics.with_name(metrics.name + ".tmp"), stage.log_dir / f"{stage.number:02d}-eval.log"
        with open(tmp, "w") as out, open(log, "w") as handle:
            proc = subprocess.Popen(
                [sys.executable, "-m", "lvd", "eval", "--video", str(videos.hierarchical), str(videos.vidrd), "--metrics", sizes.eval_metrics,
                 "--flow-size", str(sizes.size * 2)],
                cwd=REPO, stdout=out, stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"},
            )
            Echo("", handle, stage.quiet).pump(proc.stderr)
            proc.wait()
        if proc.returncode != 0:
            raise SystemExit(f"lvd demo: lvd eval failed (exit {proc.returncode}); log: {log}\n{log.read_text(errors='replace')[-2000:]}")
        tmp.rename(metrics)
        scuts = json.loads(metrics.read_text()).get("scuts", {}).get("per_video", {})
        stage.say("SCuts: " + ", ".join(f"{Path(video).name} {_cuts(value)}" for video, value in scuts.items()))
    return metrics


def _cuts(value: object) -> object:
    return value.get("cuts") if isinstance(value, dict) else value


def write_report(stage: Stage, paths: Paths, sizes: Sizes, videos: Videos, metrics: Path, start: float) -> Path:
    """The figures against their goals, contact sheets and loss curves: report.json and report.html."""
    from lvd import demo_figures
    from lvd.demo_report import write_report as write

    json_path = paths.out / "report.json"
    if not stage.step("figures and report (report.json, report.html)", paths.out / "report.html"):
        return json_path
    figures, sheets = demo_figures.compute(paths, sizes, videos, json.loads(metrics.read_text()), stage.say)
    runs = {name: paths.runs / name for name in ("vae", "t2v", "lvdm_prediction", "lvdm_interpolation")}
    stage.close()
    extra = {
        "mode": "quick" if sizes is QUICK else "full", "recipe": asdict(sizes), "stage_seconds": stage.seconds,
        "wall_seconds": time.perf_counter() - start, "load_average": list(os.getloadavg()), "cpus": os.cpu_count(),
    }
    write(paths.out, figures, sheets, runs, extra)
    return json_path


def summary(paths: Paths, videos: Videos, metrics: Path, report: Path, seconds: float) -> None:
    out, runs, export = paths.out, paths.runs, paths.export
    print(f"\nlvd demo: finished in {seconds / 60:.1f} min. Everything is in {out}:")
    print(f"  report           {out / 'report.html'}  (figures with goals: {report})")
    print(f"  shards           {paths.shards}/{{videos,images,train,held_out,vae_windows,latents}}  (manifest.json in each)")
    print(f"  run folders      {runs}/{{vae,t2v,lvdm_prediction,lvdm_interpolation}}")
    print(f"  TensorBoard      .venv/bin/tensorboard --logdir {runs} --host 127.0.0.1")
    print(f"  exported models  {export}/{{vae,t2v,lvdm_prediction,lvdm_interpolation}}")
    print(f"  short samples    {paths.samples}  (trained and untrained denoiser, one clip per prompt)")
    for video in (videos.hierarchical, videos.vidrd):
        print(f"  video            {video}  ({video.with_suffix('.json').name} beside it)")
    print(f"  metrics          {metrics}")
    data = json.loads(report.read_text())
    for name, figure in data["figures"].items():
        verdict = {True: "PASS", False: "FAIL", None: "-"}[figure["met"]]
        value = "n/a" if figure["value"] is None else f"{figure['value']:.4g}"
        print(f"  {verdict:<5} {name:<28} {value:>10}   goal {figure['goal']}")
