"""Every task config in configs/tiny/ trains on real shards (in this process, one rank)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from common.config import load_config
from trainer import checkpoint, faults
from trainer.config import TrainJobConfig
from trainer.loop import train
from trainer.monitor import read_metrics

REPO = Path(__file__).resolve().parent.parent
TASK_CONFIGS = sorted(p.name for p in (REPO / "configs" / "tiny").glob("*.yaml"))
SMALL = ["data.height=32", "data.width=32", "train.micro_batch_size=2", "run.log_every=1", "train.warmup_steps=1"]


def _config(name: str, run_dir: Path, shards: str, *extra: str) -> TrainJobConfig:
    return load_config(TrainJobConfig, REPO / "configs" / "tiny" / name, [*SMALL, f"data.shards={shards}", f"run.dir={run_dir}", *extra])


def _random_base(directory: Path) -> Path:
    """A tiny text-to-video unet3d with random (non-zero) weights everywhere, as a stand-in for a
    trained base: a fresh one has a zero output layer and would pass no gradient to CAM/APM."""
    import model_zoo

    base = model_zoo.build_model("unet3d", "tiny", context_dim=32)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for param in base.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    return model_zoo.save_pretrained(base, directory)


NETWORKS = {
    "autoencoder.yaml": ({"vae", "discriminator"}, set()),
    "causal_vae.yaml": ({"vae", "discriminator"}, set()),
    "cmd_autoencoder.yaml": ({"vae"}, set()),
    "cmd_content.yaml": ({"content_denoiser"}, {"text_encoder", "vae"}),
    "streaming.yaml": ({"denoiser"}, {"text_encoder", "vae", "image_encoder"}),
    "temporal_decoder.yaml": ({"vae", "discriminator"}, set()),
}
"""Per task config: the exported trained networks and frozen helpers (others: a text-to-video denoiser)."""
UNMOVED = {
    "autoencoder.yaml": {"discriminator"},
    "causal_vae.yaml": {"discriminator"},
    "temporal_decoder.yaml": {"discriminator"},
}
"""Trained networks that must not move in 3 steps (the discriminator waits for disc_start=20)."""
IDLE = {
    "dit.yaml": {"cond_embed.weight", "cond_embed.bias"},
    "dit_flow.yaml": {"cond_embed.weight", "cond_embed.bias"},
    "unet3d.yaml": {"level_embed.weight"},
    "unet3d_buckets.yaml": {"level_embed.weight"},
}
"""Trainable tensors of inputs the task does not feed (the tiny flavours' content-frame and
level embeddings, which CMD and LVDM use): they get no gradient and keep their initial values."""


def _moved_tensors(cfg: TrainJobConfig, export: Path) -> dict[str, tuple[set[str], set[str], set[str]]]:
    """Per exported trained network: (its trainable tensors, those that moved, frozen ones that moved)
    between the task's initialisation and the export of the trained run."""
    from safetensors.torch import load_file

    from trainer.tasks import TASKS, build_task

    task = build_task(cfg, torch.device("cpu"))
    out = {}
    for engine, module in task.trained.items():
        folder = TASKS[cfg.objective.task].components[engine]
        trained = load_file(str(export / folder / "model.safetensors"))
        params = dict(module.named_parameters())
        moved = {name for name, param in params.items() if not torch.equal(param.detach(), trained[name])}
        trainable = {name for name, param in params.items() if param.requires_grad}
        out[folder] = (trainable, moved & trainable, moved - trainable)
    return out


