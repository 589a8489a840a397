from pathlib import Path

from layering import check_tree

REPO = Path(__file__).resolve().parent.parent


def test_repository_respects_layering():
    violations = check_tree(REPO)
    assert not violations, "\n".join(map(str, violations))


def _plant(root: Path, rel: str, source: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(source)


def _found(root: Path) -> set[tuple[str, str]]:
    return {(v.path, v.module.split(".")[0]) for v in check_tree(root)}


def test_checker_catches_deepspeed_in_model_zoo(tmp_path):
    _plant(tmp_path, "model_zoo/bad.py", "import torch\nimport deepspeed\n")
    violations = check_tree(tmp_path)
    assert [(v.path, v.line, v.module) for v in violations] == [("model_zoo/bad.py", 2, "deepspeed")]


def test_checker_catches_each_forbidden_edge(tmp_path):
    _plant(tmp_path, "model_zoo/a.py", "from torch.distributed import all_reduce\nimport yaml\nimport submitit\n")
    _plant(tmp_path, "data_pipeline/b.py", "from model_zoo.unet3d import UNet3D\nimport trainer.loop\nfrom sampler import x\n")
    _plant(tmp_path, "sampler/c.py", "from trainer.engine import build_engine\n")
    _plant(tmp_path, "trainer/loop.py", "import deepspeed\n")
    _plant(tmp_path, "trainer/engine.py", "import deepspeed\n")
    assert _found(tmp_path) >= {
        ("model_zoo/a.py", "torch"),
        ("model_zoo/a.py", "yaml"),
        ("model_zoo/a.py", "submitit"),
        ("data_pipeline/b.py", "model_zoo"),
        ("data_pipeline/b.py", "trainer"),
        ("data_pipeline/b.py", "sampler"),
        ("sampler/c.py", "trainer"),
        ("trainer/loop.py", "deepspeed"),
    }
    assert not any(v.path == "trainer/engine.py" for v in check_tree(tmp_path))


def test_checker_keeps_the_ground_floor_free_of_the_project_and_of_torch(tmp_path):
    layers = ("model_zoo", "data_pipeline", "trainer", "sampler", "metrics", "slurm", "lvd")
    for package in layers:
        _plant(tmp_path, f"common/uses_{package}.py", f"from {package} import x\n")
    _plant(tmp_path, "common/heavy.py", "import torch\nimport deepspeed\nfrom submitit import helpers\n")
    found = _found(tmp_path)
    assert found == {(f"common/uses_{p}.py", p) for p in layers} | {
        ("common/heavy.py", "torch"),
        ("common/heavy.py", "deepspeed"),
        ("common/heavy.py", "submitit"),
    }


def test_checker_catches_the_new_upward_edges(tmp_path):
    _plant(tmp_path, "model_zoo/a.py", "from data_pipeline import loader\nimport slurm.submit\nfrom lvd.cli import main\n")
    _plant(tmp_path, "data_pipeline/b.py", "from slurm import shard_merge\nimport lvd\n")
    _plant(tmp_path, "trainer/c.py", "from sampler.pipeline import load_pipeline\nfrom slurm.submit import main\nfrom lvd.cli import main\n")
    _plant(tmp_path, "sampler/d.py", "from slurm import submit\nimport lvd.demo\n")
    _plant(tmp_path, "slurm/e.py", "import trainer.loop\nfrom sampler import program\nfrom model_zoo import x\nimport lvd.cli\n")
    _plant(tmp_path, "metrics/f.py", "from sampler.pipeline import load_pipeline\nimport model_zoo\nimport trainer\n")
    _plant(tmp_path, "sampler/g.py", "from metrics import mawe\n")
    _plant(tmp_path, "trainer/h.py", "import metrics.cli\n")
    assert _found(tmp_path) == {
        ("model_zoo/a.py", "data_pipeline"),
        ("model_zoo/a.py", "slurm"),
        ("model_zoo/a.py", "lvd"),
        ("data_pipeline/b.py", "slurm"),
        ("data_pipeline/b.py", "lvd"),
        ("trainer/c.py", "sampler"),
        ("trainer/c.py", "slurm"),
        ("trainer/c.py", "lvd"),
        ("sampler/d.py", "slurm"),
        ("sampler/d.py", "lvd"),
        ("slurm/e.py", "trainer"),
        ("slurm/e.py", "sampler"),
        ("slurm/e.py", "model_zoo"),
        ("slurm/e.py", "lvd"),
        ("metrics/f.py", "sampler"),
        ("metrics/f.py", "model_zoo"),
        ("metrics/f.py", "trainer"),
        ("sampler/g.py", "metrics"),
        ("trainer/h.py", "metrics"),
    }


def test_checker_reports_an_import_once(tmp_path):
    _plant(tmp_path, "sampler/a.py", "from trainer import loop\n")
    assert [(v.line, v.module) for v in check_tree(tmp_path)] == [(1, "trainer")]


def test_checker_allows_clean_code(tmp_path):
    _plant(tmp_path, "model_zoo/ok.py", "import torch\nfrom einops import rearrange\nfrom model_zoo.layers import x\nfrom common.files import atomic_write\n")
    _plant(tmp_path, "data_pipeline/ok.py", "import webdataset\nimport torch.distributed as dist\nfrom common.files import atomic_write\n")
    _plant(tmp_path, "trainer/ok.py", "from model_zoo import x\nfrom data_pipeline import y\nfrom common import config\n")
    _plant(tmp_path, "sampler/ok.py", "from model_zoo import x\nfrom data_pipeline import y\nfrom common.progress import Progress\n")
    _plant(tmp_path, "slurm/ok.py", "import submitit\nfrom common.config import load_config\nfrom data_pipeline import shard_cli\n")
    _plant(tmp_path, "lvd/ok.py", "import trainer.cli\nimport sampler.cli\nimport slurm.submit\nimport common.config\n")
    _plant(tmp_path, "benchmarks/ok.py", "from lvd.cli import main\nimport trainer.loop\n")
    _plant(tmp_path, "metrics/ok.py", "import numpy\nfrom data_pipeline.video_io import iter_frames\nfrom common.files import atomic_write\n")
    _plant(tmp_path, "common/ok.py", "import yaml\nfrom common.config import load_config\n")
    assert check_tree(tmp_path) == []
