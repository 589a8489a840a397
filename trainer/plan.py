"""`lvd plan`: what a training config costs on a GPU cluster we do not have.

Everything model-specific is measured on the `meta` device, nothing is allocated: parameter
counts (`model_zoo.count_parameters`), FLOPs (`model_zoo.estimate_flops`, FlopCounterMode) and
activation memory (the bytes autograd saves for backward, recorded with
`torch.autograd.graph.saved_tensors_hooks` during a meta forward). The ZeRO arithmetic is
DeepSpeed's: per rank, stage 1 partitions optimizer states, 2 also gradients, 3 also weights.

Assumptions (printed with the result): AdamW (two fp32 moments), an fp32 master copy of the
weights when training in bf16, frozen helpers kept whole on every rank, DeepSpeed's default
communication buckets, 10% of GPU memory kept free for fragmentation.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass, replace
from statistics import mean
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

import model_zoo
from data_pipeline.buckets import build_buckets
from model_zoo.layers.sequence_parallel import Collectives, apply_ring, apply_ulysses, self_attentions
from trainer.config import TrainJobConfig
from trainer.gpus import GPUS

BUCKET_ELEMENTS = 5e8
"""DeepSpeed's default reduce/allgather bucket size (elements)."""
HEADROOM = 0.9
"""Share of GPU memory the plan may use (the rest: allocator fragmentation, CUDA context)."""


@dataclass(frozen=True)
class ModelCounts:
    trainable_params: int
    frozen_params: int
    activation_bytes_per_sample: int
    activation_bytes_per_sample_ckpt: int
    train_flops_per_sample: float
    frozen_flops_per_sample: float
    tokens_per_sample: int
    all_to_all_elements_per_sample: float = 0.0
    """Sequence parallelism (train.sp_size > 1): elements one rank sends per sample in one forward's
    exchanges: the Ulysses all-to-alls plus, with train.sp_ring > 1, the ring's K/V shifts
    (`ring_elements_per_sample`; the backward sends the same volume back)."""
    ring_elements_per_sample: float = 0.0
    """The ring's part of `all_to_all_elements_per_sample` (K/V blocks sent around the ring)."""