@pytest.mark.parametrize("name", TASK_CONFIGS)
def test_every_tiny_task_trains_on_real_shards(name, tmp_path, video_shards):
    """Each task trains its networks and only them: its trainable tensors move, what it holds
    frozen (a base, an encoder, a discriminator before disc_start) keeps its initial weights."""
    extra = [f"model.base={_random_base(tmp_path / 'base')}"] if name == "streaming.yaml" else []
    cfg = _config(name, tmp_path, video_shards, "train.steps=3", "train.checkpoint_every=0", *extra)
    assert train(cfg) == 0
    records = read_metrics(tmp_path)
    assert sorted(records) == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) and r["skipped"] == 0.0 for r in records.values())
    assert math.isfinite(records[3]["grad_norm"]) and records[3]["grad_norm"] > 0
    assert checkpoint.latest_tag(tmp_path / "checkpoints") == "step_00000003"
    assert (tmp_path / "config.yaml").is_file()
    from test_recorded_outputs import compare_run

    from trainer.export import export as export_run

    export = export_run(tmp_path, tmp_path / "export")
    compare_run(name, [records[step]["loss"] for step in (1, 2, 3)], export)
    trained, frozen = NETWORKS.get(name, ({"denoiser"}, {"text_encoder", "vae"}))
    assert {p.name for p in export.iterdir() if p.is_dir()} - {"scheduler"} == trained | frozen
    for network, (trainable, moved, frozen_moved) in _moved_tensors(cfg, export).items():
        assert trainable, f"{network}: nothing trains"
        assert not frozen_moved, f"{network}: frozen tensors moved: {sorted(frozen_moved)[:5]}"
        idle = trainable if network in UNMOVED.get(name, ()) else IDLE.get(name, set())
        assert trainable - moved == idle, f"{network}: trainable tensors that did not move: {sorted(trainable - moved)[:5]}"


def test_zero3_training_puts_torch_linear_back(tmp_path, video_shards, monkeypatch):
    """A ZeRO-3 engine replaces F.linear process-wide (DeepSpeed's zero3_linear_wrap); `train`
    restores torch's, so sampling after training in one process computes what a fresh one does."""
    import torch.nn.functional as F

    import trainer.loop as loop

    cfg = _config("unet3d.yaml", tmp_path, video_shards, "train.steps=1", "train.checkpoint_every=0", "train.zero_stage=3")
    seen = []
    original_step = loop.train_step

    def spy(*args, **kwargs):
        seen.append(F.linear)
        return original_step(*args, **kwargs)

    monkeypatch.setattr(loop, "train_step", spy)
    assert train(cfg) == 0
    assert seen and seen[0] is not torch._C._nn.linear  # ZeRO-3 did replace it during training
    assert F.linear is torch._C._nn.linear


def test_diffusion_loss_falls_over_50_steps(tmp_path, video_shards):
    cfg = _config("unet3d.yaml", tmp_path, video_shards, "train.steps=50", "train.checkpoint_every=0", "train.lr=2e-3", "data.p_uncond=0")
    assert train(cfg) == 0
    records = read_metrics(tmp_path)
    assert records[1]["lr"] == pytest.approx(2e-3)  # the first update already moves (warm-up of 1 step)
    losses = [r["loss"] for _, r in sorted(records.items())]
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.8 * first, (first, last)


