"""Every task config in configs/tiny/ trains on real shards (in this process, one rank)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from common.config import load_config
from trainer import checkpoint
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


@pytest.mark.parametrize("name", TASK_CONFIGS)
def test_every_tiny_task_trains_on_real_shards(name, tmp_path, video_shards):
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

    from trainer.export import export

    compare_run(name, [records[step]["loss"] for step in (1, 2, 3)], export(tmp_path, tmp_path / "export"))


def test_zero3_training_puts_torch_linear_back(tmp_path, video_shards, monkeypatch):
    """A ZeRO-3 engine replaces F.linear process-wide (DeepSpeed's zero3_linear_wrap); `train`
    restores torch's, so sampling after training in one process computes what a fresh one does."""
    import torch.nn.functional as F

    import trainer.loop as loop

    cfg = _config("unet3d.yaml", tmp_path, video_shards, "train.steps=1", "train.checkpoint_every=0", "train.zero_stage=3")
    seen = []
    original_step = loop._train_step

    def spy(*args, **kwargs):
        seen.append(F.linear)
        return original_step(*args, **kwargs)

    monkeypatch.setattr(loop, "_train_step", spy)
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
    monkeypatch.setenv(checkpoint.FAULT_ENV, "nan_loss:3")
    cfg = _config("unet3d.yaml", tmp_path / "once", video_shards, "train.steps=4", "train.checkpoint_every=2")
    assert train(cfg) == 0
    records = read_metrics(tmp_path / "once")
    assert [records[s]["skipped"] for s in (1, 2, 3, 4)] == [0.0, 0.0, 1.0, 0.0]
    assert records[4]["skipped_total"] == 1.0

    monkeypatch.setenv(checkpoint.FAULT_ENV, "nan_loss_from:3")
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
    from data_pipeline.loader import build_loader
    from trainer import export as export_mod
    from trainer.ema import Ema
    from trainer.engine import build_engine, init_distributed, local_shard, restore_torch_linear
    from trainer.loop import RunState, _save, _save_frozen, rank_generator
    from trainer.tasks import build_task

    cfg = _config("unet3d.yaml", tmp_path, video_shards, "train.zero_stage=3", "train.ema_decay=0.9")
    info = init_distributed()
    task = build_task(cfg, info.device)
    _save_frozen(task, tmp_path / "frozen")
    engines = {name: build_engine(module, cfg.train, info) for name, module in task.trained.items()}
    loader = build_loader(cfg.data, rank=0, world_size=1, batch_size=2, seed=0, tokenizer=task.tokenizer())
    gen = rank_generator(0, 0)
    ema = Ema(engines["model"].module, 0.9, local_shard)
    for step in range(2):
        out = task.losses(engines, next(loader), gen, step)
        engines["model"].backward(out.losses[0][1])
        engines["model"].step()
        ema.update()
    state = RunState(step=2)
    _save(cfg, tmp_path / "checkpoints", info, engines, loader, gen, ema, state)
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
def test_bf16_training_runs(config, tmp_path, video_shards):
    cfg = _config(config, tmp_path, video_shards, "train.steps=2", "train.checkpoint_every=0", "train.precision=bf16", "train.zero_stage=2")
    assert train(cfg) == 0
    records = read_metrics(tmp_path)
    assert sorted(records) == [1, 2] and all(math.isfinite(r["loss"]) for r in records.values())


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


def test_dropped_captions_train_the_empty_prompt_context_on_cached_text_embeddings(tmp_path):
    """With cached text embeddings, a caption the loader dropped (p_uncond) gives the empty
    prompt's context, the one the sampler's CFG uses, not the clip's cached caption embedding."""
    from trainer.tasks import build_task

    cfg = _config("unet3d.yaml", tmp_path, "unused", "data.latent=true")
    task = build_task(cfg, torch.device("cpu"))
    encoder = task.frozen["text_encoder"]
    captions = ["a red bicycle", ""]
    cached = encoder(task.tokenizer()(["a red bicycle", "a blue car"]))  # what the cache holds
    batch = {"latents": torch.zeros(2, 4, 2, 4, 4), "text_emb": cached, "caption": captions, "tokens": task.tokenizer()(captions)}
    _, context = task.encode(batch, torch.Generator().manual_seed(0))
    with torch.no_grad():
        empty = encoder(task.tokenizer()([""]))[0]
    torch.testing.assert_close(context[0], cached[0])
    torch.testing.assert_close(context[1], empty)
    assert not torch.allclose(context[1], cached[1])


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
    cfg = _config("unet3d.yaml", tmp_path / "run", str(tmp_path / "latents"), "data.latent=true", "train.steps=2", "train.checkpoint_every=0")
    assert train(cfg) == 0
    assert sorted(read_metrics(tmp_path / "run")) == [1, 2]
    # Caption dropout through the real loader, cached and raw: every dropped caption (p_uncond = 1)
    # trains the empty prompt's context, the one the sampler's CFG uses.
    from data_pipeline.loader import build_loader
    from trainer.tasks import build_task

    for latent, source in ((True, str(tmp_path / "latents")), (False, video_shards)):
        cfg = _config("unet3d.yaml", tmp_path / "drop", source, f"data.latent={str(latent).lower()}", "data.p_uncond=1.0",
                      f"model.text_encoder={pipeline / 'text_encoder'}")
        task = build_task(cfg, torch.device("cpu"))
        batch = next(build_loader(cfg.data, rank=0, world_size=1, batch_size=2, seed=0, tokenizer=task.tokenizer()))
        assert batch["caption"] == ["", ""] and ("text_emb" in batch) == latent
        _, context = task.encode(batch, torch.Generator().manual_seed(0))
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
    s_max = cfg.objective.s_max
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
    # videofusion's lam comes from the objective; the others from model.overrides
    field, value, setting = {
        "unet3d.yaml": ("model_channels", 64, "model.overrides={model_channels: 64}"),
        "videofusion.yaml": ("lam", 0.25, "objective.videofusion_lambda=0.25"),
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
