"""Everything DeepSpeed: process group, the ZeRO config built from our typed config, the engine,
its checkpoint I/O and consolidation. This is the only module that imports deepspeed.

The DeepSpeed config is never written by hand: `deepspeed_config(train, world_size, ...)` derives
it from `TrainConfig` (ZeRO stage, bf16/fp32, accumulation, clipping, AdamW, warm-up + cosine).
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from common.launch import collective_timeout
from trainer.config import TrainConfig

os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")

import deepspeed  # noqa: E402  (DS_ACCELERATOR must be set before the import)
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint  # noqa: E402

logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
for _name in ("deepspeed", "DeepSpeed"):
    logging.getLogger(_name).setLevel(logging.WARNING)


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def process_group_timeout() -> datetime.timedelta:
    """How long a collective waits for a hung peer: `LVD_COLLECTIVE_TIMEOUT` seconds, else DeepSpeed's
    default (10 minutes, `DEEPSPEED_TIMEOUT` minutes)."""
    return collective_timeout(deepspeed.constants.default_pg_timeout)


def init_distributed() -> DistInfo:
    """Join the process group from torchrun/srun/`lvd --nproc` variables (a single process otherwise).

    NCCL on CUDA, gloo on CPU. Slurm's SLURM_PROCID/SLURM_NTASKS are mapped when RANK is absent.
    A collective waits `process_group_timeout()` for a hung peer.
    """
    env = os.environ
    if "RANK" not in env and "SLURM_PROCID" in env and "MASTER_ADDR" in env:
        env["RANK"] = env["SLURM_PROCID"]
        env["WORLD_SIZE"] = env.get("SLURM_NTASKS", "1")
        env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
    rank = int(env.get("RANK", 0))
    world = int(env.get("WORLD_SIZE", 1))
    local_rank = int(env.get("LOCAL_RANK", 0))
    cuda = torch.cuda.is_available()
    backend = "nccl" if cuda else "gloo"
    if cuda:
        torch.cuda.set_device(local_rank)
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if not cuda:
        # Skip the JIT build of the shared-memory op (about 60 s on a fresh machine): gloo suffices.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    added = []
    if world == 1:
        defaults = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "RANK": "0", "WORLD_SIZE": "1"}
        added = [key for key in defaults if key not in env]
        env.update({key: defaults[key] for key in added})
        env.setdefault("LOCAL_RANK", "0")  # DeepSpeed's engine reads it
    try:
        if not dist.is_initialized():
            # DeepSpeed caches its clone of the world group; one from an earlier process group of
            # this process (torn down by `leave_distributed` or by other code) must not be reused.
            deepspeed.utils.groups._WORLD_GROUP = None
            deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False, timeout=process_group_timeout())
            # DeepSpeed reduces gradients and gathers ZeRO-3 parameters in its own clone of the
            # world group, made later with a plain new_group, which torch gives 30 minutes rather
            # than the default group's timeout: made here (every rank, same order) with ours.
            deepspeed.utils.groups._WORLD_GROUP = dist.new_group(list(range(world)), timeout=process_group_timeout())
    finally:
        # A one-process run (`lvd train` called from Python, or in a test) must not leave
        # RANK/WORLD_SIZE/MASTER_* behind: a later `lvd train --nproc 2` or sbatch job started
        # from this process would inherit them and run as rank 0 of 1.
        for key in added:
            env.pop(key, None)
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=device, backend=backend)


def leave_distributed(*, succeeded: bool = True) -> None:
    """Tear the process group down before the interpreter exits: left to the exit handlers, gloo's
    threads can abort a finished process ("terminate called without an active exception", exit
    134; seen once in `benchmarks/zero_memory.py`'s ranks). The ranks meet at a barrier first, but
    only after success: after a failure the other ranks may never arrive."""
    if not dist.is_initialized():
        return
    if succeeded and dist.get_world_size() > 1:
        dist.barrier()
    dist.destroy_process_group()
    # DeepSpeed caches its clone of the world group; a later run in this process (`lvd train`
    # called twice from Python) would broadcast over the destroyed group.
    deepspeed.utils.groups._WORLD_GROUP = None


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def deepspeed_config(train: TrainConfig, *, world_size: int, on_cuda: bool) -> dict[str, Any]:
    """The DeepSpeed JSON config, derived from `TrainConfig` alone."""
    warmup = min(train.warmup_steps, train.steps - 1)  # the last step is never a warm-up step
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "train_batch_size": train.micro_batch_size * train.grad_accum * world_size,
        "gradient_clipping": train.grad_clip,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "zero_optimization": {"stage": train.zero_stage},
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": train.lr,
                "betas": list(train.betas),
                "eps": 1e-8,
                "weight_decay": train.weight_decay,
                # torch's AdamW on CPU; DeepSpeed's fused Adam on CUDA.
                "torch_adam": not on_cuda,
            },
        },
        "scheduler": {
            "type": "WarmupCosineLR",
            "params": {
                "total_num_steps": train.steps,
                # DeepSpeed wants >= 1 warm-up step; none (warmup_steps=0 or a 1-step run) is
                # written as 1 step that already starts at the full rate.
                "warmup_num_steps": max(warmup, 1),
                # The first step already moves: warm-up runs from lr/warmup_steps to lr.
                "warmup_min_ratio": 1.0 / train.warmup_steps if warmup > 0 else 1.0,
                "cos_min_ratio": train.min_lr_ratio,
                "warmup_type": "linear",
            },
        },
    }
    if train.precision == "bf16":
        config["bf16"] = {"enabled": True}
    if train.zero_stage == 3:
        config["zero_optimization"].update(
            {"stage3_gather_16bit_weights_on_model_save": False, "stage3_param_persistence_threshold": 0}
        )
    return config


def restore_torch_linear() -> None:
    """Put torch's own `torch.nn.functional.linear` back after ZeRO-3.

    A ZeRO-3 engine replaces it process-wide with DeepSpeed's `zero3_linear_wrap` ("this will
    persist unless manually reset", DeepSpeed's log says), which computes matmul + bias and so
    rounds differently from torch's fused addmm. Sampling or evaluation later in the same process
    then gave other bits than a fresh process (seen as an R=2 vs R=1 sampler mismatch when the
    sampler ran after the ZeRO-3 tests in one pytest process). Only call it once no ZeRO-3 engine
    trains any more.
    """
    from deepspeed.runtime.zero.partition_parameters import InsertPostInitMethodToModuleSubClasses

    original = getattr(InsertPostInitMethodToModuleSubClasses, "linear_bk", None)
    if original is not None:
        torch.nn.functional.linear = original


def build_engine(model: nn.Module, train: TrainConfig, dist_info: DistInfo) -> Any:
    """A DeepSpeed engine over `model`; only parameters with requires_grad reach the optimizer."""
    for param in model.parameters():
        # DeepSpeed flattens and broadcasts parameters as bytes: channels-last weights must be made dense.
        if not param.is_contiguous():
            param.data = param.data.contiguous()
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError(f"{type(model).__name__}: no trainable parameters")
    config = deepspeed_config(train, world_size=dist_info.world_size, on_cuda=dist_info.device.type == "cuda")
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=trainable, config=config)
    # WarmupCosineLR starts at iteration -1, whose rate is 0, and DeepSpeed steps it after each
    # optimizer step: the first update would not move the weights. Start it at iteration 0
    # (lr/warmup_steps); a resumed run loads the saved schedule over this.
    engine.lr_scheduler.step()
    return engine


def save_engine(engine: Any, directory: Path, tag: str, *, trainable_only: bool = False) -> None:
    """Every rank writes its part of model, optimizer and LR schedule under directory/tag
    (`trainable_only`: no frozen parameter, e.g. a LoRA run's base, goes into the files)."""
    engine.save_checkpoint(str(directory), tag=tag, save_latest=False, exclude_frozen_parameters=trainable_only)


def load_engine(engine: Any, directory: Path, tag: str, *, trainable_only: bool = False) -> None:
    """Load what `save_engine` wrote; `trainable_only` files leave the frozen parameters as built."""
    path, _ = engine.load_checkpoint(
        str(directory), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True,
        load_module_strict=not trainable_only,
    )
    if path is None:
        raise FileNotFoundError(f"{directory / tag}: DeepSpeed found no checkpoint to load")


def consolidated_state_dict(directory: Path, tag: str) -> dict[str, torch.Tensor]:
    """Full fp32 weights from a checkpoint of any ZeRO stage, loaded without an engine."""
    tag_dir = directory / tag
    if any(tag_dir.glob("*optim_states.pt")) and any(tag_dir.glob("zero_pp_rank_*")):
        state = get_fp32_state_dict_from_zero_checkpoint(str(directory), tag=tag)
        # ZeRO-1/2 files may lack frozen parameters: take them from the module file (ZeRO-3 has none).
        module_state = _module_file_state(tag_dir) if any(tag_dir.glob("mp_rank_*_model_states.pt")) else {}
        return {**{k: v for k, v in module_state.items() if k not in state}, **state}
    return _module_file_state(tag_dir)


def _module_file_state(tag_dir: Path) -> dict[str, torch.Tensor]:
    files = sorted(tag_dir.glob("mp_rank_*_model_states.pt"))
    if not files:
        raise FileNotFoundError(f"{tag_dir}: no model states file (is this a DeepSpeed checkpoint?)")
    state = torch.load(files[0], map_location="cpu", weights_only=False)["module"]
    return {
        k: v.float() if v.is_floating_point() else v
        for k, v in (state or {}).items()
        if v is not None and v.numel() > 0
    }


def local_shard(param: torch.Tensor) -> torch.Tensor:
    """This rank's piece of a parameter: the ZeRO-3 partition, or the whole tensor below stage 3."""
    return param.ds_tensor if hasattr(param, "ds_tensor") else param.data


@contextlib.contextmanager
def gathered_parameters(module: nn.Module, *, enabled: bool) -> Iterator[None]:
    """Make ZeRO-3 partitioned parameters whole for the duration (a no-op below stage 3)."""
    if not enabled:
        yield
        return
    with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
        yield


def backward_and_step(engine: Any, loss: torch.Tensor) -> float:
    """engine.backward + engine.step; returns the global gradient norm before clipping.

    ZeRO 1-3 report it themselves; without ZeRO the (already all-reduced) grads are measured
    here, before the step zeroes them.
    """
    engine.backward(loss)
    norm = None
    if engine.zero_optimization_stage() == 0 and engine.is_gradient_accumulation_boundary():
        grads = [p.grad.detach().float().norm() for p in engine.module.parameters() if p.grad is not None]
        norm = torch.stack(grads).norm() if grads else torch.zeros(())
    engine.step()
    if norm is None:
        norm = engine.get_global_grad_norm()
    if norm is None:
        return float("nan")
    return float(norm.item() if isinstance(norm, torch.Tensor) else norm)


def current_lr(engine: Any) -> float:
    """The learning rate the next optimizer step uses."""
    return float(engine.optimizer.param_groups[0]["lr"])


def checkpoint_wrapper(module: nn.Module) -> None:
    """Activation checkpointing applied from outside: the module's forward is recomputed in backward."""
    forward = module.forward

    def checkpointed(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)

    module.forward = checkpointed  # type: ignore[method-assign]


def allocated_state_bytes(engine: Any) -> dict[str, int]:
    """Bytes this rank really holds for the model and the optimizer, read off the engine.

    Walks the module's parameters (ZeRO-3: their partitions), the optimizer's flat parameter
    groups and fp32 master partitions, and the optimizer's state tensors; each storage counted once.
    """
    seen: set[int] = set()

    def size(tensors: Any) -> int:
        total = 0
        for tensor in _tensors(tensors):
            storage = tensor.untyped_storage()
            if storage.data_ptr() in seen or storage.nbytes() == 0:
                continue
            seen.add(storage.data_ptr())
            total += storage.nbytes()
        return total

    model = size([local_shard(p) for p in engine.module.parameters()])
    optimizer = engine.optimizer
    inner = getattr(optimizer, "optimizer", optimizer)
    flat = size([getattr(optimizer, name, None) for name in _FLAT_GROUPS])
    states = size(list(inner.state.values()))
    return {"model": model, "optimizer": flat + states}


_FLAT_GROUPS = (
    "bit16_groups_flat",
    "single_partition_of_fp32_groups",
    "fp16_partitioned_groups_flat",
    "fp32_partitioned_groups_flat",
    "fp32_groups_flat_partition",
    "fp32_groups",  # FP16_UnfusedOptimizer (bf16 without ZeRO): fp32 master copies
)


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    if isinstance(value, list | tuple):
        return [t for v in value for t in _tensors(v)]
    return []


# --- Elastic resume: a checkpoint of one layout loaded into an engine of another ------------------

_MOMENTS = ("exp_avg", "exp_avg_sq")


def _rank_files(tag_dir: Path, kind: str) -> list[Path]:
    files = list(tag_dir.glob(f"zero_pp_rank_*_mp_rank_00_{kind}.pt"))
    return sorted(files, key=lambda path: int(path.name.split("_")[3]))


def _zero_stage(tag_dir: Path) -> int:
    """ZeRO stage of the DeepSpeed checkpoint in `tag_dir` (0: no per-rank optimizer files)."""
    optim = _rank_files(tag_dir, "optim_states")
    if not optim:
        return 0
    return int(torch.load(optim[0], map_location="cpu", weights_only=False)["optimizer_state_dict"]["zero_stage"])


def read_layout_free(tag_dir: Path, names: list[str]) -> dict[str, Any]:
    """The trained state of an engine checkpoint of any ZeRO stage and world size, per parameter
    name: fp32 master weights ('weights'), Adam's moments ('exp_avg', 'exp_avg_sq'), its step
    count, the LR schedule and DeepSpeed's counters. `names`: the trainable parameters in the
    order the optimizer was given them (only used for a checkpoint without ZeRO)."""
    stage = _zero_stage(tag_dir)
    model_file = tag_dir / "mp_rank_00_model_states.pt"
    model_files = [model_file] if model_file.is_file() else _rank_files(tag_dir, "model_states")
    model = torch.load(model_files[0], map_location="cpu", weights_only=False)
    out: dict[str, Any] = {key: {} for key in ("weights", *_MOMENTS)}
    if stage == 0:
        optim = model["optimizer"]
        if not isinstance(optim, dict) or "state" not in optim:
            raise ValueError(f"{tag_dir}: no plain optimizer state (a bf16 run without ZeRO cannot change layout)")
        indices = [index for group in optim["param_groups"] for index in group["params"]]
        if len(indices) != len(names):
            raise ValueError(f"{tag_dir}: {len(indices)} optimized tensors, the model trains {len(names)}")
        for index, name in zip(indices, names):
            out["weights"][name] = model["module"][name].float()
            for key in _MOMENTS:
                out[key][name] = optim["state"][index][key].float()
        out["step"] = _step_value(optim["state"][indices[0]]["step"])
    else:
        ranks = [torch.load(path, map_location="cpu", weights_only=False)["optimizer_state_dict"] for path in _rank_files(tag_dir, "optim_states")]
        inner = "base_optimizer_state" if stage < 3 else "optimizer_state_dict"
        masters = "single_partition_of_fp32_groups" if stage < 3 else "fp32_flat_groups"
        for group, shapes in enumerate(model["param_shapes"]):
            flats = {
                "weights": [rank[masters][group].float() for rank in ranks],
                **{key: [rank[inner]["state"][group][key].float() for rank in ranks] for key in _MOMENTS},
            }
            for key, pieces in flats.items():
                out[key].update(_unflatten(pieces, shapes, partitioned_per_param=stage == 3))
        out["step"] = _step_value(ranks[0][inner]["state"][0]["step"])
    out |= {key: model[key] for key in ("lr_scheduler", "global_steps", "global_samples", "skipped_steps")}
    return out


def _step_value(step: Any) -> float:
    return float(step.item() if isinstance(step, torch.Tensor) else step)


def _unflatten(pieces: list[torch.Tensor], shapes: dict[str, Any], *, partitioned_per_param: bool) -> dict[str, torch.Tensor]:
    """Whole tensors from the ranks' flat partitions. ZeRO-1/2: the ranks' partitions concatenate
    to one flat vector holding the parameters back to back. ZeRO-3: each parameter is split on its
    own into `ceil(numel / ranks)` pieces, one per rank, at the same offset in every rank's flat."""
    out, offset = {}, 0
    whole = None if partitioned_per_param else torch.cat(pieces)
    for name, shape in shapes.items():
        numel = int(torch.Size(shape).numel())
        if whole is not None:
            out[name] = whole[offset : offset + numel].view(shape).clone()
            offset += numel
        else:
            part = -(-numel // len(pieces))
            out[name] = torch.cat([piece[offset : offset + part] for piece in pieces])[:numel].view(shape).clone()
            offset += part
    return out


def load_layout_free(engine: Any, state: dict[str, Any]) -> None:
    """Put a `read_layout_free` state into an engine of any ZeRO stage and world size: fp32 master
    weights and the 16/32-bit working copies, Adam's moments and step, the LR schedule."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    stage = engine.zero_optimization_stage()
    params = [(name, p) for name, p in engine.module.named_parameters() if p.requires_grad]
    missing = [name for name, _ in params if name not in state["weights"]]
    if missing:
        raise ValueError(f"the checkpoint lacks trained parameters, e.g. {missing[:3]}")
    step = torch.tensor(state["step"], dtype=torch.float32)
    optimizer = engine.optimizer
    if stage == 0:
        if not isinstance(optimizer, torch.optim.Optimizer) or hasattr(optimizer, "fp32_groups"):
            raise ValueError("a layout change into a run without ZeRO needs train.precision=fp32 (or ZeRO 1-3)")
        with torch.no_grad():
            for name, p in params:
                p.data.copy_(state["weights"][name].view_as(p))
                optimizer.state[p] = {"step": step.clone(), **{key: state[key][name].view_as(p).clone() for key in _MOMENTS}}
    else:
        inner = optimizer.optimizer
        flats = optimizer.single_partition_of_fp32_groups if stage < 3 else optimizer.fp32_partitioned_groups_flat
        for flat in flats:
            inner.state[flat] = {"step": step.clone(), **{key: torch.zeros_like(flat) for key in _MOMENTS}}
        if stage < 3:
            optimizer._hp_optimizer_states_linked = False
            optimizer._lazy_init_hp_params_optimizer_state()  # the per-parameter views of the new moments
        for name, p in params:
            safe_set_full_fp32_param(p, state["weights"][name].to(flats[0].device))
            for key in _MOMENTS:
                safe_set_full_optimizer_state(p, state[key][name].to(flats[0].device), key)
        if stage < 3:
            optimizer.update_lp_params()  # the working copies from the masters, then gathered
        else:
            for working, master in zip(optimizer.fp16_partitioned_groups_flat, optimizer.fp32_partitioned_groups_flat):
                working.data.copy_(master.data)
    engine.lr_scheduler.load_state_dict(state["lr_scheduler"])
    # The optimizer's rate is the schedule's at the loaded iteration (a fresh engine holds step 0's).
    for group, lr in zip(engine.optimizer.param_groups, engine.lr_scheduler.get_lr()):
        group["lr"] = lr
    engine.global_steps, engine.global_samples = state["global_steps"], state["global_samples"]
    engine.skipped_steps = state["skipped_steps"]
