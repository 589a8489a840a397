"""A training session: everything a run holds, built once, and the steps that change it.

    session = build(cfg, info)          # task, engines, loader, EMA; resumed from the latest checkpoint
    metrics = train_step(session, micro_batches)
    maybe_save(session)

A step's randomness comes from the generators of the data ranks this rank trains (see
trainer/data_ranks.py); their states, the loaders' positions, the EMA and the step counters are
the rank state each checkpoint keeps (`checkpoint.RankState`). A checkpoint of another world size
or ZeRO stage resumes through a layout-free copy of the weights and Adam's moments (`resume`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
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
from trainer.data_ranks import DataLayout, LayoutError, stream_key
from trainer.ema import Ema, assemble
from trainer.engine import (
    DistInfo,
    backward_and_step,
    build_engine,
    checkpoint_wrapper,
    current_lr,
    load_engine,
    load_layout_free,
    local_shard,
    process_group_timeout,
    read_layout_free,
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
    layout: DataLayout
    """Which data ranks this rank trains, and how many micro-batches a step has here (with sequence
    parallelism the data ranks are the DP groups: every rank of an SP group trains the same ones)."""
    loaders: dict[int, Any]
    """The loaders of the data ranks this rank reads (`data_pipeline.loader.VideoLoader`, or with
    image shards `data_pipeline.joint.JointLoader`)."""
    generators: dict[str, torch.Generator]
    """The generators of timesteps, noise, masks and levels of the micro-batches this rank trains,
    by stream key (`data_ranks.stream_key`)."""
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


def micro_generator(seed: int, data_rank: int, micro: int) -> torch.Generator:
    """The generator of micro-batch `micro` of a step of data rank `data_rank` (the rank
    generator for the first), checkpointed."""
    if micro == 0:
        return rank_generator(seed, data_rank)
    return torch.Generator().manual_seed((seed * 1_000_003 + data_rank) * 1_009 + micro)


def build(cfg: TrainJobConfig, info: DistInfo) -> Session:
    """The task, its engines, the loader and the EMA; resumed from the latest complete checkpoint."""
    ckpt_dir = Path(cfg.run.dir) / "checkpoints"
    tag = checkpoint.latest_tag(ckpt_dir)
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
    # The ranks of an SP group read the same clips and draw the same noise: the DP rank stands for the rank.
    try:
        layout = DataLayout(
            data_ranks=_data_ranks(ckpt_dir, tag) if tag is not None else dp_size,
            world_size=dp_size,
            rank=dp_rank,
            grad_accum=cfg.train.grad_accum,
        )
        _check_one_modality_per_micro_step(layout, cfg.data.image_ratio)
    except LayoutError as err:
        raise TrainingError(f"cannot resume {ckpt_dir / str(tag)}: {err}") from None
    # DeepSpeed accumulates this rank's share of the step's micro-batches (the global batch is fixed).
    train = dataclasses.replace(cfg.train, grad_accum=layout.accum)
    engines = {name: build_engine(module.to(info.device), train, info) for name, module in task.trained.items()}
    loaders = {
        data_rank: build_training_loader(
            cfg.data,
            rank=data_rank,
            world_size=layout.data_ranks,
            batch_size=cfg.train.micro_batch_size,
            seed=cfg.train.seed,
            tokenizer=task.tokenizer(),
        )
        for data_rank in layout.hosted()
    }
    ema = Ema(engines["model"].module, cfg.train.ema_decay, local_shard) if cfg.train.ema_decay > 0 else None
    generators = {stream_key(*stream): micro_generator(cfg.train.seed, *stream) for stream in layout.streams()}
    session = Session(
        cfg=cfg, info=info, task=task, engines=engines, layout=layout, loaders=loaders, generators=generators, ema=ema,
        lora_base=lora_base, sp=sp,
    )
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
        sp = SequenceParallelGroups.build(
            info.rank, info.world_size, cfg.train.sp_size, cfg.train.sp_ring, timeout=process_group_timeout()
        )
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


def _check_one_modality_per_micro_step(layout: DataLayout, image_ratio: float) -> None:
    """Joint image + video training needs every rank of a micro-step on one modality: ZeRO-2/3
    reduce gradients and gather parameters per micro-step, and an image batch skips the U-Net's
    temporal layers. Ranks sharing a data rank keep every k-th of its micro-batches, drawn image or
    video one by one, so at one micro-step they would hold different modalities: refused."""
    if layout.share > 1 and 0.0 < image_ratio < 1.0:
        raise LayoutError(
            f"the run has {layout.data_ranks} data rank(s) and trains on images and videos (data.image_ratio={image_ratio}); "
            f"{layout.share} data-parallel ranks would share each data rank and hold different modalities at one "
            f"micro-step (resume joint training on at most {layout.data_ranks} data-parallel ranks)"
        )


def _data_ranks(ckpt_dir: Path, tag: str) -> int:
    meta = json.loads((ckpt_dir / tag / "meta.json").read_text())
    return int(meta.get("data_ranks", meta["world_size"]))


def next_micro_batches(session: Session) -> list[Batch]:
    """The micro-batches of one optimizer step this rank trains, typed where they leave the loader
    (a rank sharing a data rank reads, and drops, the other sharers' batches too)."""
    kept = []
    for data_rank, micro, keep in session.layout.schedule():
        batch = next(session.loaders[data_rank])
        if keep:
            _trace(session, data_rank, micro, batch)
            kept.append(Batch.from_loader(batch))
    return kept


def _trace(session: Session, data_rank: int, micro: int, batch: dict[str, Any]) -> None:
    """`LVD_TRACE_SAMPLES=<file>`: a test hook; every rank appends one JSON line per micro-batch
    with the sample keys it trains on, so a test can compare the data order of two runs. `sp_rank`
    is the rank's place in its sequence-parallel group (0 without SP): the group's ranks train on
    the same samples, and a test counts them once."""
    path = os.environ.get("LVD_TRACE_SAMPLES")
    if not path:
        return
    keys = [f"{meta.get('__url__')}#{meta.get('__key__')}" for meta in batch.get("meta", [])]
    sp_rank = session.sp.sp_rank if session.sp is not None else 0
    line = {"step": session.counters.step + 1, "data_rank": data_rank, "micro": micro, "sp_rank": sp_rank, "keys": keys}
    with open(path, "a") as file:
        file.write(json.dumps(line) + "\n")


def train_step(session: Session, micro_batches: list[Batch]) -> dict[str, float]:
    """One optimizer step over the micro-batches; a non-finite loss on any rank skips it. With
    image shards, also the mean loss of each modality the micro-batches held (loss_image, loss_video)."""
    counters, accum = session.counters, session.layout.accum
    faults.fail_rank(session.info.rank, counters.step + 1)
    totals: dict[str, float] = {}
    skipped = False
    shape = step_shape(micro_batches)
    counter = flop_counter() if shape not in counters.flops_by_shape else None
    joint = bool(session.cfg.data.image_shards)
    by_modality: dict[str, list[float]] = {}
    lr = current_lr(session.engines["model"])
    grad_norm = float("nan")
    streams = [stream_key(*stream) for stream in session.layout.streams()]
    for batch, stream in zip(micro_batches, streams, strict=True):
        with counter or contextlib.nullcontext():
            out = _losses(session, batch, session.generators[stream])
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


def _losses(session: Session, batch: Batch, generator: torch.Generator) -> StepOutput:
    # bf16: DeepSpeed holds bf16 weights; autocast makes the float32 inputs the models build
    # themselves (timestep embeddings, masks, noise) meet them in bf16.
    bf16 = session.cfg.train.precision == "bf16"
    with torch.autocast(session.info.device.type, dtype=torch.bfloat16, enabled=bf16):
        return session.task.losses(session.engines, batch, generator, session.counters.step)


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
        "data_ranks": session.layout.data_ranks,
        "zero_stage": session.cfg.train.zero_stage,
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
        generator={key: generator.get_state() for key, generator in session.generators.items()},
        torch_rng=torch.get_rng_state(),
        cuda_rng=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        loader={str(rank): session.loaders[rank].state_dict() for rank in session.layout.carried()},
        ema=session.ema.state_dict() if session.ema is not None else None,
        world_size=session.info.world_size,
        data_ranks=session.layout.data_ranks,
    )