def _input_shape(cfg: TrainJobConfig, vae: nn.Module | None) -> tuple[int, ...]:
    """Latent shape of one clip, from the data size and the VAE's downsampling (CMD's stages: the
    shape of their content frame or packed motion latent)."""
    frames, height, width = cfg.data.frames, cfg.data.height, cfg.data.width
    if vae is None:
        return (1, 3, frames, height, width)
    if cfg.objective.task in ("cmd_content", "cmd_motion"):
        from trainer.tasks.cmd import stage_input_shape

        return stage_input_shape(cfg.objective.task, vae, frames, height, width)
    ft, fh, fw = vae.downsample_factors
    # A causal VAE declares its own count (1 + ft·k frames -> 1 + k latent frames).
    latent_frames = vae.latent_frames(frames) if hasattr(vae, "latent_frames") else max(frames // ft, 1)
    return (1, int(vae.config.latent_channels), latent_frames, height // fh, width // fw)


class _SavedBytes:
    """Sums the bytes autograd keeps for backward (dedup by storage), optionally outside some modules."""

    def __init__(self, skip: list[nn.Module]):
        self.total = 0
        self.inside = 0
        self.block_inputs = 0
        self.block_peak = 0
        self._block_bytes = 0
        self._seen: set[tuple[int, int]] = set()
        self._handles = []
        for module in skip:
            self._handles.append(module.register_forward_pre_hook(self._enter))
            self._handles.append(module.register_forward_hook(self._leave))

    def _enter(self, _module: nn.Module, args: tuple[Any, ...]) -> None:
        if self.inside == 0:
            self.block_inputs += sum(a.numel() * a.element_size() for a in args if isinstance(a, torch.Tensor))
            self._block_bytes = 0
        self.inside += 1

    def _leave(self, *_: Any) -> None:
        self.inside -= 1
        if self.inside == 0:
            self.block_peak = max(self.block_peak, self._block_bytes)

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        key = (id(tensor.untyped_storage()) if tensor.device.type == "meta" else tensor.untyped_storage().data_ptr(), tensor.numel())
        if key not in self._seen:
            self._seen.add(key)
            size = tensor.numel() * tensor.element_size()
            if self.inside:
                self._block_bytes += size
            else:
                self.total += size
        return tensor

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


class FusedAttention(TorchFunctionMode):
    """Runs `F.scaled_dot_product_attention` through the fused (flash) kernel's op, which saves for
    backward what the GPUs' fused kernels save: q, k, v, the output and one log-sum-exp per query
    row (and the mask), never the L x S score matrix of PyTorch's reference path. Without it, a
    30k-token clip would count tens of GB of scores per attention layer."""

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        mask = kwargs.get("attn_mask")
        if func is not F.scaled_dot_product_attention or (mask is not None and mask.requires_grad):
            return func(*args, **kwargs)  # a learned attention bias keeps the reference path
        q, k, v = args[:3]
        fused = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        return fused(q, k, v, attn_mask=mask, scale=kwargs.get("scale"))[0]


def activation_bytes(model: nn.Module, shape: tuple[int, ...], *, checkpointed: bool, dtype: torch.dtype) -> int:
    """Bytes saved for backward by one forward on `shape` (meta device, no allocation).

    With `checkpointed`, a checkpointed block keeps only its inputs, plus the largest single
    block's saved tensors while it is recomputed.
    """
    blocks = model.checkpoint_modules() if checkpointed else []
    counter = _SavedBytes(blocks)
    x = torch.randn(shape, device="meta", dtype=dtype)
    kwargs = model.example_inputs(x) if hasattr(model, "example_inputs") else {}
    with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t), FusedAttention():
        model(x, **kwargs)
    counter.close()
    return counter.total + (counter.block_inputs + counter.block_peak if checkpointed else 0)


def _shape_only_ulysses(model: nn.Module, size: int, ring: int = 1) -> None:
    """Sequence parallelism of degree `size` (ring degree `ring`) as rank 0 of its group sees it,
    without communication: the all-to-alls keep shapes, the gather repeats the rank's part and the
    ring shift returns a copy (a new storage, as a received block is), so a meta forward saves
    exactly the tensors of one rank (docs/methods.md, 'Sequence parallelism (Ulysses)'). The ring
    keeps every visiting K/V block for the backward (its scores are recomputed there)."""

    def fake(n: int) -> Collectives:
        return Collectives(rank=0, size=n, all_to_all=lambda x: x, all_gather=lambda x: x[None].expand(n, *x.shape),
                           ring_shift=lambda x, _: x.clone())

    if ring == 1:
        apply_ulysses(model, fake(size))
    else:
        apply_ring(model, fake(size), fake(size // ring), fake(ring))


def _activations(model: nn.Module, shape: tuple[int, ...], dtype: torch.dtype) -> tuple[int, int]:
    """Bytes saved for backward per sample without and with checkpointing, measured in fp32 and
    scaled by the element size (bf16 training saves bf16 activations)."""
    scale = torch.finfo(dtype).bits / 32
    acts = int(activation_bytes(model, shape, checkpointed=False, dtype=torch.float32) * scale)
    acts_ckpt = int(activation_bytes(model, shape, checkpointed=True, dtype=torch.float32) * scale)
    return acts, acts_ckpt


def _exchanged(model: nn.Module, tokens: int, sp: int, ring: int) -> tuple[float, float]:
    """Elements one rank sends per sample in one forward (all of it, and the ring's part).

    Each self-attention's 4 all-to-alls (q, k, v out; output back) send (U-1)/U of B·N/sp·D values
    (U = sp / ring ranks exchange heads); the ring sends its K and V, 2·B·N/sp·D, R-1 times."""
    if sp == 1:
        return 0.0, 0.0
    layers = len(self_attentions(model))
    local = -(-tokens // sp) * model.config.hidden_size
    heads = sp // ring
    ring_sent = float(layers * 2 * local * (ring - 1))
    return layers * 4 * local * (heads - 1) / heads + ring_sent, ring_sent


def measure(cfg: TrainJobConfig, *, dtype: torch.dtype) -> ModelCounts:
    """Build the task's networks on `meta` and measure them (per rank of an SP group when
    `train.sp_size` > 1)."""
    from trainer.tasks import build_task
    from trainer.tasks.cmd import content_latent_shape

    with torch.device("meta"):
        task = build_task(cfg, torch.device("meta"))
    model = task.trained["model"]
    sp = cfg.train.sp_size
    if sp > 1:
        _shape_only_ulysses(model, sp, cfg.train.sp_ring)
    vae, content_vae = task.frozen.get("vae"), task.frozen.get("content_vae")
    shape = _input_shape(cfg, vae) if content_vae is None else content_latent_shape(content_vae, cfg.data.height, cfg.data.width)
    trainable = sum(model_zoo.count_parameters(m, trainable_only=True) for m in task.trained.values())
    frozen_in_trained = sum(model_zoo.count_parameters(m) for m in task.trained.values()) - trainable
    frozen = frozen_in_trained + sum(model_zoo.count_parameters(m) for m in task.frozen.values())
    acts, acts_ckpt = _activations(model, shape, dtype)
    if sp > 1:
        _without_sp(model)  # FLOPs of the whole sample (the ranks share them)
    forward = model_zoo.estimate_flops(model, shape)
    frozen_flops = 0.0
    if vae is not None:
        pixels = (1, 3, cfg.data.frames, cfg.data.height, cfg.data.width)
        encoder = getattr(vae, "encoder", vae)  # training encodes clips; it never decodes them
        frozen_flops = float(model_zoo.estimate_flops(encoder, pixels, make_inputs=lambda x: {}))
    patch = getattr(model.config, "patch_size", (1, 1, 1))
    tokens = int(shape[2] // patch[0] * (shape[3] // patch[1]) * (shape[4] // patch[2])) if isinstance(patch, tuple) else 0
    exchanged, ring_sent = _exchanged(model, tokens, sp, cfg.train.sp_ring)
    return ModelCounts(trainable, frozen, acts, acts_ckpt, 3.0 * forward, frozen_flops, tokens, exchanged, ring_sent)


@dataclass(frozen=True)
class Plan:
    config: str
    gpu: str
    nodes: int
    gpus_per_node: int
    zero_stage: int
    act_ckpt: bool
    precision: str
    micro_batch_size: int
    grad_accum: int
    trainable_params: int
    frozen_params: int
    memory_gb: dict[str, float]
    gpu_memory_gb: float
    fits: bool
    max_micro_batch: int
    step_flops: float
    assumed_mfu: float
    step_time_s: float
    clips_per_s: float
    tokens_per_s: float
    days_for_samples: float
    samples: int
    assumptions: list[str]
    sp_size: int = 1
    """Sequence-parallel degree (train.sp_size); memory figures are per rank of an SP group."""
    sp_ring: int = 1
    """Ring degree inside it (train.sp_ring; 1: Ulysses alone)."""
    all_to_all_gb_per_step: float = 0.0
    """Bytes one rank sends in Ulysses all-to-alls per optimizer step (forward, backward, recompute)."""


def static_bytes(trainable: int, frozen: int, *, world: int, stage: int, bf16: bool) -> dict[str, float]:
    """Per-rank bytes of weights, gradients and optimizer states under ZeRO `stage` (DeepSpeed's layout)."""
    weight = 2 if bf16 else 4
    params = trainable * weight / (world if stage >= 3 else 1)
    grads = trainable * weight / (world if stage >= 2 else 1)
    # Two fp32 Adam moments, plus an fp32 master copy of the weights whenever DeepSpeed keeps
    # one: in bf16, and in every ZeRO stage >= 1 even in fp32 (measured: tests/test_planner.py).
    master = bf16 or stage >= 1
    optimizer = trainable * (12 if master else 8) / (world if stage >= 1 else 1)
    frozen_bytes = frozen * weight
    buffers = 2 * BUCKET_ELEMENTS * weight if world > 1 else 0.0
    return {"params": params, "grads": grads, "optimizer": optimizer, "frozen": frozen_bytes, "buffers": buffers}


def make_plan(
    cfg: TrainJobConfig, counts: ModelCounts, *, config_name: str, gpu: str, nodes: int, gpus_per_node: int, zero_stage: int, act_ckpt: bool, mfu: float, samples: int
) -> Plan:
    spec = GPUS[gpu]
    world = nodes * gpus_per_node
    bf16 = cfg.train.precision == "bf16"
    memory = static_bytes(counts.trainable_params, counts.frozen_params, world=world, stage=zero_stage, bf16=bf16)
    per_sample = counts.activation_bytes_per_sample_ckpt if act_ckpt else counts.activation_bytes_per_sample
    budget = spec["memory_gb"] * 2**30 * HEADROOM
    static = sum(memory.values())
    max_micro = int((budget - static) // per_sample) if budget > static else 0
    mb = cfg.train.micro_batch_size
    memory_gb = {k: v / 2**30 for k, v in memory.items()}
    memory_gb["activations"] = per_sample * mb / 2**30
    memory_gb["activations_no_ckpt"] = counts.activation_bytes_per_sample * mb / 2**30
    memory_gb["activations_ckpt"] = counts.activation_bytes_per_sample_ckpt * mb / 2**30
    total = static + per_sample * mb
    memory_gb["total"] = total / 2**30
    recompute = 4.0 / 3.0 if act_ckpt else 1.0  # checkpointing re-runs the forward in backward
    sp = cfg.train.sp_size
    global_batch = mb * cfg.train.grad_accum * (world // sp)  # an SP group trains on one set of clips
    passes = 3 if act_ckpt else 2  # forward, backward (the reverse exchanges), recompute
    element = 2 if bf16 else 4
    all_to_all = counts.all_to_all_elements_per_sample * mb * cfg.train.grad_accum * passes * element
    step_flops = (counts.train_flops_per_sample * recompute + counts.frozen_flops_per_sample) * global_batch
    peak = spec["bf16_tflops" if bf16 else "fp32_tflops"] * 1e12
    step_time = step_flops / world / (peak * mfu)
    clips_per_s = global_batch / step_time
    return Plan(
        config=config_name, gpu=gpu, nodes=nodes, gpus_per_node=gpus_per_node, zero_stage=zero_stage, act_ckpt=act_ckpt,
        precision=cfg.train.precision, micro_batch_size=mb, grad_accum=cfg.train.grad_accum,
        trainable_params=counts.trainable_params, frozen_params=counts.frozen_params, memory_gb=memory_gb,
        gpu_memory_gb=spec["memory_gb"], fits=total <= budget, max_micro_batch=max_micro, step_flops=step_flops,
        assumed_mfu=mfu, step_time_s=step_time, clips_per_s=clips_per_s, tokens_per_s=clips_per_s * counts.tokens_per_sample,
        days_for_samples=samples / clips_per_s / 86400, samples=samples,
        sp_size=sp, sp_ring=cfg.train.sp_ring, all_to_all_gb_per_step=all_to_all / 2**30,
        assumptions=[
            "AdamW: 2 fp32 moments; an fp32 master copy in bf16 and under ZeRO >= 1",
            "frozen helpers (VAE, text encoder, frozen base) whole on every rank, not partitioned",
            f"communication buckets 2 x {BUCKET_ELEMENTS:.0e} elements when world > 1",
            f"{int(HEADROOM * 100)}% of GPU memory usable",
            f"step time at an assumed MFU of {mfu:.0%} of {'bf16' if bf16 else 'fp32'} peak ({peak / 1e12:.0f} TFLOP/s)",
            "activations measured on meta: bytes autograd saves for backward, per sample, with PyTorch's "
            "reference kernels except attention, counted as a fused (flash) kernel saves it",
        ],
    )


def bucket_configs(cfg: TrainJobConfig) -> list[TrainJobConfig]:
    """One config per bucket of `data.buckets` (its clip shape and batch size); [cfg] without."""
    if not cfg.data.buckets:
        return [cfg]
    return [
        replace(
            cfg,
            data=replace(cfg.data, frames=b.shape.frames, height=b.shape.height, width=b.shape.width, buckets=()),
            train=replace(cfg.train, micro_batch_size=b.batch_size),
        )
        for b in build_buckets(cfg.data, cfg.train.micro_batch_size)
    ]


def combine_plans(plans: list[Plan]) -> Plan:
    """The plan of a run whose steps visit every bucket equally often (the loader's schedule):
    the memory of the bucket that needs most (it must fit), the mean step FLOPs and time, and the
    clips and tokens of a round of steps over its time."""
    if len(plans) == 1:
        return plans[0]
    largest = max(plans, key=lambda plan: plan.memory_gb["total"])
    step_time = mean(plan.step_time_s for plan in plans)
    clips_per_s = mean(plan.clips_per_s * plan.step_time_s for plan in plans) / step_time
    return replace(
        largest,
        fits=all(plan.fits for plan in plans),
        step_flops=mean(plan.step_flops for plan in plans),
        step_time_s=step_time,
        clips_per_s=clips_per_s,
        tokens_per_s=mean(plan.tokens_per_s * plan.step_time_s for plan in plans) / step_time,
        days_for_samples=largest.samples / clips_per_s / 86400,
        assumptions=[
            *largest.assumptions,
            f"data.buckets: {len(plans)} buckets, each on an equal share of the steps; memory of the "
            f"bucket that needs most (micro-batch {largest.micro_batch_size}), step FLOPs and time the mean",
        ],
    )


def _with_sp(cfg: TrainJobConfig, sp: int, ring: int = 1) -> TrainJobConfig:
    return replace(cfg, train=replace(cfg.train, sp_size=sp, sp_ring=ring))


def _meta_task(cfg: TrainJobConfig) -> Any:
    """The task's networks on `meta`, built quietly (`measure` has already announced them)."""
    from trainer.tasks import build_task

    with torch.device("meta"), contextlib.redirect_stderr(io.StringIO()):
        return build_task(cfg, torch.device("meta"))


def _without_sp(model: nn.Module) -> None:
    """Undo `_shape_only_ulysses`: the model runs on the whole sequence again."""
    model.sequence_shard = None
    for attention in self_attentions(model):
        attention.core = None


def sp_unsupported(model: nn.Module) -> str | None:
    """Why `model` cannot run sequence-parallel at all (None: it can), in the model zoo's words."""
    try:
        _shape_only_ulysses(model, 1)
    except ValueError as err:
        return str(err)
    _without_sp(model)
    return None


def sp_problem(model: nn.Module, sp: int, *, gpus_per_node: int, world: int, ring: int = 1) -> str | None:
    """Why `sp` (with ring degree `ring`) cannot be the run's sequence-parallel degree (None: it
    can). An SP group is `sp` consecutive ranks kept inside a node, so `sp` divides the GPUs of a
    node (and so the world size); Ulysses shards the attention heads over sp / ring ranks, so that
    divides them too (the model zoo's own check)."""
    if sp < 1:
        return "the degree must be >= 1"
    if gpus_per_node % sp:
        return f"the degree must divide the {gpus_per_node} GPUs of a node (an SP group stays inside a node)"
    if world % sp:
        return f"the degree must divide the world size {world}"
    if ring < 1 or sp % ring:
        return f"train.sp_ring {ring} must divide the degree {sp}"
    if sp == 1:
        return None
    try:
        _shape_only_ulysses(model, sp, ring)
    except ValueError as err:
        return str(err)
    _without_sp(model)
    return None


def smallest_ring(model: nn.Module, sp: int, *, gpus_per_node: int, world: int) -> tuple[int | None, str | None]:
    """The least ring degree R (a divisor of `sp`) with which `sp` is valid: 1 (Ulysses alone)
    when the heads allow it, else the hybrid with the largest Ulysses part. Returns (R, None), or
    (None, the Ulysses problem) when no R helps (the degree itself cannot be used)."""
    first = sp_problem(model, sp, gpus_per_node=gpus_per_node, world=world)
    if first is None:
        return 1, None
    for ring in range(2, sp + 1):
        if sp % ring == 0 and sp_problem(model, sp, gpus_per_node=gpus_per_node, world=world, ring=ring) is None:
            return ring, None
    return None, first


def _per_rank_counts(
    model: nn.Module, shape: tuple[int, ...], sp: int, ring: int, whole: ModelCounts, dtype: torch.dtype
) -> ModelCounts:
    """`whole` (the counts at SP 1) with the activations and exchanged volume of one rank at
    degree `sp` (ring degree `ring`): what `measure` gives for `train.sp_size=sp`, without
    re-counting the parameters and FLOPs, which do not depend on the degree."""
    _shape_only_ulysses(model, sp, ring)
    try:
        acts, acts_ckpt = _activations(model, shape, dtype)
    finally:
        _without_sp(model)
    exchanged, ring_sent = _exchanged(model, whole.tokens_per_sample, sp, ring)
    return replace(
        whole, activation_bytes_per_sample=acts, activation_bytes_per_sample_ckpt=acts_ckpt,
        all_to_all_elements_per_sample=exchanged, ring_elements_per_sample=ring_sent,
    )


def measure_degrees(
    cfg: TrainJobConfig, degrees: list[int], *, dtype: torch.dtype, task: Any = None, rings: dict[int, int] | None = None
) -> dict[int, ModelCounts]:
    """`measure` at each degree of `degrees` (valid ones, see `sp_problem`; ring degree
    `rings[sp]`, default 1: Ulysses alone), with what does
    not depend on the degree measured once: one `measure` at SP 1 gives the parameters, FLOPs and
    tokens (and SP 1's activations); each degree > 1 only re-runs the two meta forwards of the
    activations, on one meta build of the task (`task`, to share one between buckets)."""
    from trainer.tasks.cmd import content_latent_shape

    whole = measure(_with_sp(cfg, 1), dtype=dtype)
    counts = {1: whole} if 1 in degrees else {}
    sharded = [sp for sp in degrees if sp > 1]
    if sharded:
        task = _meta_task(cfg) if task is None else task
        vae, content_vae = task.frozen.get("vae"), task.frozen.get("content_vae")
        shape = _input_shape(cfg, vae) if content_vae is None else content_latent_shape(content_vae, cfg.data.height, cfg.data.width)
        for sp in sharded:
            counts[sp] = _per_rank_counts(task.trained["model"], shape, sp, (rings or {}).get(sp, 1), whole, dtype)
    return counts


class SPError(ValueError):
    """A sequence-parallel degree that cannot be planned (the message says why)."""


@dataclass(frozen=True)
class SPChoice:
    """The sequence-parallel degree of a plan, how it was chosen and what the others would cost."""

    sp_size: int
    rule: str
    """"auto" (the smallest valid degree at which the micro-batch fits) or "forced" (--sp N, train.sp_size)."""
    reason: str
    """One line: why this degree."""
    plans: dict[int, Plan]
    """The plan at each degree measured (auto: every valid one)."""
    invalid: dict[int, str]
    """Degrees considered and refused, with the reason."""

    @property
    def plan(self) -> Plan:
        return self.plans[self.sp_size]


def ulysses_degrees(gpus_per_node: int) -> list[int]:
    """The Ulysses degrees `lvd plan` considers: the divisors of a node's GPU count (an SP group is
    consecutive ranks inside one node). Each is then checked by `sp_problem`."""
    return [sp for sp in range(1, gpus_per_node + 1) if gpus_per_node % sp == 0]


def choose_sp(plans: dict[int, Plan]) -> tuple[int, str]:
    """The rule: the smallest degree whose plan fits the GPU; when none fits, the degree that needs
    the least memory per GPU. Returns the degree and a line saying why."""
    degrees = sorted(plans)
    any_plan = plans[degrees[0]]
    budget = any_plan.gpu_memory_gb * HEADROOM
    mb = any_plan.micro_batch_size
    fitting = [sp for sp in degrees if plans[sp].fits]
    if not fitting:
        best = min(degrees, key=lambda sp: plans[sp].memory_gb["total"])
        return best, (
            f"no valid degree ({', '.join(map(str, degrees))}) fits micro-batch {mb} in {budget:.1f} GB; "
            f"showing SP {best}, the least memory per GPU ({plans[best].memory_gb['total']:.1f} GB; "
            f"largest micro-batch that fits there: {plans[best].max_micro_batch})"
        )
    sp = fitting[0]
    fit = f"micro-batch {mb} fits ({plans[sp].memory_gb['total']:.1f} of {budget:.1f} GB)"
    if sp == 1:
        return sp, f"auto: {fit} without sequence parallelism"
    below = max(d for d in degrees if d < sp)
    return sp, f"auto: the smallest valid degree at which {fit}; SP {below} needs {plans[below].memory_gb['total']:.1f} GB"


def plan_sp(cfg: TrainJobConfig, *, dtype: torch.dtype, forced: int | None = None, forced_by: str = "", **plan_args: Any) -> SPChoice:
    """The plan at the chosen sequence-parallel degree (`forced`, or the rule of `choose_sp` over
    the valid Ulysses degrees), with the plans of every degree measured. `plan_args` go to
    `make_plan` (gpu, nodes, gpus_per_node, ...). Raises SPError for an invalid `forced`."""
    gpus_per_node = plan_args["gpus_per_node"]
    world = plan_args["nodes"] * gpus_per_node
    task = _meta_task(cfg)
    model = task.trained["model"]
    invalid: dict[int, str] = {}
    unsupported = None
    rings: dict[int, int] = {}
    if forced is not None:
        rings[forced] = cfg.train.sp_ring if forced > 1 else 1
        problem = sp_problem(model, forced, gpus_per_node=gpus_per_node, world=world, ring=rings[forced])
        if problem:
            raise SPError(problem)
        degrees = [forced]
    elif (unsupported := sp_unsupported(model)) is not None:
        degrees = [1]
    else:
        degrees = []
        for sp in ulysses_degrees(gpus_per_node):
            ring, problem = smallest_ring(model, sp, gpus_per_node=gpus_per_node, world=world)
            if ring is None:
                invalid[sp] = problem or ""
            else:
                degrees.append(sp)
                rings[sp] = ring
    buckets = bucket_configs(cfg)
    counts = [measure_degrees(bucket, degrees, dtype=dtype, task=task, rings=rings) for bucket in buckets]
    plans = {
        sp: combine_plans([make_plan(_with_sp(bucket, sp, rings.get(sp, 1)), bucket_counts[sp], **plan_args) for bucket, bucket_counts in zip(buckets, counts)])
        for sp in degrees
    }
    if forced is not None:
        fits = "" if plans[forced].fits else "; it does not fit (--sp auto compares the valid degrees)"
        return SPChoice(forced, "forced", f"forced by {forced_by}{fits}", plans, invalid)
    if unsupported is not None:
        return SPChoice(1, "auto", f"auto: no other degree ({unsupported})", plans, invalid)
    sp, reason = choose_sp(plans)
    return SPChoice(sp, "auto", reason, plans, invalid)


def sp_choice_json(choice: SPChoice) -> dict[str, Any]:
    """The choice and every candidate degree, for `lvd plan --json`."""
    candidates: list[dict[str, Any]] = []
    for sp in sorted({*choice.plans, *choice.invalid}):
        if sp in choice.invalid:
            candidates.append({"sp_size": sp, "valid": False, "reason": choice.invalid[sp]})
            continue
        plan = choice.plans[sp]
        candidates.append({
            "sp_size": sp, "sp_ring": plan.sp_ring, "valid": True, "memory_gb": plan.memory_gb["total"], "fits": plan.fits,
            "max_micro_batch": plan.max_micro_batch, "all_to_all_gb_per_step": plan.all_to_all_gb_per_step,
            "step_time_s": plan.step_time_s, "clips_per_s": plan.clips_per_s,
        })
    budget = choice.plan.gpu_memory_gb * HEADROOM
    return {"chosen": choice.sp_size, "rule": choice.rule, "reason": choice.reason, "budget_gb": budget, "candidates": candidates}


def format_sp_choice(choice: SPChoice) -> str:
    """The line saying why this degree, and a compact table of the degrees considered."""
    ring = choice.plan.sp_ring
    lines = [f"SP degree: {choice.sp_size}" + (f" with train.sp_ring={ring}" if ring > 1 else "") + f" -- {choice.reason}"]
    if len(choice.plans) + len(choice.invalid) <= 1:
        return lines[0]
    lines.append(f"{'SP':>4}  {'memory/GPU':>10}  {'fits':>4}  {'max mb':>6}  {'all-to-all/rank/step':>20}  {'step time':>9}  {'clips/s':>8}")
    for sp in sorted({*choice.plans, *choice.invalid}):
        mark = "*" if sp == choice.sp_size else " "
        if sp in choice.invalid:
            lines.append(f"{sp:>3}{mark}  not valid: {choice.invalid[sp]}")
            continue
        p = choice.plans[sp]
        lines.append(
            f"{sp:>3}{mark}  {p.memory_gb['total']:>7.1f} GB  {'yes' if p.fits else 'no':>4}  {p.max_micro_batch:>6}  "
            f"{p.all_to_all_gb_per_step:>17.2f} GB  {p.step_time_s:>7.2f} s  {p.clips_per_s:>8.1f}"
            + (f"  (ring {p.sp_ring})" if p.sp_ring > 1 else "")
        )
    return "\n".join(lines)


def format_table(plan: Plan) -> str:
    m = plan.memory_gb
    rows = [
        ("config", plan.config),
        ("cluster", f"{plan.nodes} x {plan.gpus_per_node} {plan.gpu.upper()} ({plan.gpu_memory_gb:.0f} GB)"),
        ("ZeRO / act. ckpt / precision", f"{plan.zero_stage} / {'on' if plan.act_ckpt else 'off'} / {plan.precision}"),
        ("sequence parallel", f"{plan.sp_size}" + (f", ring {plan.sp_ring} (train.sp_ring)" if plan.sp_ring > 1 else "")
         + (f" (all-to-all {plan.all_to_all_gb_per_step:.2f} GB sent per rank per step)" if plan.sp_size > 1 else "")),
        ("parameters trainable / frozen", f"{plan.trainable_params / 1e9:.3f} B / {plan.frozen_params / 1e9:.3f} B"),
        ("memory per GPU: params", f"{m['params']:.2f} GB"),
        ("  gradients", f"{m['grads']:.2f} GB"),
        ("  optimizer states", f"{m['optimizer']:.2f} GB"),
        ("  frozen helpers", f"{m['frozen']:.2f} GB"),
        ("  buffers", f"{m['buffers']:.2f} GB"),
        (f"  activations (mb={plan.micro_batch_size})", f"{m['activations']:.2f} GB (no ckpt {m['activations_no_ckpt']:.2f}, ckpt {m['activations_ckpt']:.2f})"),
        ("  total", f"{m['total']:.2f} GB -> {'fits' if plan.fits else 'DOES NOT FIT'}"),
        ("largest micro-batch that fits", str(plan.max_micro_batch)),
        ("step FLOPs", f"{plan.step_flops:.3e}"),
        ("step time", f"{plan.step_time_s:.2f} s at MFU {plan.assumed_mfu:.0%}"),
        ("throughput", f"{plan.clips_per_s:.1f} clips/s, {plan.tokens_per_s:.3g} tokens/s"),
        (f"days for {plan.samples:.2e} samples", f"{plan.days_for_samples:.2f}"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
