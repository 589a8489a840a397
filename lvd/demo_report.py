"""The demo's report: `<out>/report.json` (every figure with its goal and whether it is met) and
`<out>/report.html`, a static page with PNG files beside it in `<out>/report/`: contact sheets
(a grid of frames) of the generated videos next to real training clips, the loss curves of the
training runs (drawn with Pillow from `<run>/metrics.jsonl`), and the figures.
"""

from __future__ import annotations

import html
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

SHEET_COLUMNS = 8
"""Frames per row of a contact sheet."""
PLOT_SIZE = (480, 260)
"""Width and height of a loss-curve image in pixels."""


@dataclass(frozen=True, kw_only=True)
class Figure:
    """One reported number, its goal and whether the goal is met (None: no goal)."""

    name: str
    value: float | None
    goal: str
    met: bool | None
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class Sheet:
    """A contact sheet: rows of frames (each row (T, H, W, 3) uint8) under a title."""

    title: str
    rows: list[tuple[str, np.ndarray]]


def evenly(frames: np.ndarray, count: int) -> np.ndarray:
    """`count` frames spread evenly over a (T, H, W, 3) clip (all of them when T <= count)."""
    if len(frames) <= count:
        return frames
    return frames[np.linspace(0, len(frames) - 1, count).round().astype(int)]


