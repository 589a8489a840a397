"""A training session: everything a run holds, built once, and the steps that change it.

    session = build(cfg, info)          # task, engines, loader, EMA; resumed from the latest checkpoint
    metrics = train_step(session, micro_batches)
    maybe_save(session)

A step's randomness comes from the rank's generator; its state, the loader's position, the EMA
and the step counters are the rank state each checkpoint keeps (`checkpoint.RankState`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from common.config import to_dict
from data_pipeline.joint import build_training_loader, load_loader_state
from model_zoo import save_pretrained
from model_zoo.counting import flop_counter
from model_zoo.pretrained import write_config
from trainer import checkpoint, faults
from trainer.checkpoint import Counters, RankState
from trainer.compiling import compile_blocks, unavailable_reason
from trainer.config import TrainJobConfig
from trainer.ema import Ema
from trainer.engine import (
    DistInfo,
    backward_and_step,
    build_engine,
    checkpoint_wrapper,
    current_lr,
    load_engine,
    local_shard,
    save_engine,
)
from trainer.latent_cache import check_text_encoder
from trainer.lora import check_identity, inject_lora
from trainer.monitor import measured_peak_flops, peak_memory_bytes, stderr
from trainer.sequence_parallel import SequenceParallelGroups
from trainer.tasks import build_task
from trainer.tasks.images import check_image_network
from trainer.tasks.interface import Batch, StepOutput, Task


class TrainingError(RuntimeError):
    """A run that must stop (NaN streak, bad resume): the message says why; exit code 1."""


@dataclass
class Session:
    """What one rank of a run holds between steps."""

    cfg: TrainJobConfig
    info: DistInfo
    task: Task
    engines: dict[str, Any]
    """One DeepSpeed engine per trained network of the task."""
    loader: Any
    """The data loader of this rank (`data_pipeline.loader.VideoLoader`, or with image shards
    `data_pipeline.joint.JointLoader`)."""
    generator: torch.Generator
    """This rank's generator of timesteps, noise, masks and levels."""
    ema: Ema | None
    """The EMA of the main network's weights (None: `train.ema_decay` is 0)."""
    counters: Counters = dataclasses.field(default_factory=Counters)
    """Steps done and skipped so far."""
    peak_flops: float = 0.0
    """Peak FLOP/s of the device, for the MFU (measured when the session is built)."""
    resumed_from: Path | None = None
    """The checkpoint the session started from (None: a fresh run)."""
    lora_base: dict[str, Any] | None = None
    """LoRA runs: the identity of the frozen base the adapters apply to (`trainer.lora.base_identity`)."""
    sp: SequenceParallelGroups | None = None
    """Sequence parallelism's groups (None: `train.sp_size` is 1)."""

    @property
    def replicas(self) -> tuple[int, int]:
        """(data-parallel rank, data-parallel size): the rank and world size without SP."""
        if self.sp is None:
            return self.info.rank, self.info.world_size
        return self.sp.dp_rank, self.sp.dp_size

    @property
    def ckpt_dir(self) -> Path:
        return Path(self.cfg.run.dir) / "checkpoints"


def rank_generator(seed: int, rank: int) -> torch.Generator:
    """The generator of timesteps, noise, masks and levels of one rank (checkpointed)."""
    return torch.Generator().manual_seed(seed * 1_000_003 + rank)


