"""The import plan of the project, checked with `ast` (run by tests/test_layering.py).

Imports go one way, down this plan; each package may import only the project packages listed
(and itself):

    lvd            the CLI: may import every package (nothing imports it but tests and benchmarks)
    slurm          -> common, data_pipeline (the array sharder slices inputs as the sharder lists
                      them); train and sample jobs start `python -m lvd ...`, they do not import it
    trainer        -> model_zoo, data_pipeline, common
    sampler        -> model_zoo, data_pipeline, common (never trainer)
    metrics        -> data_pipeline, common (`lvd eval` reads video files, not the sampler)
    model_zoo      -> common; never deepspeed, torch.distributed, yaml or submitit (one CPU suffices)
    data_pipeline  -> common
    common         -> nothing of the project; never torch, deepspeed or submitit (the ground floor
                      stays light: `lvd --help` imports it)
    benchmarks     may import every package

Only trainer/engine.py imports deepspeed. Tests may import anything and are not checked.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

EVERY_PACKAGE = ("common", "model_zoo", "data_pipeline", "trainer", "sampler", "metrics", "slurm", "lvd", "benchmarks")
"""The project's top-level packages, the ones the plan covers."""
MAY_IMPORT: dict[str, tuple[str, ...]] = {
    "common": (),
    "model_zoo": ("common",),
    "data_pipeline": ("common",),
    "trainer": ("common", "model_zoo", "data_pipeline"),
    "sampler": ("common", "model_zoo", "data_pipeline"),
    "metrics": ("common", "data_pipeline"),
    "slurm": ("common", "data_pipeline"),
    "lvd": EVERY_PACKAGE,
    "benchmarks": EVERY_PACKAGE,
}
"""Each package -> the project packages it may import besides itself."""
BANNED_LIBRARIES: dict[str, tuple[str, ...]] = {
    "common": ("torch", "deepspeed", "submitit"),
    "model_zoo": ("deepspeed", "torch.distributed", "yaml", "submitit"),
}
"""Third-party modules a package must not import."""
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


def _rules_broken(rel: str, package: str, module: str) -> list[str]:
    rules = []
    top = module.split(".", 1)[0]
    if top in EVERY_PACKAGE and top != package and top not in MAY_IMPORT[package]:
        allowed = ", ".join(MAY_IMPORT[package]) or "nothing of the project"
        rules.append(f"{package} may import {allowed}")
    rules.extend(
        f"{package} must not import {banned}"
        for banned in BANNED_LIBRARIES.get(package, ())
        if _matches(module, banned)
    )
    if _matches(module, "deepspeed") and rel != DEEPSPEED_HOME and package not in BANNED_LIBRARIES:
        rules.append(f"only {DEEPSPEED_HOME} imports deepspeed")
    return rules


def check_file(path: Path, root: Path) -> list[Violation]:
    rel = path.relative_to(root).as_posix()
    package = rel.split("/", 1)[0]
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=rel)
    found: dict[tuple[int, str], Violation] = {}  # `from a import b` is checked as a and a.b: report once
    for line, module in imported_modules(tree):
        for rule in _rules_broken(rel, package, module):
            found.setdefault((line, rule), Violation(rel, line, module, rule))
    return list(found.values())


def check_tree(root: Path) -> list[Violation]:
    violations = []
    for package in EVERY_PACKAGE:
        for path in sorted((root / package).rglob("*.py")):
            violations.extend(check_file(path, root))
    return violations
