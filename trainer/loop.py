"""`lvd train`: the training loop, top to bottom.

    build the session (task, engines, loader, EMA) -> resume if a checkpoint exists
    for each step: micro-batches -> losses -> agree on NaN/inf across ranks -> backward, step
                   -> EMA -> log -> checkpoint when due or when a signal asked for it

Exit codes: 0 done; 1 error (e.g. too many consecutive NaN steps); PREEMPTED_EXIT_CODE (75)
after SIGUSR1/SIGTERM and a complete checkpoint: requeue and the next start resumes.
"""

from __future__ import annotations

import time
from pathlib import Path

from common.launch import PREEMPTED_EXIT_CODE
from trainer.config import TrainJobConfig
from trainer.engine import init_distributed, restore_torch_linear
from trainer.monitor import Monitor, stderr
from trainer.preemption import PreemptionFlag
from trainer.session import (
    TrainingError,
    any_rank,
    barrier,
    build,
    check_bad_streak,
    maybe_preview,
    maybe_save,
    next_micro_batches,
    throughput,
    train_step,
)


def train(cfg: TrainJobConfig) -> int:
    """Train the run of `cfg` to `train.steps`, resuming its latest checkpoint; the exit code."""
    if not cfg.data.shards:
        raise TrainingError(
            "data.shards: empty; pass the shards, e.g. data.shards='shards/{000000..000003}.tar'"
        )
    info = init_distributed()
    if info.is_main:
        (Path(cfg.run.dir) / "checkpoints").mkdir(parents=True, exist_ok=True)
    barrier()
    monitor = Monitor(Path(cfg.run.dir), enabled=info.is_main, log_every=cfg.run.log_every, progress=cfg.run.progress)
    monitor.write_config(cfg)
    flag = PreemptionFlag()
    try:
        session = build(cfg, info)
        if session.resumed_from is not None:
            monitor.message(f"lvd train: resumed from {session.resumed_from} at step {session.counters.step}")
        monitor.start(session.counters.step, cfg.train.steps)
        flag.install()
        while session.counters.step < cfg.train.steps:
            started = time.perf_counter()
            micro_batches = next_micro_batches(session)
            data_wait = time.perf_counter() - started
            metrics = train_step(session, micro_batches)
            clips = sum(len(batch.captions) for batch in micro_batches)
            metrics |= throughput(session, time.perf_counter() - started, data_wait, clips)
            if session.ema is not None and metrics["skipped"] == 0.0:
                session.ema.update()
            step = session.counters.step
            monitor.step(step, metrics)
            check_bad_streak(session)
            if (video := maybe_preview(session, micro_batches[-1])) is not None:
                monitor.video(step, video)
            stop = any_rank(flag.requested)
            maybe_save(session, force=stop)
            if stop:
                monitor.message(f"lvd train: stopped by signal at step {step}; checkpoint written; exit {PREEMPTED_EXIT_CODE}")
                return PREEMPTED_EXIT_CODE
        monitor.message(
            f"lvd train: done, {session.counters.step} steps, {session.counters.skipped_total} skipped; "
            f"checkpoints in {session.ckpt_dir}"
        )
        return 0
    except TrainingError as err:
        stderr(f"lvd train: {err}")
        return 1
    finally:
        flag.uninstall()
        monitor.close()
        restore_torch_linear()  # ZeRO-3's process-wide replacement ends with the run
