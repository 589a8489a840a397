from pathlib import Path

from lvd.layering import check_tree

REPO = Path(__file__).resolve().parent.parent


def test_repository_respects_layering():
    violations = check_tree(REPO)
    assert not violations, "\n".join(map(str, violations))


def _plant(root: Path, rel: str, source: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(source)


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
    found = {(v.path, v.module.split(".")[0]) for v in check_tree(tmp_path)}
    assert found >= {
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


def test_checker_allows_clean_code(tmp_path):
    _plant(tmp_path, "model_zoo/ok.py", "import torch\nfrom einops import rearrange\nfrom model_zoo.layers import x\n")
    _plant(tmp_path, "data_pipeline/ok.py", "import webdataset\nimport torch.distributed as dist\n")
    assert check_tree(tmp_path) == []
