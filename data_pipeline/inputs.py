"""Input lists for `lvd shard`: a folder with sidecar captions, a CSV, or a JSONL.

Every input becomes an `InputItem` in a stable order. Nothing is dropped here: unreadable
captions travel as a `caption_issue` and end up in the manifest. Sample keys are derived from the
source with a slug and a hash, so no input path can steer a write (all names under `--out` are
made by the writer, never taken from the input).
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

CAPTION_SUFFIX = ".txt"


@dataclass(frozen=True, kw_only=True)
class InputItem:
    path: str
    """Filesystem path that is read (never written)."""
    source: str
    """Stable name of the input recorded in metadata: relative to the folder / as listed."""
    caption: str
    """Caption text ('' when missing)."""
    caption_issue: str | None = None
    """Why the caption is empty or was repaired, reported in the manifest's warnings."""
    extra: dict[str, object] = field(default_factory=dict)
    """Extra CSV/JSONL columns, kept in each sample's json under 'extra'."""
    skip_reason: str | None = None
    """Set when the listing already knows the input must be skipped (a repeated source)."""


def sample_key(source: str, clip: int) -> str:
    """A tar-safe key: readable slug of the file stem + hash of the full source + clip number."""
    stem = Path(source).stem
    slug = re.sub(r"[^A-Za-z0-9_-]+", "_", stem).strip("_")[:40] or "input"
    digest = hashlib.sha1(source.encode("utf-8", "surrogateescape")).hexdigest()[:10]
    return f"{slug}-{digest}-{clip:05d}"


def stable_hash(text: str) -> int:
    """A 63-bit hash of a string that is the same in every process (unlike hash())."""
    return int.from_bytes(hashlib.sha1(text.encode("utf-8", "surrogateescape")).digest()[:8], "big") >> 1


def read_caption(path: Path, *, first_line: bool) -> tuple[str, str | None]:
    """(caption, issue) from a sidecar file; a missing or non-UTF-8 file is reported, not dropped."""
    if not path.is_file():
        return "", "missing caption"
    raw = path.read_bytes()
    try:
        text, issue = raw.decode("utf-8"), None
    except UnicodeDecodeError as error:
        text, issue = (
            raw.decode("utf-8", "replace"),
            f"caption is not UTF-8 ({error.reason} at byte {error.start})",
        )
    text = text.strip()
    if first_line:
        text = text.splitlines()[0].strip() if text else ""
    if not text and issue is None:
        issue = "empty caption"
    return text, issue


def file_issue(path: Path) -> str | None:
    """Why an input path cannot be read as a media file (missing, a directory, empty), else None."""
    if path.is_dir():
        return "a directory, not a media file"
    if not path.is_file():
        return "not found"
    if path.stat().st_size == 0:
        return "empty file (0 bytes)"
    return None


def _from_folder(folder: Path, *, first_line: bool) -> list[InputItem]:
    # every file is an input, and so is a directory named like a file (`clip.mp4/`), which is
    # then skipped with its reason instead of vanishing from the listing
    files = sorted(path for path in folder.rglob("*") if path.is_file() or (path.is_dir() and path.suffix))
    stems = {path.with_suffix("") for path in files if path.suffix != CAPTION_SUFFIX}
    items = []
    for path in files:
        if path.suffix == CAPTION_SUFFIX and path.with_suffix("") in stems:
            continue  # a sidecar caption, not an input
        caption, issue = read_caption(path.with_suffix(CAPTION_SUFFIX), first_line=first_line)
        if path.suffix == CAPTION_SUFFIX:
            caption, issue = "", "missing caption"
        items.append(
            InputItem(
                path=str(path),
                source=path.relative_to(folder).as_posix(),
                caption=caption,
                caption_issue=issue,
            )
        )
    return items


def _from_row(row: dict[str, object], base: Path, line: int) -> InputItem:
    if not row.get("path"):
        raise ValueError(f"line {line}: no 'path' column")
    listed = str(row["path"])
    caption = row.get("caption")
    issue = None if isinstance(caption, str) and caption.strip() else "missing caption"
    extra = {key: value for key, value in row.items() if key not in ("path", "caption")}
    path = Path(listed) if Path(listed).is_absolute() else base / listed
    return InputItem(
        path=str(path), source=listed, caption=str(caption or "").strip(), caption_issue=issue, extra=extra
    )


def list_inputs(spec: str, *, first_line: bool = False) -> list[InputItem]:
    """Inputs from a folder, a .csv or a .jsonl file (columns: path, caption, any extra)."""
    location = Path(spec)
    if location.is_dir():
        return _from_folder(location, first_line=first_line)
    if not location.is_file():
        raise FileNotFoundError(f"--input {spec}: no such folder or file")
    text = location.read_text(encoding="utf-8")
    if location.suffix == ".jsonl":
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    elif location.suffix == ".csv":
        rows = list(csv.DictReader(text.splitlines()))
    else:
        raise ValueError(f"--input {spec}: expected a folder, a .csv or a .jsonl")
    return _mark_repeats([_from_row(row, location.parent, number + 1) for number, row in enumerate(rows)])


def _mark_repeats(items: list[InputItem]) -> list[InputItem]:
    """A source listed twice would give the same keys twice: later copies are marked skipped."""
    seen: set[str] = set()
    marked = []
    for item in items:
        if item.source in seen:
            item = InputItem(
                path=item.path,
                source=item.source,
                caption=item.caption,
                skip_reason="repeated input (already listed)",
            )
        seen.add(item.source)
        marked.append(item)
    return marked