def build(cfg: TrainJobConfig, info: DistInfo) -> Session:
    """The task, its engines, the loader and the EMA; resumed from the latest complete checkpoint."""
    task = build_task(cfg, info.device)
    if cfg.data.image_shards:
        try:
            check_image_network(task.trained["model"])
        except ValueError as err:
            raise TrainingError(str(err)) from None
    if cfg.data.latent:
        _check_cache(cfg, task)
    lora_base = _inject_lora(task, cfg) if cfg.train.lora.enabled else None
    if info.is_main:
        save_frozen(task, Path(cfg.run.dir) / "frozen")
    sp = _sequence_parallel(task, cfg, info)
    dp_rank, dp_size = (sp.dp_rank, sp.dp_size) if sp is not None else (info.rank, info.world_size)
    backend = _compile_backend(cfg, info)
    for module in task.trained.values():
        _apply_block_wrappers(module, act_ckpt=cfg.train.act_ckpt)
        if backend is not None:
            compile_blocks(module, backend)  # after the checkpointing: the compile covers it
    engines = {name: build_engine(module.to(info.device), cfg.train, info) for name, module in task.trained.items()}
    # The ranks of an SP group read the same clips and draw the same noise: the DP rank stands for the rank.
    loader = build_training_loader(
        cfg.data,
        rank=dp_rank,
        world_size=dp_size,
        batch_size=cfg.train.micro_batch_size,
        seed=cfg.train.seed,
        tokenizer=task.tokenizer(),
    )
    ema = Ema(engines["model"].module, cfg.train.ema_decay, local_shard) if cfg.train.ema_decay > 0 else None
    generator = rank_generator(cfg.train.seed, dp_rank)
    session = Session(
        cfg=cfg, info=info, task=task, engines=engines, loader=loader, generator=generator, ema=ema, lora_base=lora_base, sp=sp
    )
    tag = checkpoint.latest_tag(session.ckpt_dir)
    if tag is not None:
        resume(session, tag)
    session.peak_flops = measured_peak_flops(info.device)  # after resume, as the RNG states were saved
    return session


def _check_cache(cfg: TrainJobConfig, task: Task) -> None:
    """A latent cache's text embeddings must come from the run's text encoder (one line otherwise)."""
    try:
        check_text_encoder(cfg.data.shards, cfg.model.text_encoder, task.frozen.get("text_encoder"))
    except (ValueError, FileNotFoundError) as err:
        raise TrainingError(str(err)) from None


def _inject_lora(task: Task, cfg: TrainJobConfig) -> dict[str, Any]:
    """LoRA adapters on the main network (docs/methods.md, 'LoRA'); the base's identity."""
    try:
        return inject_lora(task.trained["model"], cfg.train.lora, init_from=cfg.model.init_from)
    except ValueError as err:
        raise TrainingError(str(err)) from None


def _sequence_parallel(task: Task, cfg: TrainJobConfig, info: DistInfo) -> SequenceParallelGroups | None:
    """The DP x SP groups, with the main network made sequence-parallel (None when sp_size is 1)."""
    if cfg.train.sp_size == 1:
        return None
    try:
        sp = SequenceParallelGroups.build(info.rank, info.world_size, cfg.train.sp_size)
        sp.apply(task.trained["model"])
    except ValueError as err:
        raise TrainingError(str(err)) from None
    return sp


def _apply_block_wrappers(module: torch.nn.Module, *, act_ckpt: bool) -> None:
    """Activation checkpointing of the network's blocks, from outside; networks without blocks
    (the autoencoder task's small patch discriminator) stay as they are."""
    for block in getattr(module, "checkpoint_modules", list)():
        if act_ckpt:
            checkpoint_wrapper(block)


def _compile_backend(cfg: TrainJobConfig, info: DistInfo) -> str | None:
    """The backend the blocks compile with; None (eager) when `train.compile` is off or the backend
    does not work in this process, which this rank then says in one line."""
    if not cfg.train.compile:
        return None
    try:
        reason = unavailable_reason(cfg.train.compile_backend)
    except ValueError as err:
        raise TrainingError(str(err)) from None
    if reason is None:
        return cfg.train.compile_backend
    rank = f" (rank {info.rank})" if info.world_size > 1 else ""
    stderr(f"lvd train{rank}: train.compile: backend {cfg.train.compile_backend!r} unavailable, training eager: {reason}")
    return None


def next_micro_batches(session: Session) -> list[Batch]:
    """The micro-batches of one optimizer step, typed where they leave the loader."""
    return [Batch.from_loader(next(session.loader)) for _ in range(session.cfg.train.grad_accum)]


