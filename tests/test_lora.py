"""LoRA (docs/methods.md, 'LoRA'): only the adapter trains and is checkpointed, resume keeps it and
refuses another base, the export writes it (peft layout) and the merged model, the sampler merges it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from common.config import ConfigError, load_config
from trainer.config import TrainJobConfig

REPO = Path(__file__).resolve().parent.parent
SMALL = [
    "data.height=32",
    "data.width=32",
    "train.micro_batch_size=1",
    "train.warmup_steps=1",
    "train.lr=1e-2",
]
LORA = ["train.lora.rank=4", "train.lora.alpha=8"]


def _config(name: str, run_dir: Path, shards: str, *extra: str) -> TrainJobConfig:
    overrides = [*SMALL, *LORA, f"data.shards={shards}", f"run.dir={run_dir}", *extra]
    return load_config(TrainJobConfig, REPO / "configs" / "tiny" / name, overrides)


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Per family, a tiny text-to-video denoiser with random non-zero weights everywhere, as a
    stand-in for a pretrained base (a fresh one has a zero output layer: no gradient would reach
    the adapters)."""
    import model_zoo

    out = {}
    for family in ("unet3d", "dit"):
        base = model_zoo.build_model(family, "tiny", context_dim=32, in_channels=4, out_channels=4)
        generator = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for param in base.parameters():
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
        out[f"{family}.yaml"] = (
            f"model.init_from={model_zoo.save_pretrained(base, tmp_path_factory.mktemp(family))}"
        )
    return out


def _session(cfg: TrainJobConfig, steps: int):
    from trainer.engine import init_distributed
    from trainer.session import build, next_micro_batches, save, train_step

    session = build(cfg, init_distributed())
    for _ in range(steps):
        train_step(session, next_micro_batches(session))
    if steps:
        save(session)
    return session


