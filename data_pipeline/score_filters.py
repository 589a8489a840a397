"""`data.filters`: select clips by their curation scores at load time; score histograms.

A filter is 'NAME OP VALUE' (e.g. 'motion>0.5', 'sharpness >= 100'), NAME one of `SCORE_NAMES`,
OP one of >, >=, <, <=, ==, !=. A clip passes when every filter holds on the 'scores' of its json;
a clip without the score a filter names is left out too. See docs/methods.md, 'Data: curation
scores and filters'.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

SCORE_NAMES = ("motion", "sharpness", "cuts", "aesthetic")
"""The scores `lvd shard videos` writes into each clip's json under 'scores' (aesthetic only with
`--aesthetic-model`)."""
HISTOGRAM_BINS = 10
"""Bins of each score histogram in the manifest."""
_OPERATORS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge,
    "<=": operator.le,
    "==": operator.eq,
    "!=": operator.ne,
    ">": operator.gt,
    "<": operator.lt,
}
_PATTERN = re.compile(
    r"^\s*([A-Za-z_]\w*)\s*(>=|<=|==|!=|>|<)\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*$"
)


@dataclass(frozen=True, kw_only=True)
class ScoreFilter:
    text: str
    """The filter as written in the config."""
    name: str
    """Score it reads."""
    op: str
    """Comparison operator."""
    value: float
    """Threshold."""

    def rejects(self, scores: dict[str, float]) -> str:
        """Why a clip with these scores is left out ('' when it passes)."""
        if self.name not in scores:
            return f"no {self.name} score (data.filters {self.text!r})"
        if not _OPERATORS[self.op](float(scores[self.name]), self.value):
            return f"filtered out by {self.text!r}"
        return ""


def parse_filters(texts: tuple[str, ...]) -> list[ScoreFilter]:
    """The parsed filters; a ValueError names the first bad string."""
    filters = []
    for text in texts:
        match = _PATTERN.match(str(text))
        if match is None:
            raise ValueError(f"filters: {text!r} is not 'SCORE OP NUMBER' (OP one of > >= < <= == !=)")
        name, op, value = match.groups()
        if name not in SCORE_NAMES:
            raise ValueError(
                f"filters: {text!r} names unknown score {name!r}; known: {', '.join(SCORE_NAMES)}"
            )
        filters.append(ScoreFilter(text=text, name=name, op=op, value=float(value)))
    return filters


def rejection(filters: list[ScoreFilter], meta: dict[str, object]) -> str:
    """Why the clip of this json is left out by the filters ('' when it passes them all)."""
    scores = meta.get("scores")
    scores = scores if isinstance(scores, dict) else {}
    for score_filter in filters:
        reason = score_filter.rejects(scores)
        if reason:
            return reason
    return ""


def score_histograms(clips: list[dict[str, float]]) -> dict[str, dict[str, object]]:
    """Per score: {'clips', 'min', 'max', 'mean', 'edges' (bins + 1), 'counts' (bins)}."""
    histograms: dict[str, dict[str, object]] = {}
    for name in sorted({name for scores in clips for name in scores}):
        values = np.array([float(scores[name]) for scores in clips if name in scores])
        counts, edges = np.histogram(values, bins=HISTOGRAM_BINS)
        histograms[name] = {
            "clips": int(values.size),
            "min": float(values.min()),
            "max": float(values.max()),
            "mean": float(values.mean()),
            "edges": [float(edge) for edge in edges],
            "counts": [int(count) for count in counts],
        }
    return histograms