def test_injected_nan_is_skipped_then_stops_after_k(tmp_path, video_shards, monkeypatch):
    monkeypatch.setenv(faults.FAULT_ENV, "nan_loss:3")
    cfg = _config("unet3d.yaml", tmp_path / "once", video_shards, "train.steps=4", "train.checkpoint_every=2")
    assert train(cfg) == 0
    records = read_metrics(tmp_path / "once")
    assert [records[s]["skipped"] for s in (1, 2, 3, 4)] == [0.0, 0.0, 1.0, 0.0]
    assert records[4]["skipped_total"] == 1.0

    monkeypatch.setenv(faults.FAULT_ENV, "nan_loss_from:3")
    cfg = _config("unet3d.yaml", tmp_path / "streak", video_shards, "train.steps=10", "train.checkpoint_every=2", "train.max_bad_steps=3")
    assert train(cfg) == 1
    records = read_metrics(tmp_path / "streak")
    assert max(records) == 5 and [records[s]["skipped"] for s in (3, 4, 5)] == [1.0, 1.0, 1.0]
    ckpt_dir = tmp_path / "streak" / "checkpoints"
    tag = checkpoint.latest_tag(ckpt_dir)
    assert tag == "step_00000004"
    from trainer.engine import consolidated_state_dict

    state = consolidated_state_dict(ckpt_dir / tag, "model")
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_export_round_trip_matches_the_engine(tmp_path, video_shards):
    import model_zoo
    from trainer import export as export_mod
    from trainer.engine import init_distributed, restore_torch_linear
    from trainer.session import build, next_micro_batches, save, train_step

    cfg = _config("unet3d.yaml", tmp_path, video_shards, "train.zero_stage=3", "train.ema_decay=0.9")
    session = build(cfg, init_distributed())
    for _ in range(2):
        train_step(session, next_micro_batches(session))
        session.ema.update()
    save(session)
    engines = session.engines
    exported = export_mod.export(tmp_path, tmp_path / "export")
    loaded = model_zoo.from_pretrained(exported / "denoiser").eval()
    x = torch.randn(1, 4, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([500])
    context = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(2))
    engines["model"].eval()
    with torch.no_grad():
        want = engines["model"](x, t, context=context)
        got = loaded(x, t, context=context)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # The pipeline folder: frozen helpers, scheduler loadable by diffusers, EMA export differs.
    from diffusers import DDIMScheduler

    assert {p.name for p in exported.iterdir()} >= {"model_index.json", "denoiser", "vae", "text_encoder", "scheduler"}
    from sampler.cli import build_parser, config_from_args

    sample_args = build_parser().parse_args(["--model", str(exported), "--prompt", "x", "--out", "v.mp4"])
    trained = (cfg.data.height, cfg.data.width)
    assert (config_from_args(sample_args).height, config_from_args(sample_args).width) == trained
    scheduler = DDIMScheduler.from_pretrained(exported / "scheduler")
    assert scheduler.config.beta_schedule == "scaled_linear"
    ema_dir = export_mod.export(tmp_path, tmp_path / "export_ema", ema=True)
    ema_model = model_zoo.from_pretrained(ema_dir / "denoiser")
    with torch.no_grad():
        assert not torch.allclose(ema_model(x, t, context=context), want)
    restore_torch_linear()  # the engines above are ZeRO-3 ones built outside train()


@pytest.mark.parametrize("config", ["unet3d.yaml", "dit.yaml"])
def test_bf16_training_computes_in_bf16_close_to_fp32(config, tmp_path, video_shards, monkeypatch):
    """The engine holds bf16 weights and its forward computes in bf16; the losses stay within
    bf16's rounding of the fp32 run's recorded ones. (Step 1 may be equal in both: a zero-initialised
    output layer predicts 0 whatever the precision; step 2 is not.)"""
    import trainer.session as session_mod

    outputs, engines = [], []
    build_engine = session_mod.build_engine

    def spy(*args, **kwargs):
        engines.append(build_engine(*args, **kwargs))
        engines[-1].module.register_forward_hook(lambda module, inputs, output: outputs.append(output.dtype))
        return engines[-1]

    monkeypatch.setattr(session_mod, "build_engine", spy)
    cfg = _config(config, tmp_path, video_shards, "train.steps=2", "train.checkpoint_every=0", "train.precision=bf16", "train.zero_stage=2")
    assert train(cfg) == 0
    records = read_metrics(tmp_path)
    assert sorted(records) == [1, 2] and all(math.isfinite(r["loss"]) for r in records.values())
    assert {p.dtype for p in engines[0].module.parameters()} == {torch.bfloat16}
    assert outputs and set(outputs) == {torch.bfloat16}
    from test_recorded_outputs import GOLDEN

    fp32 = json.loads((GOLDEN / "tiny_task_losses.json").read_text())[config]["loss"]  # the same run in fp32
    bf16 = [records[1]["loss"], records[2]["loss"]]
    assert bf16 == pytest.approx(fp32[:2], rel=0.02) and bf16[1] != fp32[1]


