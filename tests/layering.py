"""The import rules of STYLE.md, checked with `ast` (run by tests/test_layering.py).

    model_zoo      -> torch, einops, ... never deepspeed, torch.distributed, yaml, submitit,
                      nor trainer / sampler / data_pipeline / lvd
    data_pipeline  -> never model_zoo, trainer, sampler
    sampler        -> never trainer
    deepspeed      -> imported by trainer/engine.py only
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

FORBIDDEN: dict[str, tuple[str, ...]] = {
    "model_zoo": ("deepspeed", "torch.distributed", "yaml", "submitit", "trainer", "sampler", "data_pipeline", "lvd"),
    "data_pipeline": ("model_zoo", "trainer", "sampler"),
    "sampler": ("trainer",),
}
DEEPSPEED_HOME = "trainer/engine.py"


@dataclass(frozen=True)
class Violation:
    path: str
    line: int
    module: str
    rule: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: imports {self.module} ({self.rule})"


def imported_modules(tree: ast.AST) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
            found.extend((node.lineno, f"{node.module}.{alias.name}") for alias in node.names)
    return found


def _matches(module: str, banned: str) -> bool:
    return module == banned or module.startswith(banned + ".")


def check_file(path: Path, root: Path) -> list[Violation]:
    rel = path.relative_to(root).as_posix()
    package = rel.split("/", 1)[0]
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=rel)
    violations = []
    for line, module in imported_modules(tree):
        for banned in FORBIDDEN.get(package, ()):
            if _matches(module, banned):
                violations.append(Violation(rel, line, module, f"{package} must not import {banned}"))
        if _matches(module, "deepspeed") and rel != DEEPSPEED_HOME and package != "model_zoo":
            violations.append(Violation(rel, line, module, f"only {DEEPSPEED_HOME} imports deepspeed"))
    return violations


def check_tree(root: Path) -> list[Violation]:
    violations = []
    for package in ("model_zoo", "data_pipeline", "sampler", "trainer", "lvd", "benchmarks"):
        for path in sorted((root / package).rglob("*.py")):
            violations.extend(check_file(path, root))
    return violations
