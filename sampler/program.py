"""`lvd sample`'s generation driver: load the pipelines, build each video's job, run the
strategy's runner (`sampler.strategies.STRATEGIES`), write the report.

One video per prompt. Video i (seed + i) is owned by rank i mod R, which writes
`<stem>-<i:03d>.mp4` (just `out` for one prompt), its `.json` and its state folder `.parts/`.
- Sequential strategies (ddim, lvdm-autoregressive, vidrd, videofusion): ranks split the prompts,
  one rank per video in full rounds; the videos left over (number of prompts mod R, so the one
  video of a single prompt) run on all ranks in lockstep: the two guidance branches on ranks 0
  and 1 (`distributed.branch_parallel_guide`), then the VAE decoding claimed piece by piece by
  every rank (`work.write_pieces`).
- Parallel strategies (lvdm-hierarchical, streaming): every video on all ranks, which split its
  units (gaps, blending chunks); see their modules.
Every unit of work is saved to `.parts/` when it finishes and reused by a rerun of the same
command, and all randomness is keyed by unit (`strategies.seeding`), so R ranks, one rank and a
resumed run give the same video.
"""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path
from typing import Any

import torch

from sampler.config import SampleConfig
from sampler.distributed import World, close_world, init_world, sequence_parallel
from sampler.image_input import conditioning_latent
from sampler.job import VideoJob
from sampler.pipeline import Pipeline, latent_frames_for, load_pipeline, vae_factors
from sampler.state import PartsStore
from sampler.strategies import STRATEGIES
from sampler.strategies.common import SamplingSetup, pipeline_setup
from sampler.work import clear_claims


def video_paths(out: str, num_prompts: int) -> list[Path]:
    """`out` for one prompt, else `<stem>-000.mp4`, `<stem>-001.mp4`, ... beside it."""
    path = Path(out)
    if num_prompts == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{index:03d}{path.suffix}") for index in range(num_prompts)]


def parts_folder(video: Path) -> Path:
    return video.with_suffix(".parts")


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def make_setup(config: SampleConfig, pipeline: Pipeline, device: str) -> SamplingSetup:
    _, fh, fw = vae_factors(pipeline.vae)
    if config.height % fh or config.width % fw:
        raise ValueError(f"height and width must be multiples of the VAE's spatial factors ({fh}, {fw})")
    return pipeline_setup(
        pipeline,
        height=config.height,
        width=config.width,
        steps=config.steps,
        eta=config.eta,
        device=device,
        sampler=config.sampler,
        shift=config.shift,
        num_frames=latent_frames_for(pipeline.vae, config.frames),
    )


def video_params(config: SampleConfig, index: int) -> dict[str, Any]:
    """What determines video `index`: the command's result parameters for this prompt and seed."""
    params = config.result_params()
    params.pop("prompts")
    params.pop("out")
    return {**params, "prompt": config.prompts[index], "video_seed": config.seed + index}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_report(job: VideoJob, rank_stats: list[dict[str, Any]], wall: float) -> Path:
    """`<out>.json`: parameters, seed, model ids, timings, unit counts and memory of every rank."""
    report = {
        "out": str(job.out),
        "prompt": job.prompt,
        "seed": job.seed,
        "frames": job.config.frames,
        "latent_frames": job.latent_frames,
        "world_size": job.world.size,
        "params": video_params(job.config, job.index),
        "model": job.pipeline.model_id,
        "model2": None if job.pipeline2 is None else job.pipeline2.model_id,
        "timings": {**job.timings, "wall": wall},
        "units_computed": sum(stats["computed"] for stats in rank_stats),
        "units_reused": sum(stats["reused"] for stats in rank_stats),
        "peak_rss_mb": max(stats["peak_rss_mb"] for stats in rank_stats),
        "ranks": rank_stats,
    }
    path = job.out.with_suffix(".json")
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path