@pytest.mark.slow
def test_compiled_blocks_train_like_eager(tmp_path, video_shards):
    """train.compile=true (regional torch.compile, here with activation checkpointing) gives the
    eager run's losses, really compiles, and leaves the checkpoint's parameter names alone."""
    from torch._dynamo.utils import counters

    from trainer import export as export_mod

    losses, keys = {}, {}
    for name, extra in {"eager": [], "compiled": ["train.compile=true", "train.act_ckpt=true"]}.items():
        counters.clear()
        cfg = _config("dit.yaml", tmp_path / name, video_shards, "train.steps=2", "train.checkpoint_every=0", *extra)
        assert train(cfg) == 0
        graphs = counters["stats"]["unique_graphs"]
        assert graphs > 0 if name == "compiled" else graphs == 0
        losses[name] = [r["loss"] for _, r in sorted(read_metrics(tmp_path / name).items())]
        exported = export_mod.export(tmp_path / name, tmp_path / f"export-{name}")
        keys[name] = sorted(model_zoo_state(exported / "denoiser"))
    assert losses["compiled"] == pytest.approx(losses["eager"], rel=1e-4)
    assert keys["compiled"] == keys["eager"]


def test_act_ckpt_skips_networks_without_blocks_and_a_one_step_run_has_no_warmup(tmp_path, video_shards):
    """The autoencoder task trains a VAE (blocks) and a patch discriminator (none) together; a
    1-step run (DeepSpeed refuses 0 warm-up steps) trains at the full rate."""
    cfg = _config("autoencoder.yaml", tmp_path, video_shards, "train.steps=1", "train.checkpoint_every=0", "train.act_ckpt=true")
    assert train(cfg) == 0
    record = read_metrics(tmp_path)[1]
    assert math.isfinite(record["loss"]) and record["lr"] == pytest.approx(cfg.train.lr)


def test_warmup_steps_zero_starts_at_the_full_rate():
    from trainer.config import TrainConfig
    from trainer.engine import deepspeed_config

    for train_cfg in (TrainConfig(warmup_steps=0), TrainConfig(steps=1)):
        params = deepspeed_config(train_cfg, world_size=1, on_cuda=False)["scheduler"]["params"]
        assert params["warmup_num_steps"] == 1 and params["warmup_min_ratio"] == 1.0
    params = deepspeed_config(TrainConfig(steps=100, warmup_steps=10), world_size=1, on_cuda=False)["scheduler"]["params"]
    assert params["warmup_num_steps"] == 10 and params["warmup_min_ratio"] == pytest.approx(0.1)


def model_zoo_state(folder: Path) -> dict[str, torch.Tensor]:
    import model_zoo

    return model_zoo.from_pretrained(folder).state_dict()


def test_latent_cache_trains_with_only_the_shard_path_and_a_flag(tmp_path, video_shards):
    """`lvd shard latents --vae <pipeline>` then `lvd train ... data.latent=true` on its shards."""
    import json

    import model_zoo
    from lvd.shard_cmd import main as shard_main

    pipeline = tmp_path / "pipeline"
    for name, family in (("vae", "video_vae"), ("text_encoder", "text_encoder")):
        torch.manual_seed(0)
        model_zoo.save_pretrained(model_zoo.build_model(family, "tiny"), pipeline / name)
    (pipeline / "model_index.json").write_text(json.dumps({"vae": ["model_zoo", "video_vae"], "text_encoder": ["model_zoo", "text_encoder"]}))
    shards = video_shards.split("/{")[0]
    code = shard_main(["latents", "--input", shards, "--vae", str(pipeline), "--out", str(tmp_path / "latents"), "--frames", "8", "--height", "32", "--width", "32"])
    assert code == 0
    manifest = json.loads((tmp_path / "latents" / "manifest.json").read_text())
    assert manifest["samples"] > 0
    cfg = _config("unet3d.yaml", tmp_path / "run", str(tmp_path / "latents"), "data.latent=true", "train.steps=2", "train.checkpoint_every=0",
                  f"model.text_encoder={pipeline / 'text_encoder'}")
    assert train(cfg) == 0
    assert sorted(read_metrics(tmp_path / "run")) == [1, 2]
    # Caption dropout through the real loader, cached and raw: every dropped caption (p_uncond = 1)
    # trains the empty prompt's context, the one the sampler's CFG uses.
    from data_pipeline.loader import build_loader
    from trainer.tasks import build_task
    from trainer.tasks.interface import Batch

    for latent, source in ((True, str(tmp_path / "latents")), (False, video_shards)):
        cfg = _config("unet3d.yaml", tmp_path / "drop", source, f"data.latent={str(latent).lower()}", "data.p_uncond=1.0",
                      f"model.text_encoder={pipeline / 'text_encoder'}")
        task = build_task(cfg, torch.device("cpu"))
        batch = Batch.from_loader(next(build_loader(cfg.data, rank=0, world_size=1, batch_size=2, seed=0, tokenizer=task.tokenizer())))
        assert batch.captions == ["", ""] and (batch.text_emb is not None) == latent
        _, context = task.encoders.encode(batch, torch.Generator().manual_seed(0), torch.device("cpu"))
        with torch.no_grad():
            empty = task.frozen["text_encoder"](task.tokenizer()([""]))
        torch.testing.assert_close(context, empty.expand_as(context))