def resume(session: Session, tag: str) -> None:
    """Load the engines and the rank state of checkpoint `tag`.

    The same world size and ZeRO stage: every engine loads its own shards, bit-exact. Another
    layout (elastic resume): each engine gets the checkpoint's fp32 master weights and Adam
    moments, reassembled per parameter from all ranks' shards and re-partitioned
    (`engine.read_layout_free` / `load_layout_free`); each data rank's loader position and
    generator come from whichever rank carried them; the EMA is reassembled and re-sharded.
    Processes that existed only in the old layout leave their global torch RNG state unused: rank
    p takes that of old rank p mod (old world size)."""
    ckpt_dir, info = session.ckpt_dir, session.info
    meta = json.loads((ckpt_dir / tag / "meta.json").read_text())
    old_world = int(meta["world_size"])
    if session.lora_base is not None:
        recorded = meta.get("lora_base") or {}
        try:
            check_identity(recorded, session.lora_base, where=f"resume from {ckpt_dir / tag}")
        except ValueError as err:
            raise TrainingError(str(err)) from None
    stage = int(meta.get("zero_stage", meta["config"]["train"]["zero_stage"]))
    same = (stage, old_world) == (session.cfg.train.zero_stage, info.world_size)
    if not same and info.is_main:
        world = old_world
        stderr(
            f"lvd train: elastic resume: {ckpt_dir / tag} was written by {world} rank(s) at ZeRO-{stage}, this run has "
            f"{info.world_size} at ZeRO-{session.cfg.train.zero_stage}; weights and Adam moments re-partitioned, "
            f"{session.layout.data_ranks} data rank(s) of {session.cfg.train.grad_accum} micro-batch(es) each kept"
        )
    elif int(meta["config"]["train"].get("sp_size", 1)) != session.cfg.train.sp_size and info.is_main:  # the SP degree changed
        stderr(
            f"lvd train: resume: the run's {session.layout.data_ranks} data rank(s) on {session.layout.world_size} "
            f"data-parallel group(s) of train.sp_size={session.cfg.train.sp_size} rank(s), "
            f"{session.layout.accum} micro-batch(es) a step each"
        )
    for name, engine in session.engines.items():
        if same:
            load_engine(engine, ckpt_dir / tag, name, trainable_only=session.lora_base is not None)
            continue
        names = [param_name for param_name, p in engine.module.named_parameters() if p.requires_grad]
        try:
            load_layout_free(engine, read_layout_free(ckpt_dir / tag / name, names))
        except ValueError as err:
            raise TrainingError(f"cannot resume {ckpt_dir / tag} in another layout: {name}: {err}") from None
    states = checkpoint.read_rank_states(ckpt_dir, tag, old_world)
    own = states[info.rank % old_world]
    generators = {key: value for state in states for key, value in state.generator.items()}
    loaders = {key: value for state in states for key, value in state.loader.items()}
    for key, generator in session.generators.items():
        if key in generators:  # absent only in a checkpoint of an older lvd (one generator per rank) with grad_accum > 1
            generator.set_state(generators[key])
    for data_rank, loader in session.loaders.items():
        try:
            load_loader_state(loader, loaders[str(data_rank)])
        except ValueError as err:
            raise TrainingError(f"resume from {ckpt_dir / tag}: {err}") from None
    torch.set_rng_state(own.torch_rng)
    if own.cuda_rng is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(own.cuda_rng)
    if session.ema is not None and own.ema is not None:
        session.ema.load_state_dict(own.ema if same else _reshard_ema(session.ema, [state.ema for state in states], info))
    session.counters = own.counters
    session.resumed_from = ckpt_dir / tag


def _reshard_ema(ema: Ema, rank_states: list[dict[str, Any]], info: DistInfo) -> dict[str, Any]:
    """This rank's piece of the EMA of a checkpoint of another layout: the whole tensors below
    ZeRO-3, the rank's partition of the flattened, padded tensor under ZeRO-3."""
    whole = assemble(rank_states)
    shadow = {}
    for name, p in ema.params.items():
        if hasattr(p, "ds_tensor"):
            size = p.ds_tensor.numel()
            flat = torch.nn.functional.pad(whole[name].flatten(), (0, size * info.world_size - whole[name].numel()))
            shadow[name] = flat[info.rank * size : (info.rank + 1) * size].clone()
        else:
            shadow[name] = whole[name].view(p.shape).clone()
    return {"shadow": shadow}


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
