"""train.compile through `lvd train`: regional torch.compile keeps the eager run's checkpoint and
export keys, and a backend that does not work here gives one clear line and an eager run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import run_lvd

REPO = Path(__file__).resolve().parent.parent
SMALL = [
    "data.height=32",
    "data.width=32",
    "train.micro_batch_size=2",
    "train.warmup_steps=1",
    "train.steps=2",
]


def _train(run_dir: Path, shards: str, *extra: str) -> int:
    from lvd.cli import main

    config = str(REPO / "configs" / "tiny" / "dit.yaml")
    return main(["train", "--config", config, *SMALL, f"data.shards={shards}", f"run.dir={run_dir}", *extra])


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def _keys(run_dir: Path) -> tuple[list[str], list[str]]:
    """The parameter names of the run's last checkpoint and of its export."""
    import model_zoo
    from trainer import checkpoint
    from trainer.engine import consolidated_state_dict
    from trainer.export import export

    tag = checkpoint.latest_tag(run_dir / "checkpoints")
    assert tag is not None
    saved = sorted(consolidated_state_dict(run_dir / "checkpoints" / tag, "model"))
    exported = export(run_dir, run_dir.parent / f"export-{run_dir.name}")
    return saved, sorted(model_zoo.from_pretrained(exported / "denoiser").state_dict())


def test_compiled_run_has_the_eager_checkpoint_and_export_keys(tmp_path, video_shards):
    """aot_eager keeps the test fast; the inductor run is the slow test in test_trainer_tasks.py."""
    from torch._dynamo.utils import counters

    keys = {}
    for name, extra in {
        "eager": [],
        "compiled": ["train.compile=true", "train.compile_backend=aot_eager"],
    }.items():
        counters.clear()
        assert _train(tmp_path / name, video_shards, *extra) == 0
        assert _graphs() > 0 if name == "compiled" else _graphs() == 0
        keys[name] = _keys(tmp_path / name)
    assert keys["compiled"] == keys["eager"]
    assert not any("_orig_mod" in key for names in keys["compiled"] for key in names)


def test_disabled_compile_trains_eager_after_one_line(tmp_path, video_shards, capsys):
    """TORCH_COMPILE_DISABLE=1 sets this flag at import; set here as the process already imported torch."""
    from torch._dynamo.utils import counters

    counters.clear()
    # The config module's own patch: monkeypatch's undo leaves `disable` hidden for later tests.
    with torch._dynamo.config.patch(disable=True):
        assert _train(tmp_path / "run", video_shards, "train.compile=true") == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if "train.compile" in line]
    assert lines == [
        "lvd train: train.compile: backend 'inductor' unavailable, training eager: "
        "torch.compile is disabled in this process (TORCH_COMPILE_DISABLE=1)"
    ]
    assert _graphs() == 0


def test_unknown_compile_backend_is_a_clear_error(tmp_path, video_shards, capsys):
    assert _train(tmp_path / "run", video_shards, "train.compile=true", "train.compile_backend=nope") == 1
    err = capsys.readouterr().err
    assert "train.compile_backend: unknown backend 'nope' (known: " in err and "inductor" in err


@pytest.mark.slow
def test_no_c_compiler_trains_eager_after_one_line(tmp_path, video_shards):
    """A real missing toolchain: inductor's C++ compiler points nowhere (and its cache is empty)."""
    env = {"CXX": str(tmp_path / "no-such-g++"), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    config = str(REPO / "configs" / "tiny" / "dit.yaml")
    args = [
        "train",
        "--config",
        config,
        *SMALL,
        f"data.shards={video_shards}",
        f"run.dir={tmp_path / 'run'}",
        "train.compile=true",
    ]
    result = run_lvd(*args, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if "train.compile" in line]
    assert len(lines) == 1, lines
    assert lines[0].startswith("lvd train: train.compile: backend 'inductor' unavailable, training eager: ")
    assert "InvalidCxxCompiler" in lines[0] and "no-such-g++" in lines[0]