@pytest.mark.parametrize("name, no_mask_share", [("lvdm_prediction.yaml", 0.5), ("lvdm_interpolation.yaml", 0.1)])
def test_lvdm_samples_without_a_mask_train_the_no_condition_level_the_sampler_uses(tmp_path, video_shards, name, no_mask_share):
    """Both LVDM models train the unconditional branch ε_u (all masks zero) at their rate, with
    the no-condition level class s_max + 1; the export records it, and the sampler's ε_u feeds
    the network exactly that class."""
    from sampler.denoisers import lvdm_predict_fn
    from sampler.pipeline import load_pipeline
    from trainer import export as export_mod
    from trainer.tasks import build_task

    cfg = _config(name, tmp_path, video_shards, "train.steps=1", "train.checkpoint_every=0")
    task = build_task(cfg, torch.device("cpu"))
    s_max = cfg.objective.conditioning.s_max
    assert task.trained["model"].config.num_levels == s_max + 2
    mask, levels = task.draw_conditioning(torch.Generator().manual_seed(0), 4000, 4)
    none = ~mask.bool().any(dim=1)
    assert abs(float(none.float().mean()) - no_mask_share) < 0.025
    assert bool((levels[none] == s_max + 1).all()) and bool((levels[~none] <= s_max).all())
    if name == "lvdm_interpolation.yaml":
        assert bool((mask[~none] == torch.tensor([1.0, 0.0, 0.0, 1.0])).all())  # the rest: interpolation masks only
    assert train(cfg) == 0
    pipeline = load_pipeline(export_mod.export(tmp_path, tmp_path / "export"))
    assert pipeline.uncond_level == s_max + 1
    seen = []
    pipeline.denoiser.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs["level"]), with_kwargs=True)
    net_input = torch.randn(1, 5, 4, 8, 8)
    with torch.no_grad():
        lvdm_predict_fn(pipeline, "a red bicycle")(net_input, torch.tensor([500]), None)
    assert seen[0].tolist() == [s_max + 1]


@pytest.mark.parametrize("name", ["unet3d.yaml", "videofusion.yaml", "streaming.yaml"])
def test_init_from_starts_from_the_export_and_refuses_overrides_it_does_not_hold(tmp_path, video_shards, name):
    """`model.init_from` loads the export's weights for every task (videofusion and streaming
    too), and an override the checkpoint's config does not hold is an error naming it."""
    import model_zoo
    from trainer import export as export_mod
    from trainer.tasks import build_task

    extra = [f"model.base={_random_base(tmp_path / 'base')}"] if name == "streaming.yaml" else []
    cfg = _config(name, tmp_path / "first", video_shards, "train.steps=1", "train.checkpoint_every=0", *extra)
    assert train(cfg) == 0
    export = export_mod.export(tmp_path / "first", tmp_path / "export") / "denoiser"
    want = model_zoo.from_pretrained(export).state_dict()
    cfg = _config(name, tmp_path / "second", video_shards, f"model.init_from={export}", *extra)
    got = build_task(cfg, torch.device("cpu")).trained["model"].state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    field, value, setting = {
        "unet3d.yaml": ("model_channels", 64, "model.overrides={model_channels: 64}"),
        "videofusion.yaml": ("lam", 0.25, "model.overrides={lam: 0.25}"),
        "streaming.yaml": ("cond_frames", 4, "model.overrides={cond_frames: 4}"),
    }[name]
    cfg = _config(name, tmp_path / "third", video_shards, f"model.init_from={export}", setting, *extra)
    with pytest.raises(ValueError, match=rf"model.init_from=.*{field} \(checkpoint .*, asked {value}\)"):
        build_task(cfg, torch.device("cpu"))