def _inputs(context_dim: int = 32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = torch.randn(1, 4, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    context = torch.randn(1, 77, context_dim, generator=torch.Generator().manual_seed(2))
    return x, torch.tensor([500]), context


@pytest.mark.parametrize("name", ["unet3d.yaml", "dit.yaml"])
def test_only_the_adapter_trains_and_the_checkpoint_holds_only_it(name, tmp_path, video_shards, bases):
    from trainer.engine import consolidated_state_dict
    from trainer.tasks import build_task

    cfg = _config(name, tmp_path, video_shards, bases[name])
    base = dict(build_task(cfg, torch.device("cpu")).trained["model"].named_parameters())
    session = _session(cfg, steps=2)
    module = session.engines["model"].module
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert sum(p.numel() for n, p in module.named_parameters() if n in trainable) < 0.2 * sum(
        p.numel() for p in base.values()
    )
    # The base did not move; the adapter did (B starts at zero).
    for name_, param in module.named_parameters():
        if name_ not in trainable:
            torch.testing.assert_close(param, base[name_.replace(".base_layer", "")], rtol=0, atol=0)
    assert any(p.abs().sum() > 0 for n, p in module.named_parameters() if ".lora_B." in n)
    tag = (tmp_path / "checkpoints" / "latest").read_text().strip()
    state = consolidated_state_dict(tmp_path / "checkpoints" / tag, "model")
    assert set(state) == trainable
    meta = json.loads((tmp_path / "checkpoints" / tag / "meta.json").read_text())
    assert len(meta["lora_base"]["sha256"]) == 64


def test_resume_keeps_the_adapter_and_refuses_another_base(tmp_path, video_shards, bases):
    cfg = _config("unet3d.yaml", tmp_path, video_shards, "train.steps=4", bases["unet3d.yaml"])
    first = _session(cfg, steps=2)
    saved = {
        n: p.detach().clone() for n, p in first.engines["model"].module.named_parameters() if p.requires_grad
    }
    resumed = _session(cfg, steps=0)
    assert resumed.counters.step == 2
    for name, param in resumed.engines["model"].module.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param, saved[name], rtol=0, atol=0)
    from trainer.session import TrainingError

    other_base = _config("unet3d.yaml", tmp_path, video_shards, "train.steps=4")  # the seeded random base
    with pytest.raises(TrainingError, match="LoRA checkpoint was trained on another base"):
        _session(other_base, steps=0)


def test_merged_export_equals_base_plus_adapter_and_the_sampler_merges_the_adapter(
    tmp_path, video_shards, bases
):
    from peft import PeftModel

    import model_zoo
    from trainer import export_cli
    from trainer.export import export
    from trainer.lora import rebuilt_base

    run = tmp_path / "run"
    cfg = _config("unet3d.yaml", run, video_shards, bases["unet3d.yaml"])
    engine = _session(cfg, steps=2).engines["model"]
    engine.eval()
    x, t, context = _inputs()
    with torch.no_grad():
        want = engine(x, t, context=context)  # the base with the peft adapters, as trained
    merged, adapter_only = tmp_path / "merged", export(run, tmp_path / "adapter")
    assert (
        export_cli.main(["--run", str(run), "--out", str(merged), "--merge", "--lora-format", "comfyui"]) == 0
    )
    assert {p.name for p in adapter_only.iterdir()} == {
        "adapter_config.json",
        "adapter_model.safetensors",
        "lvd_base.json",
    }
    assert {
        "adapter_model.safetensors",
        "lora_comfyui.safetensors",
        "denoiser",
        "model_index.json",
    } <= {p.name for p in merged.iterdir()}
    with torch.no_grad():
        got = model_zoo.from_pretrained(merged / "denoiser").eval()(x, t, context=context)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        # peft itself reads the adapter folder onto the rebuilt base and gives the same output.
        meta = json.loads((run / "checkpoints" / "step_00000002" / "meta.json").read_text())
        base = rebuilt_base(cfg, meta, where="test").eval()
        base_out = base(x, t, context=context)
        assert not torch.allclose(base_out, want, atol=1e-4)
        by_peft = PeftModel.from_pretrained(base, str(adapter_only)).eval()(x, t, context=context)
        torch.testing.assert_close(by_peft, want, rtol=1e-5, atol=1e-5)
    # lvd sample --lora: the base pipeline + the adapter = the merged pipeline; scale 0 = the base.
    from sampler.pipeline import load_pipeline

    base_pipe = tmp_path / "base_pipe"
    shutil.copytree(merged, base_pipe)
    model_zoo.save_pretrained(rebuilt_base(cfg, meta, where="test"), base_pipe / "denoiser")
    with torch.no_grad():
        sampled = load_pipeline(base_pipe, lora=str(adapter_only)).denoiser(x, t, context=context)
        torch.testing.assert_close(sampled, want, rtol=1e-5, atol=1e-5)
        unscaled = load_pipeline(base_pipe, lora=str(adapter_only), lora_scale=0.0).denoiser(
            x, t, context=context
        )
        torch.testing.assert_close(unscaled, base_out, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="trained on another base"):
        load_pipeline(merged, lora=str(adapter_only))
    from sampler.cli import build_parser, config_from_args

    flags = [
        "--model",
        str(base_pipe),
        "--lora",
        str(adapter_only),
        "--lora-scale",
        "0.5",
        "--prompt",
        "x",
        "--out",
        "v.mp4",
    ]
    sample = config_from_args(build_parser().parse_args(flags))
    assert (sample.lora, sample.lora_scale) == (str(adapter_only), 0.5)


def test_lora_config_errors_name_the_key(tmp_path, video_shards, capsys):
    from trainer.lora import target_modules
    from trainer.lora_config import LoraConfig

    with pytest.raises(ConfigError, match=r"train\.lora\.rnk"):
        _config("unet3d.yaml", tmp_path, video_shards, "train.lora.rnk=4")
    with pytest.raises(ConfigError, match=r"train\.lora\.rank"):
        _config("unet3d.yaml", tmp_path, video_shards, "train.lora.rank=-1")
    from trainer.loop import train

    no_default_targets = _config("autoencoder.yaml", tmp_path / "vae", video_shards)  # a video VAE
    assert train(no_default_targets) == 1
    assert "train.lora.targets: the video_vae network has no default LoRA targets" in capsys.readouterr().err
    import model_zoo

    unet = model_zoo.build_model("unet3d", "tiny")
    with pytest.raises(ValueError, match=r"train\.lora\.targets: 'nothing_here' matches no linear layer"):
        target_modules(unet, LoraConfig(rank=4, targets=("nothing_here",)))
    spatial = target_modules(unet, LoraConfig(rank=4, targets=(r".*\.spatial\..*\.(qkv|q|kv|out)",)))
    assert spatial and not any(".temporal." in name for name in spatial)
    assert any(".temporal.attn." in name for name in target_modules(unet, LoraConfig(rank=4)))