def train_step(session: Session, micro_batches: list[Batch]) -> dict[str, float]:
    """One optimizer step over the micro-batches; a non-finite loss on any rank skips it. With
    image shards, also the mean loss of each modality the micro-batches held (loss_image, loss_video)."""
    counters, accum = session.counters, session.cfg.train.grad_accum
    totals: dict[str, float] = {}
    skipped = False
    shape = step_shape(micro_batches)
    counter = flop_counter() if shape not in counters.flops_by_shape else None
    joint = bool(session.cfg.data.image_shards)
    by_modality: dict[str, list[float]] = {}
    lr = current_lr(session.engines["model"])
    grad_norm = float("nan")
    for batch in micro_batches:
        with counter or contextlib.nullcontext():
            out = _losses(session, batch)
            values = [float(loss.detach()) for _, loss in out.losses]
            if faults.nan_loss(counters.step + 1) and session.info.is_main:
                values[0] = float("nan")
            mean_values, bad = _agree(values)
            if bad:
                skipped = True
                continue
            for name, loss in out.losses:
                if session.sp is not None and name == "model":
                    loss = loss * session.sp.loss_scale  # each SP rank holds its tokens' part of the gradient
                norm = backward_and_step(session.engines[name], loss)
                if name == "model":
                    grad_norm = norm
        for key, value in {"loss": mean_values[0], **out.metrics}.items():
            totals[key] = totals.get(key, 0.0) + value / accum
        if joint:  # each modality's loss, on the steps that had micro-batches of it
            by_modality[batch.modality] = by_modality.get(batch.modality, []) + [mean_values[0]]
    if counter is not None:
        counters.flops_by_shape[shape] = float(counter.get_total_flops())
    counters.flops_per_step = counters.flops_by_shape[shape]
    counters.step += 1
    counters.bad_streak = counters.bad_streak + 1 if skipped else 0
    counters.skipped_total += int(skipped)
    if skipped:
        totals.setdefault("loss", float("nan"))
    totals |= {f"loss_{modality}": sum(values) / len(values) for modality, values in by_modality.items()}
    return totals | {"lr": lr, "grad_norm": grad_norm, "skipped": float(skipped), "skipped_total": float(counters.skipped_total)}


def step_shape(micro_batches: list[Batch]) -> str:
    """The micro-batches' clip shapes, e.g. '2x3x8x32x48,2x3x8x32x48' (buckets vary them by step)."""
    clips = (batch.video if batch.video is not None else batch.latents for batch in micro_batches)
    return ",".join("x".join(map(str, clip.shape)) for clip in clips)


def _losses(session: Session, batch: Batch) -> StepOutput:
    # bf16: DeepSpeed holds bf16 weights; autocast makes the float32 inputs the models build
    # themselves (timestep embeddings, masks, noise) meet them in bf16.
    bf16 = session.cfg.train.precision == "bf16"
    with torch.autocast(session.info.device.type, dtype=torch.bfloat16, enabled=bf16):
        return session.task.losses(session.engines, batch, session.generator, session.counters.step)


def throughput(session: Session, elapsed: float, data_wait: float, clips: int) -> dict[str, float]:
    """Speed of a step of `clips` clips per rank that took `elapsed` seconds, `data_wait` of them
    waiting for data; the MFU counts the FLOPs of this step's shape."""
    global_batch = clips * session.replicas[1]
    return {
        "step_time": elapsed,
        "samples_per_sec": global_batch / elapsed,
        "data_wait_frac": data_wait / elapsed,
        "mfu": session.counters.flops_per_step / elapsed / session.peak_flops,
        "peak_mem_gb": peak_memory_bytes(session.info.device) / 2**30,
    }


def check_bad_streak(session: Session) -> None:
    counters = session.counters
    if counters.bad_streak >= session.cfg.train.max_bad_steps:
        raise TrainingError(
            f"{counters.bad_streak} consecutive steps with a non-finite loss (up to step {counters.step}); "
            "stopping (train.max_bad_steps); the last checkpoint holds no NaN"
        )


def maybe_save(session: Session, *, force: bool = False) -> None:
    """Checkpoint when asked (`force`: a signal), when due, and after the last step."""
    step, train = session.counters.step, session.cfg.train
    due = bool(train.checkpoint_every) and step % train.checkpoint_every == 0
    if force or due or step == train.steps:
        save(session)


def save(session: Session) -> None:
    """Every rank writes its engines' shards and its rank state; rank 0 completes the checkpoint."""
    _check_finite(session.engines)
    info, counters = session.info, session.counters
    meta = {
        "step": counters.step,
        "world_size": info.world_size,
        "engines": list(session.engines),
        "config": to_dict(session.cfg),
        "time": time.time(),
        "lora_base": session.lora_base,
    }

    def save_engines(directory: Path, tag: str) -> None:
        for name, engine in session.engines.items():
            save_engine(engine, directory / tag, name, trainable_only=session.lora_base is not None)

    checkpoint.save(
        session.ckpt_dir,
        counters.step,
        rank=info.rank,
        save_engines=save_engines,
        rank_state=_rank_state(session),
        meta=meta,
        barrier=barrier,
        keep_last=session.cfg.train.keep_last,
    )