def test_a_one_process_run_leaves_no_rank_variables_behind(tmp_path, video_shards):
    """`lvd train` in this process must not leave RANK/WORLD_SIZE/MASTER_* set: a `lvd train
    --nproc 2` or an sbatch job started from here afterwards would inherit them and run as rank
    0 of 1 (or both tasks of a job would try to be the rendezvous server)."""
    import os

    from trainer.engine import init_distributed

    before = {key: os.environ.get(key) for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    for key in before:
        os.environ.pop(key, None)
    try:
        init_distributed()
        cfg = _config("unet3d.yaml", tmp_path, video_shards, "train.steps=1", "train.checkpoint_every=0")
        assert train(cfg) == 0
        assert [key for key in before if key in os.environ] == []
    finally:
        os.environ.update({key: value for key, value in before.items() if value is not None})


def test_training_after_another_process_group_was_torn_down_in_this_process(tmp_path, video_shards):
    """Code other than `lvd train` (a sampler world, a test) may destroy the process group
    directly; DeepSpeed's cached clone of the old world group must not be reused by the next run."""
    import torch.distributed as dist

    from trainer.engine import init_distributed

    first = _config("unet3d.yaml", tmp_path / "first", video_shards, "train.steps=1", "train.checkpoint_every=0")
    assert train(first) == 0  # DeepSpeed now holds a clone of this process group
    dist.destroy_process_group()
    init_distributed()
    second = _config("unet3d.yaml", tmp_path / "second", video_shards, "train.steps=1", "train.checkpoint_every=0")
    assert train(second) == 0


def _latent_batch(task, *, batch_size: int = 2, frames: int = 4, seed: int = 0):
    """A batch of random latents (B, 4, frames, 8, 8) with captions, as a latent cache gives it."""
    from trainer.tasks.interface import Batch

    captions = ["a red bicycle", "a blue car"][:batch_size]
    latents = torch.randn(batch_size, 4, frames, 8, 8, generator=torch.Generator().manual_seed(seed))
    return Batch(captions=captions, latents=latents, tokens=task.tokenizer()(captions), frame_stride=torch.ones(len(captions), dtype=torch.long))


def test_lvdm_loss_ignores_the_conditioned_frames(tmp_path):
    """Any output on the given frames costs nothing; on the frames to predict it does."""
    from trainer.tasks import build_task

    cfg = _config("lvdm_prediction.yaml", tmp_path, "unused", "data.latent=true", "objective.p_pred=1.0", "objective.conditioning.cond_frames=2")
    task = build_task(cfg, torch.device("cpu"))
    model = task.trained["model"]
    batch = _latent_batch(task)

    def loss(shift_given: float, shift_predicted: float) -> tuple[float, float]:
        def denoise(x, t, **cond):
            given = x[:, -1:]  # the mask channel: 1 on the conditioned frames
            return model(x, t, **cond) + shift_given * given + shift_predicted * (1 - given)

        with torch.no_grad():
            out = task.losses({"model": denoise}, batch, torch.Generator().manual_seed(3), 0)
        return out.losses[0][1].item(), out.metrics["mask_frac"]

    plain, mask_frac = loss(0.0, 0.0)
    assert mask_frac == 0.5  # every sample conditioned on 2 of its 4 frames
    assert loss(100.0, 0.0)[0] == plain
    assert loss(0.0, 100.0)[0] > 100 * plain


@pytest.mark.parametrize("lam", [1.0, 0.5])
def test_videofusion_frames_share_their_base_noise(tmp_path, lam):
    """The noise the generators learn to remove has the model's λ share common to all frames of
    a clip: identical frames at λ = 1, a frame-to-frame correlation of λ otherwise."""
    from trainer.tasks import build_task

    cfg = _config("videofusion.yaml", tmp_path, "unused", "data.latent=true", f"model.overrides={{lam: {lam}}}")
    task = build_task(cfg, torch.device("cpu"))
    batch = _latent_batch(task, frames=6)
    seen = {}

    def spy(x, t, **cond):
        seen["x_t"], seen["t"] = x, t
        return task.trained["model"](x, t, **cond)

    with torch.no_grad():
        task.losses({"model": spy}, batch, torch.Generator().manual_seed(2), 0)
    alpha_bar = task.diffusion.alphas_cumprod[seen["t"]].view(-1, 1, 1, 1, 1)
    noise = (seen["x_t"] - alpha_bar.sqrt() * batch.latents) / (1 - alpha_bar).sqrt()  # (B, C, T, h, w)
    frames = noise.transpose(1, 2).flatten(2)  # (B, T, C*h*w)
    correlation = torch.corrcoef(frames.transpose(0, 1).flatten(1))  # (T, T) over all clips
    off_diagonal = correlation[~torch.eye(frames.shape[1], dtype=torch.bool)]
    assert off_diagonal.min() > lam - 0.15 and off_diagonal.max() < min(lam + 0.15, 1.0 + 1e-4)


def test_rank_state_round_trips_and_refuses_a_state_without_a_field():
    from trainer.checkpoint import Counters, RankState

    state = RankState(
        counters=Counters(step=4, bad_streak=1, skipped_total=2, flops_per_step=3.5),
        generator={"1": torch.Generator().manual_seed(1).get_state()},
        torch_rng=torch.get_rng_state(),
        cuda_rng=None,
        loader={"1": {"batches": 7}},
        ema=None,
        world_size=2,
        data_ranks=2,
    )
    again = RankState.from_dict(state.to_dict())
    assert again.counters == state.counters and again.loader == {"1": {"batches": 7}} and again.world_size == 2
    assert again.data_ranks == 2 and torch.equal(again.generator["1"], state.generator["1"])
    incomplete = {k: v for k, v in state.to_dict().items() if k != "loader"}
    with pytest.raises(ValueError, match=r"rank state without \['loader'\]"):
        RankState.from_dict(incomplete)


def test_a_rank_state_of_the_older_layout_resumes_with_its_counters(tmp_path):
    """Rank files written before the counters had a type (loose keys, the step only in the tag)
    and before data ranks (one generator and loader per rank) still resume: `read_rank_state`
    upgrades them."""
    from trainer.checkpoint import rank_state_path, read_rank_state

    path = rank_state_path(tmp_path, "step_00000012", 1)
    path.parent.mkdir(parents=True)
    generator = torch.Generator().manual_seed(3).get_state()
    older = {
        "generator": generator, "torch_rng": torch.get_rng_state(), "cuda_rng": None, "loader": {"batches": 5},
        "ema": None, "bad_streak": 1, "skipped_total": 2, "flops_per_step": 9.0, "world_size": 2,
    }
    torch.save(older, path)
    state = read_rank_state(tmp_path, "step_00000012", 1)
    assert (state.counters.step, state.counters.bad_streak, state.counters.skipped_total, state.counters.flops_per_step) == (12, 1, 2, 9.0)
    assert state.loader == {"1": {"batches": 5}} and torch.equal(state.generator["1"], generator)
    assert state.data_ranks == 2


def test_the_registry_has_a_task_for_every_objective_and_no_other():
    import typing

    from trainer.config import Objective
    from trainer.tasks import TASKS

    tags = {tag for member in typing.get_args(Objective) for tag in typing.get_args(typing.get_type_hints(member)["task"])}
    assert tags == set(TASKS)
