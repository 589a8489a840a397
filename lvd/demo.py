"""`lvd demo`: the main job end to end on the real media that ./setup.sh installs.

    shard (real videos with scene split + captioned images as pseudo-videos)
    -> train a tiny video VAE -> export it
    -> train a tiny text-to-video unet3d with DeepSpeed ZeRO-2 on 2 local ranks (TensorBoard)
    -> train the LVDM prediction and interpolation models -> export all
    -> generate >= 128 frames with lvdm-hierarchical and with vidrd on 2 ranks
    -> lvd eval both -> a summary of where everything is

Every stage runs the real `lvd` subcommand in a subprocess and is skipped when its output
already exists, so re-running continues instead of redoing (training also resumes from its
own checkpoints).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Sizes:
    size: int
    clip_frames: int
    vae_steps: int
    t2v_steps: int
    lvdm_steps: int
    sample_steps: int
    long_frames: int
    eval_metrics: str


FULL = Sizes(size=64, clip_frames=16, vae_steps=60, t2v_steps=150, lvdm_steps=80, sample_steps=20, long_frames=128, eval_metrics="scuts,mawe,drift")
QUICK = Sizes(size=32, clip_frames=8, vae_steps=10, t2v_steps=12, lvdm_steps=8, sample_steps=4, long_frames=128, eval_metrics="scuts,mawe")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lvd demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("demo_out"), help="folder for everything the demo writes")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and few steps (a few minutes)")
    parser.add_argument("--media", type=Path, default=Path(os.environ.get("LVD_MEDIA", REPO / ".cache" / "media")))
    return parser


class Stage:
    def __init__(self, out: Path):
        self.out = out
        self.log_dir = out / "logs"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.number = 0

    def run(self, title: str, done: Path, args: list[str]) -> None:
        """Run `lvd <args>` unless `done` exists; its output goes to logs/<n>-<name>.log."""
        self.number += 1
        name = f"{self.number:02d}-{args[0]}"
        if done.exists():
            print(f"[{self.number}] {title}: already done ({done})", flush=True)
            return
        print(f"[{self.number}] {title} ...", flush=True)
        start = time.perf_counter()
        log = self.log_dir / f"{name}.log"
        with open(log, "w") as handle:
            proc = subprocess.run([sys.executable, "-m", "lvd", *args], cwd=REPO, stdout=handle, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if proc.returncode != 0:
            tail = log.read_text(errors="replace").splitlines()[-25:]
            raise SystemExit(f"lvd demo: stage '{title}' failed (exit {proc.returncode}); log: {log}\n" + "\n".join(tail))
        print(f"    done in {time.perf_counter() - start:.0f} s (log: {log})", flush=True)


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


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    sizes = QUICK if args.quick else FULL
    out = args.out.resolve()
    media = args.media.resolve()
    if not (media / "videos").is_dir() or not (media / "images").is_dir():
        print(f"lvd demo: no media in {media} (run ./setup.sh, which installs it)", file=sys.stderr)
        return 1
    start = time.perf_counter()
    stage = Stage(out)
    shards, runs, export, videos = out / "shards", out / "runs", out / "export", out / "videos"
    videos.mkdir(parents=True, exist_ok=True)
    px = [f"data.height={sizes.size}", f"data.width={sizes.size}", f"data.frames={sizes.clip_frames}", "run.log_every=5"]

    stage.run("shard real videos (scene split)", shards / "videos" / "manifest.json", [
        "shard", "videos", "--input", str(media / "videos"), "--out", str(shards / "videos"), "--scene-split",
        "--clip-frames", str(sizes.clip_frames), "--size", str(sizes.size), "--shard-size-mb", "0.2",
    ])
    stage.run("shard captioned images as pseudo-videos", shards / "images" / "manifest.json", [
        "shard", "images", "--input", str(media / "images"), "--out", str(shards / "images"),
        "--frames", str(sizes.clip_frames), "--size", str(sizes.size), "--shard-size-mb", "0.2",
    ])
    data = [f"data.shards={brace(shards / 'videos' / 'manifest.json')}::{brace(shards / 'images' / 'manifest.json')}", "data.weights=[0.7,0.3]"]

    stage.run("train the tiny video VAE", final_checkpoint(runs / "vae", sizes.vae_steps), [
        "train", "--config", "configs/tiny/autoencoder.yaml", f"run.dir={runs / 'vae'}", f"train.steps={sizes.vae_steps}",
        f"train.checkpoint_every={sizes.vae_steps}", f"objective.disc_start={sizes.vae_steps // 2}", *px, *data,
    ])
    stage.run("export the VAE", export / "vae" / "model_index.json", ["export", "--run", str(runs / "vae"), "--out", str(export / "vae")])
    vae = [f"model.vae={export / 'vae' / 'vae'}"]

    t2v_every = max(sizes.t2v_steps // 3, 1)
    stage.run("train text-to-video unet3d, ZeRO-2 on 2 ranks", final_checkpoint(runs / "t2v", sizes.t2v_steps), [
        "train", "--nproc", "2", "--config", "configs/tiny/unet3d.yaml", f"run.dir={runs / 't2v'}", "train.zero_stage=2",
        f"train.steps={sizes.t2v_steps}", f"train.checkpoint_every={t2v_every}", f"run.video_every={t2v_every}", *px, *data, *vae,
    ])
    for task in ("lvdm_prediction", "lvdm_interpolation"):
        stage.run(f"train {task}", final_checkpoint(runs / task, sizes.lvdm_steps), [
            "train", "--config", f"configs/tiny/{task}.yaml", f"run.dir={runs / task}", f"train.steps={sizes.lvdm_steps}",
            f"train.checkpoint_every={sizes.lvdm_steps}", *px, *data, *vae,
        ])
    for name in ("t2v", "lvdm_prediction", "lvdm_interpolation"):
        stage.run(f"export {name}", export / name / "model_index.json", ["export", "--run", str(runs / name), "--out", str(export / name)])

    common = ["--frames", str(sizes.long_frames), "--steps", str(sizes.sample_steps), "--nproc", "2", "--seed", "0", "--no-progress"]
    common += ["--height", str(sizes.size), "--width", str(sizes.size)]
    prompt = ["--prompt", "cyclists riding along a street"]
    hierarchical, vidrd = videos / "lvdm-hierarchical.mp4", videos / "vidrd.mp4"
    stage.run("sample lvdm-hierarchical on 2 ranks", hierarchical.with_suffix(".json"), [
        "sample", "--model", str(export / "lvdm_prediction"), "--model2", str(export / "lvdm_interpolation"),
        "--strategy", "lvdm-hierarchical", "--out", str(hierarchical), *prompt, *common,
    ])
    stage.run("sample vidrd on 2 ranks", vidrd.with_suffix(".json"), [
        "sample", "--model", str(export / "t2v"), "--strategy", "vidrd", "--out", str(vidrd), *prompt, *common,
    ])
    metrics = out / "metrics.json"
    if not metrics.exists():
        stage.number += 1
        print(f"[{stage.number}] lvd eval ({sizes.eval_metrics}) ...", flush=True)
        result = subprocess.run(
            [sys.executable, "-m", "lvd", "eval", "--video", str(hierarchical), str(vidrd), "--metrics", sizes.eval_metrics, "--flow-size", str(sizes.size * 2)],
            cwd=REPO, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        if result.returncode != 0:
            raise SystemExit(f"lvd demo: lvd eval failed: {result.stderr[-2000:]}")
        metrics.write_text(result.stdout)
    summary(out, runs, export, [hierarchical, vidrd], metrics, time.perf_counter() - start)
    return 0


def summary(out: Path, runs: Path, export: Path, videos: list[Path], metrics: Path, seconds: float) -> None:
    print(f"\nlvd demo: finished in {seconds / 60:.1f} min. Everything is in {out}:")
    print(f"  shards           {out / 'shards' / 'videos'}  {out / 'shards' / 'images'}  (manifest.json in each)")
    print(f"  run folders      {runs}/{{vae,t2v,lvdm_prediction,lvdm_interpolation}}")
    print(f"  TensorBoard      .venv/bin/tensorboard --logdir {runs} --host 127.0.0.1")
    print(f"  exported models  {export}/{{vae,t2v,lvdm_prediction,lvdm_interpolation}}")
    for video in videos:
        print(f"  video            {video}  ({video.with_suffix('.json').name} beside it)")
    print(f"  metrics          {metrics}")
    print(metrics.read_text())