def _rank_state(session: Session) -> RankState:
    return RankState(
        counters=dataclasses.replace(session.counters),
        generator=session.generator.get_state(),
        torch_rng=torch.get_rng_state(),
        cuda_rng=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        loader=session.loader.state_dict(),
        ema=session.ema.state_dict() if session.ema is not None else None,
        world_size=session.info.world_size,
    )


def resume(session: Session, tag: str) -> None:
    """Load the engines and this rank's state of checkpoint `tag`; the same world size is required."""
    ckpt_dir, info = session.ckpt_dir, session.info
    meta_world = checkpoint.read_rank_state(ckpt_dir, tag, 0).world_size if info.is_main else None
    rank_file = checkpoint.rank_state_path(ckpt_dir, tag, info.rank)
    if not rank_file.is_file() or (meta_world is not None and meta_world != info.world_size):
        raise TrainingError(
            f"{ckpt_dir / tag} was written by {meta_world or 'another number of'} ranks, this run has {info.world_size}; "
            "exact resume needs the same world size (export it and start a new run with model.init_from=...)"
        )
    if session.lora_base is not None:
        recorded = json.loads((ckpt_dir / tag / "meta.json").read_text()).get("lora_base") or {}
        try:
            check_identity(recorded, session.lora_base, where=f"resume from {ckpt_dir / tag}")
        except ValueError as err:
            raise TrainingError(str(err)) from None
    for name, engine in session.engines.items():
        load_engine(engine, ckpt_dir / tag, name, trainable_only=session.lora_base is not None)
    state = checkpoint.read_rank_state(ckpt_dir, tag, info.rank)
    session.generator.set_state(state.generator)
    torch.set_rng_state(state.torch_rng)
    if state.cuda_rng is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state.cuda_rng)
    try:
        load_loader_state(session.loader, state.loader)
    except ValueError as err:
        raise TrainingError(f"resume from {ckpt_dir / tag}: {err}") from None
    if session.ema is not None and state.ema is not None:
        session.ema.load_state_dict(state.ema)
    session.counters = state.counters
    session.resumed_from = ckpt_dir / tag


def _check_finite(engines: dict[str, Any]) -> None:
    bad = any(
        not torch.isfinite(local_shard(p)).all()
        for engine in engines.values()
        for p in engine.module.parameters()
    )
    if any_rank(bad):
        raise TrainingError(
            "non-finite weights: refusing to write a checkpoint that holds NaN/inf; the previous one is intact"
        )


def save_frozen(task: Task, directory: Path) -> None:
    """The frozen helpers exactly as used (export copies them into the pipeline folder), and the
    trained networks' configs (export rebuilds them from these, then loads the checkpoint)."""
    for name, module in task.frozen.items():
        if not (directory / name / "model.safetensors").is_file():
            save_pretrained(module, directory / name)
    for name, module in task.trained.items():
        write_config(module, directory.parent / "trained" / name)


def maybe_preview(session: Session, batch: Batch) -> torch.Tensor | None:
    """The task's preview video of `batch` when one is due at this step (`run.video_every`).
    Every rank runs it (ZeRO-3 gathers parameters collectively); rank 0 writes it."""
    step, every = session.counters.step, session.cfg.run.video_every
    if not every or step % every != 0 or batch.modality != "video":  # previews are videos
        return None
    return session.task.preview(session.engines, batch, torch.Generator().manual_seed(step))


def _agree(values: list[float]) -> tuple[list[float], bool]:
    """Rank-mean of the losses, and whether any rank saw a non-finite one (one all-reduce)."""
    local = torch.tensor(values, dtype=torch.float64)
    bad = (~torch.isfinite(local)).any()
    packed = torch.cat([torch.nan_to_num(local, nan=0.0, posinf=0.0, neginf=0.0), bad.double().view(1)])
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(packed)
        packed[:-1] /= dist.get_world_size()
    return packed[:-1].tolist(), bool(packed[-1] > 0)


def any_rank(flag: bool) -> bool:
    value = torch.tensor([1.0 if flag else 0.0])
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(value)
    return bool(value.item() > 0)


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
