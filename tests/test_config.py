"""The typed config loader: defaults, YAML differences, dotted overrides, errors that name the key."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from common.config import ConfigError, diff_from_defaults, dump_yaml, field_docs, from_dict, load_config
from data_pipeline.config import DataConfig
from trainer.config import ModelConfig, ObjectiveConfig, RunConfig, TrainConfig, TrainJobConfig

REPO = Path(__file__).resolve().parent.parent
CONFIG_FILES = sorted((REPO / "configs").rglob("*.yaml"))


def test_defaults_resolve():
    cfg = load_config(TrainJobConfig)
    assert cfg == TrainJobConfig()
    assert cfg.train.steps == TrainConfig().steps


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_shipped_config_loads_and_holds_only_differences(path):
    import yaml

    from common.config import to_dict

    cfg = load_config(TrainJobConfig, path)
    raw = yaml.safe_load(path.read_text())
    defaults = to_dict(TrainJobConfig())
    for section, values in raw.items():
        for key, value in values.items():
            assert defaults[section][key] != value, f"{path}: {section}.{key} repeats the default"
    assert diff_from_defaults(cfg) == {s: {k: (list(v) if isinstance(v, tuple) else v) for k, v in vals.items()} for s, vals in raw.items()}


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


def _all_config_classes():
    seen, todo = [], [TrainJobConfig]
    while todo:
        cls = todo.pop()
        seen.append(cls)
        todo.extend(f.type for f in dataclasses.fields(cls) if dataclasses.is_dataclass(f.type) and f.type not in seen)
    return seen


@pytest.mark.parametrize("cls", [TrainJobConfig, RunConfig, TrainConfig, DataConfig, ModelConfig, ObjectiveConfig])
def test_config_classes_are_frozen_kw_only_and_documented(cls):
    params = cls.__dataclass_params__
    assert params.frozen
    assert all(f.kw_only for f in dataclasses.fields(cls))
    docs = field_docs(cls)
    missing = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]
    assert not missing, f"{cls.__name__}: fields without a docstring: {missing}"


def test_from_dict_rejects_section_as_scalar():
    with pytest.raises(ConfigError, match="^train: expected a section"):
        from_dict(TrainJobConfig, {"train": 3})
