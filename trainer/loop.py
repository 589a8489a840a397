"""`lvd train`: the training loop, top to bottom.

    build (distributed, task, engines, loader, EMA) -> resume if a checkpoint exists
    for each step: micro-batches -> losses -> agree on NaN/inf across ranks -> backward, step
                   -> EMA -> log -> checkpoint when due or when a signal asked for it

Exit codes: 0 done; 1 error (e.g. too many consecutive NaN steps); PREEMPTED_EXIT_CODE (75)
after SIGUSR1/SIGTERM and a complete checkpoint: requeue and the next start resumes.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from common.config import to_dict
from data_pipeline.loader import build_loader
from model_zoo import save_pretrained
from model_zoo.counting import flop_counter
from model_zoo.pretrained import write_config
from trainer import checkpoint
from trainer.config import TrainJobConfig
from trainer.ema import Ema
from trainer.engine import (
    DistInfo,
    backward_and_step,
    build_engine,
    checkpoint_wrapper,
    current_lr,
    init_distributed,
    load_engine,
    local_shard,
    restore_torch_linear,
    save_engine,
)
from trainer.monitor import Monitor, measured_peak_flops, peak_memory_bytes, stderr
from trainer.preemption import PREEMPTED_EXIT_CODE, PreemptionFlag
from trainer.tasks import Task, build_task


class TrainingError(RuntimeError):
    """A run that must stop (NaN streak, bad resume): the message says why; exit code 1."""


@dataclass
class RunState:
    step: int = 0
    """Optimizer steps completed."""
    bad_streak: int = 0
    """Consecutive skipped (non-finite) steps."""
    skipped_total: int = 0
    """Skipped steps since the run began."""
    flops_per_step: float = 0.0
    """FLOPs of one optimizer step on this rank: counted in the first step of a run and kept in
    its checkpoints. `FlopCounterMode` runs some ops through their decompositions, so a counted
    step's gradients differ from an uncounted step's in the last bits: a resumed run that counted
    again would drift an ulp from the uninterrupted run (tests/test_trainer_multirank.py compares
    the final weights bitwise)."""
    extra: dict[str, Any] = field(default_factory=dict)


def rank_generator(seed: int, rank: int) -> torch.Generator:
    """The generator of timesteps, noise, masks and levels of one rank (checkpointed)."""
    return torch.Generator().manual_seed(seed * 1_000_003 + rank)


def train(cfg: TrainJobConfig) -> int:
    if not cfg.data.shards:
        raise TrainingError(
            "data.shards: empty; pass the shards, e.g. data.shards='shards/{000000..000003}.tar'"
        )
    info = init_distributed()
    run_dir = Path(cfg.run.dir)
    ckpt_dir = run_dir / "checkpoints"
    if info.is_main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
    _barrier()
    monitor = Monitor(run_dir, enabled=info.is_main, log_every=cfg.run.log_every, progress=cfg.run.progress)
    monitor.write_config(cfg)
    try:
        return _train(cfg, info, run_dir, ckpt_dir, monitor)
    except TrainingError as err:
        stderr(f"lvd train: {err}")
        return 1
    finally:
        monitor.close()
        restore_torch_linear()  # ZeRO-3's process-wide replacement ends with the run


def _train(cfg: TrainJobConfig, info: DistInfo, run_dir: Path, ckpt_dir: Path, monitor: Monitor) -> int:
    task = build_task(cfg, info.device)
    if info.is_main:
        _save_frozen(task, run_dir / "frozen")
    if cfg.train.act_ckpt or cfg.train.compile:
        # Networks without blocks (the autoencoder task's small patch discriminator) are left as they are.
        for module in task.trained.values():
            for block in getattr(module, "checkpoint_modules", list)():
                if cfg.train.act_ckpt:
                    checkpoint_wrapper(block)
                if cfg.train.compile:
                    block.compile()  # in place: compiles the call (and the checkpointing) of this block
    engines = {
        name: build_engine(module.to(info.device), cfg.train, info) for name, module in task.trained.items()
    }
    loader = build_loader(
        cfg.data,
        rank=info.rank,
        world_size=info.world_size,
        batch_size=cfg.train.micro_batch_size,
        seed=cfg.train.seed,
        tokenizer=task.tokenizer(),
    )
    generator = rank_generator(cfg.train.seed, info.rank)
    ema = Ema(engines["model"].module, cfg.train.ema_decay, local_shard) if cfg.train.ema_decay > 0 else None
    state = RunState()
    tag = checkpoint.latest_tag(ckpt_dir)
    if tag is not None:
        _resume(ckpt_dir, tag, info, engines, loader, generator, ema, state)
        monitor.message(f"lvd train: resumed from {ckpt_dir / tag} at step {state.step}")
    peak_flops = measured_peak_flops(info.device)
    monitor.start(state.step, cfg.train.steps)
    flag = PreemptionFlag().install()
    try:
        while state.step < cfg.train.steps:
            metrics = _train_step(cfg, task, engines, loader, generator, state, info, peak_flops)
            if ema is not None and metrics.get("skipped", 0.0) == 0.0:
                ema.update()
            monitor.step(state.step, metrics)
            if state.bad_streak >= cfg.train.max_bad_steps:
                raise TrainingError(
                    f"{state.bad_streak} consecutive steps with a non-finite loss (up to step {state.step}); "
                    "stopping (train.max_bad_steps); the last checkpoint holds no NaN"
                )
            if cfg.run.video_every and state.step % cfg.run.video_every == 0:
                _preview(task, engines, state.extra["last_batch"], monitor, state.step)
            stop = _any_rank(flag.requested)
            due = cfg.train.checkpoint_every and state.step % cfg.train.checkpoint_every == 0
            if stop or due or state.step == cfg.train.steps:
                _save(cfg, ckpt_dir, info, engines, loader, generator, ema, state)
            if stop:
                monitor.message(
                    f"lvd train: stopped by signal at step {state.step}; checkpoint written; exit {PREEMPTED_EXIT_CODE}"
                )
                return PREEMPTED_EXIT_CODE
    finally:
        flag.uninstall()
    monitor.message(
        f"lvd train: done, {state.step} steps, {state.skipped_total} skipped; checkpoints in {ckpt_dir}"
    )
    return 0


def _train_step(
    cfg: TrainJobConfig,
    task: Task,
    engines: dict[str, Any],
    loader: Any,
    generator: torch.Generator,
    state: RunState,
    info: DistInfo,
    peak_flops: float,
) -> dict[str, float]:
    """One optimizer step over `grad_accum` micro-batches; a non-finite loss on any rank skips it."""
    start = time.perf_counter()
    data_wait = 0.0
    totals: dict[str, float] = {}
    skipped = False
    counter = flop_counter() if state.flops_per_step == 0.0 else None
    lr = current_lr(engines["model"])
    grad_norm = float("nan")
    for _ in range(cfg.train.grad_accum):
        fetch = time.perf_counter()
        batch = next(loader)
        data_wait += time.perf_counter() - fetch
        state.extra["last_batch"] = batch
        with counter or contextlib.nullcontext():
            # bf16: DeepSpeed holds bf16 weights; autocast makes the float32 inputs the models build
            # themselves (timestep embeddings, masks, noise) meet them in bf16.
            with torch.autocast(
                info.device.type, dtype=torch.bfloat16, enabled=cfg.train.precision == "bf16"
            ):
                out = task.losses(engines, batch, generator, state.step)
            values = [float(loss.detach()) for _, loss in out.losses]
            if _fault_nan(state.step + 1) and info.is_main:
                values[0] = float("nan")
            mean_values, bad = _agree(values)
            if bad:
                skipped = True
                continue
            for name, loss in out.losses:
                norm = backward_and_step(engines[name], loss)
                if name == "model":
                    grad_norm = norm
        for key, value in {"loss": mean_values[0], **out.metrics}.items():
            totals[key] = totals.get(key, 0.0) + value / cfg.train.grad_accum
    if counter is not None:
        state.flops_per_step = float(counter.get_total_flops())
    state.step += 1
    if skipped:
        state.bad_streak += 1
        state.skipped_total += 1
    else:
        state.bad_streak = 0
    elapsed = time.perf_counter() - start
    global_batch = cfg.train.micro_batch_size * cfg.train.grad_accum * info.world_size
    totals.update(
        lr=lr,
        grad_norm=grad_norm,
        skipped=float(skipped),
        skipped_total=float(state.skipped_total),
        step_time=elapsed,
        samples_per_sec=global_batch / elapsed,
        data_wait_frac=data_wait / elapsed,
        mfu=state.flops_per_step / elapsed / peak_flops,
        peak_mem_gb=peak_memory_bytes(info.device) / 2**30,
    )
    if skipped:
        totals.setdefault("loss", float("nan"))
    return totals


def _agree(values: list[float]) -> tuple[list[float], bool]:
    """Rank-mean of the losses, and whether any rank saw a non-finite one (one all-reduce)."""
    local = torch.tensor(values, dtype=torch.float64)
    bad = (~torch.isfinite(local)).any()
    packed = torch.cat([torch.nan_to_num(local, nan=0.0, posinf=0.0, neginf=0.0), bad.double().view(1)])
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(packed)
        packed[:-1] /= dist.get_world_size()
    return packed[:-1].tolist(), bool(packed[-1] > 0)


def _any_rank(flag: bool) -> bool:
    value = torch.tensor([1.0 if flag else 0.0])
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(value)
    return bool(value.item() > 0)


def _fault_nan(step: int) -> bool:
    """Test hook: LVD_FAULT=nan_loss:<step>[:<step>...] or nan_loss_from:<step> makes rank 0's loss NaN."""
    fault = os.environ.get(checkpoint.FAULT_ENV, "")
    kind, _, steps = fault.partition(":")
    if kind == "nan_loss":
        return str(step) in steps.split(":")
    if kind == "nan_loss_from":
        return step >= int(steps)
    return False