def check_tasks(strategy: str, model: Path | str, task: str, model2: Path | str | None, task2: str | None) -> None:
    """One clear line when an export of the wrong task is given to a strategy."""
    spec = STRATEGIES[strategy]
    wanted, wanted2 = spec.model_tasks, spec.model2_tasks
    if task not in wanted:
        raise ValueError(f"--strategy {strategy} needs --model from a {' or '.join(wanted)} run; {model} is a {task!r} export")
    if model2 is not None and not wanted2:
        raise ValueError(f"--strategy {strategy} takes no --model2 (got {model2})")
    if model2 is not None and task2 not in wanted2:
        raise ValueError(f"--strategy {strategy} needs --model2 from a {' or '.join(wanted2)} run; {model2} is a {task2!r} export")


def check_objective(strategy: str, pipeline: Pipeline | None) -> None:
    """One clear line when a flow-matching export is given to a strategy derived only for the
    DDPM forward process."""
    if pipeline is not None and pipeline.objective == "flow_matching" and not STRATEGIES[strategy].flow:
        raise ValueError(
            f"--strategy {strategy} is derived for the DDPM forward process (ε/v/x0 models) only; "
            f"{pipeline.path} is a flow_matching export (objective flow_matching). Strategies that "
            f"sample flow-matching models: {', '.join(name for name, spec in STRATEGIES.items() if spec.flow)}"
        )


def generate(config: SampleConfig) -> list[Path]:
    """Run the command on this rank (joins the process group if the environment has several ranks)."""
    device = resolve_device(config.device)
    ranks = init_world(device)
    sp = None
    try:
        pipeline = load_pipeline(config.model, device=device, lora=config.lora, lora_scale=config.lora_scale)
        world = ranks
        if config.sp > 1:
            sp = sequence_parallel(ranks, config.sp, config.sp_ring)
            sp.attach(pipeline.denoiser)
            if not sp.is_leader:
                sp.serve(pipeline.denoiser)
                ranks.barrier()
                return []
            world = sp.outer
        pipeline2 = None if config.model2 is None else load_pipeline(config.model2, device=device)
        check_tasks(config.strategy, config.model, pipeline.task, config.model2, None if pipeline2 is None else pipeline2.task)
        for given in (pipeline, pipeline2):
            check_objective(config.strategy, given)
        setup = make_setup(config, pipeline, device)
        latent_frames = latent_frames_for(pipeline.vae, config.frames)
        first_latent = conditioning_latent(config.image, config.strategy, pipeline, config.height, config.width)
        outputs = []
        num_videos = len(config.prompts)
        alone_until = num_videos - num_videos % world.size  # full rounds: one rank per video
        for index, out in enumerate(video_paths(config.out, num_videos)):
            shared = STRATEGIES[config.strategy].parallel or index >= alone_until
            if not shared and not world.owns(index):
                continue
            job = VideoJob(
                config=config,
                index=index,
                prompt=config.prompts[index],
                out=out,
                world=world if shared else World(),
                pipeline=pipeline,
                pipeline2=pipeline2,
                setup=setup,
                latent_frames=latent_frames,
                store=PartsStore(parts_folder(out)),
                image_latent=first_latent,
            )
            outputs += run_video(job, world)
        if sp is not None:
            sp.finish()
        ranks.barrier()
        return outputs
    finally:
        close_world(ranks)


def run_video(job: VideoJob, world: World) -> list[Path]:
    """One video on this rank; returns the files this rank wrote."""
    start, cpu_start = time.perf_counter(), time.process_time()
    job.store.check_params(video_params(job.config, job.index), write=job.is_owner)
    clear_claims(job)  # what a killed earlier run left, before any rank claims
    job.world.barrier()
    with torch.no_grad():
        STRATEGIES[job.config.strategy].run(job, job.config.strategy_config)
    for counter in job.counters:
        counter.close()
    stats = {
        "rank": world.rank,
        "computed": job.store.computed,
        "reused": job.store.reused,
        "peak_rss_mb": peak_rss_mb(),
        "cpu_seconds": time.process_time() - cpu_start,
        "timings": job.timings,
    }
    rank_stats = job.world.all_gather(stats)
    if not job.is_owner:
        return []
    return [job.out, write_report(job, rank_stats, time.perf_counter() - start)]
