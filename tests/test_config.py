"""The typed config loader: defaults, YAML differences, dotted overrides, errors that name the key."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from common.config import (
    REQUIRED,
    ConfigError,
    diff_from_defaults,
    dump_yaml,
    field_docs,
    from_dict,
    load_config,
    to_dict,
)
from data_pipeline.config import DataConfig
from trainer.config import (
    AutoencoderObjective,
    DiffusionConfig,
    DiffusionObjective,
    LVDMInterpolationObjective,
    LVDMPredictionObjective,
    ModelConfig,
    Objective,
    RunConfig,
    TrainConfig,
    TrainJobConfig,
)

REPO = Path(__file__).resolve().parent.parent
CONFIG_FILES = sorted((REPO / "configs").rglob("*.yaml"))


def test_defaults_resolve():
    cfg = load_config(TrainJobConfig)
    assert cfg == TrainJobConfig()
    assert cfg.train.steps == TrainConfig().steps


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_shipped_config_loads_and_holds_only_differences(path):
    """A file equal to the config's differences from the defaults holds no repeated default (the
    keys it marks required, `???`, given on the command line)."""
    import yaml

    data = yaml.safe_load(path.read_text())
    required = {
        f"{section}.{key}": f"/weights/{key}"
        for section, values in data.items()
        if isinstance(values, dict)
        for key, value in values.items()
        if value == REQUIRED
    }
    cfg = load_config(TrainJobConfig, path, [f"{key}={value}" for key, value in required.items()])
    for key, value in required.items():
        section, name = key.split(".")
        data[section][name] = value
    assert diff_from_defaults(cfg) == data


def test_overrides_apply_with_types(tmp_path):
    cfg = load_config(
        TrainJobConfig,
        REPO / "configs/tiny/unet3d.yaml",
        ["train.steps=20", "data.shards=/x/{000..003}.tar", "train.lr=1e-3", "train.act_ckpt=true", "data.weights=[0.7,0.3]"],
    )
    assert cfg.train.steps == 20
    assert cfg.data.shards == "/x/{000..003}.tar"
    assert cfg.train.lr == pytest.approx(1e-3)
    assert cfg.train.act_ckpt is True
    assert cfg.data.weights == (0.7, 0.3)


def test_string_override_keeps_text_verbatim():
    cfg = load_config(TrainJobConfig, None, ["run.dir=007", "model.init_from=null"])
    assert cfg.run.dir == "007"
    assert cfg.model.init_from is None


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["bogus.key=1"], "bogus.key"),
        (["train.bogus=1"], "train.bogus"),
        (["train.steps=abc"], "train.steps"),
        (["train.steps=1.5"], "train.steps"),
        (["train.zero_stage=4"], "train.zero_stage"),
        (["train.precision=fp16"], "train.precision"),
        (["data.p_uncond=2"], "data.p_uncond"),
        (["train.act_ckpt=maybe"], "train.act_ckpt"),
        (["train.compile=true", "train.zero_stage=3"], "train.compile"),
        (["train.warmup_steps=-1"], "train.warmup_steps"),
        (["train.sp_size=0"], "train.sp_size"),
        (["train.sp_size=2"], "train.sp_size"),  # unet3d: sequence parallelism needs a DiT
        (["train.steps.x=1"], "train.steps"),
    ],
)
def test_bad_values_name_the_key(overrides, key):
    with pytest.raises(ConfigError) as err:
        load_config(TrainJobConfig, REPO / "configs/tiny/unet3d.yaml", overrides)
    assert str(err.value).startswith(key), str(err.value)


def test_error_in_file_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  stepz: 3\n")
    with pytest.raises(ConfigError, match=r"train\.stepz: unknown key.*\(in .*bad\.yaml\)"):
        load_config(TrainJobConfig, bad)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(TrainJobConfig, tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(TrainJobConfig, broken)


def test_round_trip_through_yaml(tmp_path):
    cfg = load_config(TrainJobConfig, REPO / "configs/tiny/dit.yaml", ["train.betas=[0.8,0.95]", "model.overrides={depth: 3}"])
    path = tmp_path / "config.yaml"
    path.write_text(dump_yaml(cfg))
    assert load_config(TrainJobConfig, path) == cfg


def _all_config_classes() -> list[type]:
    import typing

    seen, todo = [], [TrainJobConfig]
    while todo:
        cls = todo.pop()
        seen.append(cls)
        for hint in typing.get_type_hints(cls).values():
            members = typing.get_args(hint) or (hint,)
            todo.extend(m for m in members if dataclasses.is_dataclass(m) and m not in seen and m not in todo)
    return seen


def test_every_config_class_is_reached():
    import typing

    reached = set(_all_config_classes())
    assert {RunConfig, TrainConfig, DataConfig, ModelConfig, *typing.get_args(Objective)} <= reached


@pytest.mark.parametrize("cls", _all_config_classes(), ids=lambda c: c.__name__)
def test_config_classes_are_frozen_kw_only_and_documented(cls):
    params = cls.__dataclass_params__
    assert params.frozen
    assert all(f.kw_only for f in dataclasses.fields(cls))
    docs = field_docs(cls)
    missing = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]
    assert not missing, f"{cls.__name__}: fields without a docstring: {missing}"


def test_objective_is_a_union_tagged_by_the_task():
    assert load_config(TrainJobConfig).objective == DiffusionObjective()
    cfg = load_config(TrainJobConfig, REPO / "configs/tiny/lvdm_interpolation.yaml", ["objective.p_no_mask=0.05"])
    assert isinstance(cfg.objective, LVDMInterpolationObjective)
    assert (cfg.objective.p_no_mask, cfg.objective.diffusion.loss_type) == (0.05, "l1")
    cfg = load_config(TrainJobConfig, None, ["objective.task=autoencoder", "objective.disc_start=7"])
    assert cfg.objective == AutoencoderObjective(disc_start=7)
    assert diff_from_defaults(cfg) == {"objective": {"task": "autoencoder", "disc_start": 7}}
    # another task whose terms the file's section also holds: only the tag changes
    cfg = load_config(TrainJobConfig, REPO / "configs/tiny/lvdm_prediction.yaml", ["objective.task=diffusion"])
    assert cfg.objective == DiffusionObjective(diffusion=DiffusionConfig(loss_type="l1"))


def test_objective_round_trips_through_the_checkpoint_dict(tmp_path):

    cfg = load_config(TrainJobConfig, REPO / "configs/tiny/lvdm_prediction.yaml", ["objective.conditioning.s_max=100"])
    assert from_dict(TrainJobConfig, to_dict(cfg)) == cfg
    path = tmp_path / "config.yaml"
    path.write_text(dump_yaml(cfg))
    assert load_config(TrainJobConfig, path) == cfg


@pytest.mark.parametrize(
    ("path", "overrides", "message"),
    [
        ("unet3d.yaml", ["objective.task=bogus"], r"^objective\.task: must be one of 'diffusion', .*got 'bogus' \(in command line\)"),
        ("unet3d.yaml", ["objective.p_pred=0.2"], r"^objective\.p_pred: unknown key; valid keys: diffusion, flow, image_rate, name, task \(in command line\)"),
        ("lvdm_prediction.yaml", ["objective.p_interp=0.5"], r"^objective\.p_interp: unknown key; valid keys: conditioning, diffusion, p_pred, task"),
        ("lvdm_prediction.yaml", ["objective.conditioning.s_max=1000"], r"^objective\.conditioning: s_max must be < diffusion\.num_timesteps"),
        ("lvdm_interpolation.yaml", ["objective.p_no_mask=0.2"], r"^objective\.p_no_mask: p_interp \+ p_no_mask must be <= 1"),
        ("autoencoder.yaml", ["objective.task=lvdm_prediction"], r"^objective\.loss_type: unknown key.*\(in .*autoencoder\.yaml\)"),
        ("unet3d.yaml", ["objective.loss_type=l1"], r"^objective\.loss_type: unknown key; valid keys: diffusion, flow, image_rate, name, task"),
    ],
)
def test_objective_errors_name_the_key_and_where_it_came_from(path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(TrainJobConfig, REPO / "configs/tiny" / path, overrides)


def test_objective_tag_in_a_file_must_be_known(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("objective:\n  task: lvdm\n")
    with pytest.raises(ConfigError, match=r"^objective\.task: must be one of .*got 'lvdm' \(in .*bad\.yaml\)"):
        load_config(TrainJobConfig, bad)
    bad.write_text("objective: 3\n")
    with pytest.raises(ConfigError, match=r"^objective: expected a section"):
        load_config(TrainJobConfig, bad)


def test_prediction_and_interpolation_objectives_hold_only_their_own_terms():
    prediction = {f.name for f in dataclasses.fields(LVDMPredictionObjective)}
    interpolation = {f.name for f in dataclasses.fields(LVDMInterpolationObjective)}
    assert prediction ^ interpolation == {"p_pred", "p_interp", "p_no_mask"}
    assert {f.name for f in dataclasses.fields(AutoencoderObjective)}.isdisjoint({"diffusion", "conditioning"})


def test_from_dict_rejects_section_as_scalar():
    with pytest.raises(ConfigError, match="^train: expected a section"):
        from_dict(TrainJobConfig, {"train": 3})


LEGACY = REPO / "tests" / "golden" / "resolved_configs_before_tagged_objective"


CHANGED_SINCE = {
    "lvdm_prediction.yaml": ["data.frames=8", "data.frame_stride=1", "model.overrides={}"],
    "lvdm_interpolation.yaml": ["data.frames=8", "model.overrides={}"],
    "streaming.yaml": ["data.frames=6"],
    "temporal_decoder.yaml": ["objective.disc_start=50000"],
}
"""Tiny configs changed since the recorded resolved configs: the overrides that undo the change
(the LVDM models train strided and stride-conditioned; StreamingT2V's chunk needs as many latent
frames as its F_cond conditioning frames, so its clips grew to 8 frames; the temporal decoder's
discriminator starts at step 20)."""


@pytest.mark.parametrize("name", sorted(p.name for p in LEGACY.glob("*.yaml")))
def test_a_resolved_config_of_the_flat_objective_reads_as_todays_config(name):
    """`lvd export` reads runs that an older `lvd train` wrote: their resolved config (recorded in
    tests/golden/ with that version's `--print-config`) upgrades to exactly today's config."""
    import yaml

    from trainer.config import upgrade_resolved_config

    old = yaml.safe_load((LEGACY / name).read_text())
    assert "task" in old["train"]
    since = CHANGED_SINCE.get(name, [])
    assert from_dict(TrainJobConfig, upgrade_resolved_config(old)) == load_config(TrainJobConfig, REPO / "configs" / "tiny" / name, since)
    today = to_dict(load_config(TrainJobConfig, REPO / "configs" / "tiny" / name))
    assert upgrade_resolved_config(today) == today


def test_an_upgraded_videofusion_config_keeps_a_changed_lambda():
    import yaml

    from trainer.config import upgrade_resolved_config

    old = yaml.safe_load((LEGACY / "videofusion.yaml").read_text())
    old["objective"]["videofusion_lambda"] = 0.3
    cfg = from_dict(TrainJobConfig, upgrade_resolved_config(old))
    assert cfg.model.overrides == {"lam": 0.3} and cfg.objective.task == "videofusion"


def test_an_older_config_of_a_task_that_no_longer_exists_is_one_clear_error():
    from trainer.config import upgrade_resolved_config

    with pytest.raises(ValueError, match=r"train.task: 'cmd' of an older lvd has no objective today \(valid: .*cmd_autoencoder"):
        upgrade_resolved_config({"train": {"task": "cmd"}, "objective": {}})