def contact_sheet(rows: list[tuple[str, np.ndarray]], scale: int = 2, columns: int = SHEET_COLUMNS) -> Image.Image:
    """One row per clip: its label, then `columns` evenly spaced frames, upscaled `scale` x."""
    picked = [(label, evenly(frames, columns)) for label, frames in rows]
    height, width = (max(f.shape[i] for _, f in picked) * scale for i in (1, 2))
    label_w, gap = 180, 2
    sheet = Image.new("RGB", (label_w + columns * (width + gap), len(picked) * (height + gap)), "white")
    draw = ImageDraw.Draw(sheet)
    for row, (label, frames) in enumerate(picked):
        top = row * (height + gap)
        draw.text((4, top + height // 2 - 6), label[:28], fill="black")
        for col, frame in enumerate(frames):
            tile = Image.fromarray(frame).resize((frame.shape[1] * scale, frame.shape[0] * scale), Image.NEAREST)
            sheet.paste(tile, (label_w + col * (width + gap), top))
    return sheet


def read_losses(metrics_jsonl: Path, key: str = "loss") -> tuple[list[int], list[float]]:
    """(steps, values) of one scalar of a run's metrics.jsonl (finite values only)."""
    steps, values = [], []
    if not metrics_jsonl.is_file():
        return steps, values
    for line in metrics_jsonl.read_text().splitlines():
        record = json.loads(line)
        value = record.get(key)
        if isinstance(value, (int, float)) and math.isfinite(value):
            steps.append(int(record["step"]))
            values.append(float(value))
    return steps, values


def smoothed(values: list[float], weight: float = 0.9) -> list[float]:
    """Exponential moving average (TensorBoard's smoothing), bias-corrected at the start."""
    out, average = [], 0.0
    for number, value in enumerate(values, 1):
        average = weight * average + (1 - weight) * value
        out.append(average / (1 - weight**number))
    return out


def loss_plot(title: str, steps: list[int], values: list[float]) -> Image.Image:
    """A line chart of raw (light) and smoothed (dark) values against steps, log-scaled when the
    values span more than a factor of 20."""
    width, height = PLOT_SIZE
    left, right, top, bottom = 60, 10, 24, 30
    image = Image.new("RGB", PLOT_SIZE, "white")
    draw = ImageDraw.Draw(image)
    draw.text((left, 6), title, fill="black")
    if len(values) < 2:
        draw.text((left, height // 2), "no data", fill="gray")
        return image
    positive = min(values) > 0
    use_log = positive and max(values) / min(values) > 20
    transform = math.log10 if use_log else float
    low, high = transform(min(values)), transform(max(values))
    high = high if high > low else low + 1e-9
    first, last = steps[0], max(steps[-1], steps[0] + 1)

    def point(step: int, value: float) -> tuple[float, float]:
        x = left + (step - first) / (last - first) * (width - left - right)
        y = top + (high - transform(value)) / (high - low) * (height - top - bottom)
        return x, y

    draw.rectangle((left, top, width - right, height - bottom), outline="gray")
    draw.line([point(s, v) for s, v in zip(steps, values, strict=True)], fill=(160, 190, 230), width=1)
    draw.line([point(s, v) for s, v in zip(steps, smoothed(values), strict=True)], fill=(20, 60, 160), width=2)
    for value, y in ((max(values), top), (min(values), height - bottom)):
        draw.text((2, y - 6), f"{value:.3g}", fill="black")
    draw.text((left, height - bottom + 4), f"step {first}", fill="black")
    draw.text((width - right - 70, height - bottom + 4), f"step {steps[-1]}", fill="black")
    if use_log:
        draw.text((width - right - 60, 6), "log scale", fill="gray")
    return image


def _figure_rows(figures: list[Figure]) -> str:
    rows = []
    for figure in figures:
        verdict = {True: "<b style='color:#080'>PASS</b>", False: "<b style='color:#b00'>FAIL</b>", None: "-"}[figure.met]
        value = "n/a" if figure.value is None else f"{figure.value:.4g}"
        details = ", ".join(f"{k}: {_short(v)}" for k, v in figure.details.items())
        rows.append(f"<tr><td>{html.escape(figure.name)}</td><td>{value}</td><td>{html.escape(figure.goal)}</td><td>{verdict}</td><td>{html.escape(details)}</td></tr>")
    return "\n".join(rows)


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def write_report(out: Path, figures: list[Figure], sheets: list[Sheet], runs: dict[str, Path], extra: dict[str, Any]) -> tuple[Path, Path]:
    """Write report.json, report.html and the PNG files they show; returns both paths."""
    images = out / "report"
    images.mkdir(parents=True, exist_ok=True)
    sheet_files = {}
    for number, sheet in enumerate(sheets):
        path = images / f"sheet-{number:02d}-{_slug(sheet.title)}.png"
        contact_sheet(sheet.rows).save(path)
        sheet_files[sheet.title] = path
    plot_files = {}
    for name, run in runs.items():
        path = images / f"loss-{_slug(name)}.png"
        loss_plot(f"{name}: loss", *read_losses(run / "metrics.jsonl")).save(path)
        plot_files[name] = path
    met = [f.met for f in figures if f.met is not None]
    report = {
        "all_met": bool(met) and all(met),
        "figures": {f.name: asdict(f) for f in figures},
        "contact_sheets": {title: str(p.relative_to(out)) for title, p in sheet_files.items()},
        "loss_curves": {name: str(p.relative_to(out)) for name, p in plot_files.items()},
        **extra,
    }
    json_path, html_path = out / "report.json", out / "report.html"
    json_path.write_text(json.dumps(report, indent=1) + "\n")
    html_path.write_text(_html(report, figures, out))
    return json_path, html_path


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")[:48]


def _html(report: dict[str, Any], figures: list[Figure], out: Path) -> str:
    sheets = "\n".join(
        f"<h3>{html.escape(title)}</h3><img src='{html.escape(path)}' alt='{html.escape(title)}'>" for title, path in report["contact_sheets"].items()
    )
    plots = "\n".join(f"<img src='{html.escape(path)}' alt='{html.escape(name)} loss'>" for name, path in report["loss_curves"].items())
    verdict = "every goal is met" if report["all_met"] else "some goals are NOT met"
    settings = html.escape(json.dumps({k: v for k, v in report.items() if k not in ("figures", "contact_sheets", "loss_curves")}, indent=1))
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>lvd demo report</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse}} td,th{{border:1px solid #ccc;padding:4px 8px}} img{{margin:4px;image-rendering:pixelated}}</style>
</head><body>
<h1>lvd demo report</h1>
<p>{html.escape(str(out))}: {verdict}.</p>
<h2>Figures</h2>
<table><tr><th>figure</th><th>value</th><th>goal</th><th>met</th><th>details</th></tr>
{_figure_rows(figures)}
</table>
<h2>Videos: generated next to real training clips</h2>
{sheets}
<h2>Loss curves</h2>
{plots}
<h2>Settings</h2>
<pre>{settings}</pre>
</body></html>
"""