def _save(
    cfg: TrainJobConfig,
    ckpt_dir: Path,
    info: DistInfo,
    engines: dict[str, Any],
    loader: Any,
    generator: torch.Generator,
    ema: Ema | None,
    state: RunState,
) -> None:
    _check_finite(engines)
    rank_state = {
        "generator": generator.get_state(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "loader": loader.state_dict(),
        "ema": ema.state_dict() if ema is not None else None,
        "bad_streak": state.bad_streak,
        "skipped_total": state.skipped_total,
        "flops_per_step": state.flops_per_step,
        "world_size": info.world_size,
    }
    meta = {
        "step": state.step,
        "world_size": info.world_size,
        "engines": list(engines),
        "config": to_dict(cfg),
        "time": time.time(),
    }

    def save_engines(directory: Path, tag: str) -> None:
        for name, engine in engines.items():
            save_engine(engine, directory / tag, name)

    checkpoint.save(
        ckpt_dir,
        state.step,
        rank=info.rank,
        save_engines=save_engines,
        rank_state=rank_state,
        meta=meta,
        barrier=_barrier,
        keep_last=cfg.train.keep_last,
    )


def _check_finite(engines: dict[str, Any]) -> None:
    bad = any(
        not torch.isfinite(local_shard(p)).all()
        for engine in engines.values()
        for p in engine.module.parameters()
    )
    if _any_rank(bad):
        raise TrainingError(
            "non-finite weights: refusing to write a checkpoint that holds NaN/inf; the previous one is intact"
        )


def _resume(
    ckpt_dir: Path,
    tag: str,
    info: DistInfo,
    engines: dict[str, Any],
    loader: Any,
    generator: torch.Generator,
    ema: Ema | None,
    state: RunState,
) -> None:
    meta_world = checkpoint.read_rank_state(ckpt_dir, tag, 0)["world_size"] if info.is_main else None
    rank_file = checkpoint.rank_state_path(ckpt_dir, tag, info.rank)
    if not rank_file.is_file() or (meta_world is not None and meta_world != info.world_size):
        raise TrainingError(
            f"{ckpt_dir / tag} was written by {meta_world or 'another number of'} ranks, this run has {info.world_size}; "
            "exact resume needs the same world size (export it and start a new run with model.init_from=...)"
        )
    for name, engine in engines.items():
        load_engine(engine, ckpt_dir / tag, name)
    rank_state = checkpoint.read_rank_state(ckpt_dir, tag, info.rank)
    generator.set_state(rank_state["generator"])
    torch.set_rng_state(rank_state["torch_rng"])
    if rank_state["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rank_state["cuda_rng"])
    loader.load_state_dict(rank_state["loader"])
    if ema is not None and rank_state["ema"] is not None:
        ema.load_state_dict(rank_state["ema"])
    state.step = checkpoint.step_of(tag)
    state.bad_streak = rank_state["bad_streak"]
    state.skipped_total = rank_state["skipped_total"]
    # Checkpoints from before it was kept count again (and resume an ulp off the first run).
    state.flops_per_step = rank_state.get("flops_per_step", 0.0)


def _save_frozen(task: Task, directory: Path) -> None:
    """The frozen helpers exactly as used (export copies them into the pipeline folder), and the
    trained networks' configs (export rebuilds them from these, then loads the checkpoint)."""
    for name, module in task.frozen.items():
        if not (directory / name / "model.safetensors").is_file():
            save_pretrained(module, directory / name)
    for name, module in task.trained.items():
        write_config(module, directory.parent / "trained" / name)


def _preview(task: Task, engines: dict[str, Any], batch: dict[str, Any], monitor: Monitor, step: int) -> None:
    # Every rank runs it (ZeRO-3 gathers parameters collectively); rank 0 writes it.
    video = task.preview(engines, batch, torch.Generator().manual_seed(step))
    if video is not None:
        monitor.video(step, video)


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
