"""The repository documents itself: code cites docs/methods.md by section title, and nothing outside
the repository (a spec section, an issue number)."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("common", "model_zoo", "data_pipeline", "trainer", "sampler", "metrics", "slurm", "lvd", "benchmarks", "scripts", "tests")
CITATION = re.compile(r"docs/methods\.md,?\s+((?:'[^']+'(?:,\s*|\s+and\s+)?)+)")
OUTSIDE = re.compile(r"SPEC\s*§|SPEC\.md|\.\./shared|\bissue\s+#?\d+|\(#\d+\)")


def python_files() -> list[Path]:
    return [path for package in PACKAGES for path in sorted((REPO / package).rglob("*.py")) if path.name != "test_docs.py"]


def headings() -> set[str]:
    text = (REPO / "docs" / "methods.md").read_text()
    return {line.lstrip("#").strip() for line in text.splitlines() if line.startswith("#")}


def test_every_citation_of_the_methods_document_names_one_of_its_sections() -> None:
    known = headings()
    missing = []
    for path in python_files():
        text = re.sub(r"\s*\n\s*(?:#\s*)?", " ", path.read_text())  # citations may wrap across lines
        for match in CITATION.finditer(text):
            missing += [f"{path.relative_to(REPO)}: '{title}'" for title in re.findall(r"'([^']+)'", match.group(1)) if title not in known]
    assert not missing, "sections cited but not in docs/methods.md:\n" + "\n".join(missing)


def test_code_cites_nothing_outside_the_repository() -> None:
    found = [
        f"{path.relative_to(REPO)}:{number}: {line.strip()}"
        for path in python_files()
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if OUTSIDE.search(line)
    ]
    assert not found, "citations of documents outside the repository:\n" + "\n".join(found)
