"""Localization metrics over a dataset: means with bootstrap confidence intervals, and a text table.

Records are dicts as caffast.eval.protocol.evaluate_image makes them (and as a run's index.jsonl
holds them once they are added to its rows); a record without a metric's field, or with None there
(a failed image, a target that is not the image's class), does not count for that metric.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np

__all__ = ["METRICS", "Estimate", "Metric", "bootstrap_mean", "format_table", "summarize"]

RESAMPLES = 1000
SEED = 0
LEVEL = 0.95
_DRAWS_PER_CHUNK = 4_000_000  # indices drawn at once: bounds the memory of a large dataset's bootstrap


class Metric(NamedTuple):
    """A table row: its label, the record field it averages, and whether it reports 1 - the mean."""

    label: str
    field: str
    error: bool = False


METRICS = (
    Metric("top-1 loc. error", "top1_loc", error=True),
    Metric("GT-known loc. error", "gt_known_loc", error=True),
    Metric("pointing game", "pointing"),
    Metric("box IoU", "best_iou"),
    Metric("mask IoU", "mask_iou"),
)


@dataclass(frozen=True)
class Estimate:
    """A mean with its confidence interval [low, high] over `count` values (all NaN when count is 0)."""

    mean: float
    low: float
    high: float
    count: int


def bootstrap_mean(
    values: Sequence[float], resamples: int = RESAMPLES, seed: int = SEED, level: float = LEVEL
) -> Estimate:
    """The mean and its percentile bootstrap interval: `resamples` resamples with replacement, drawn
    from a generator seeded with `seed`, so the same values always give the same interval."""
    if resamples < 1 or not 0.0 < level < 1.0:
        raise ValueError(f"resamples must be at least 1 and level in (0, 1); got {resamples} and {level}")
    values = np.asarray(values, dtype=np.float64).ravel()
    if values.size == 0:
        return Estimate(math.nan, math.nan, math.nan, 0)
    rng = np.random.default_rng(seed)
    chunk = max(1, _DRAWS_PER_CHUNK // values.size)
    means = np.concatenate([
        values[rng.integers(0, values.size, size=(min(chunk, resamples - start), values.size))].mean(axis=1)
        for start in range(0, resamples, chunk)
    ])  # fmt: skip
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return Estimate(float(values.mean()), float(low), float(high), int(values.size))


def _values(records: Sequence[Mapping[str, Any]], metric: Metric) -> list[float]:
    values = []
    for number, record in enumerate(records):
        value = record.get(metric.field)
        if value is None:
            continue
        if isinstance(value, str) or not isinstance(value, (bool, int, float, np.number, np.bool_)):
            raise ValueError(f"record {number} has {metric.field}={value!r}; it must be a number, a boolean or None")
        values.append(1.0 - float(value) if metric.error else float(value))
    return values


def summarize(
    records: Sequence[Mapping[str, Any]], metrics: Sequence[Metric] = METRICS, resamples: int = RESAMPLES,
    seed: int = SEED, level: float = LEVEL,
) -> dict[str, Estimate]:  # fmt: skip
    """Each metric's mean with its bootstrap interval, by metric label."""
    return {metric.label: bootstrap_mean(_values(records, metric), resamples, seed, level) for metric in metrics}


def _cell(estimate: Estimate) -> str:
    if estimate.count == 0:
        return "-"
    return f"{estimate.mean:.3f} [{estimate.low:.3f}, {estimate.high:.3f}] n={estimate.count}"


def format_table(summaries: Mapping[str, Mapping[str, Estimate]]) -> str:
    """Methods side by side: one column per method (e.g. {"L2-CAF": summarize(a), "Grad-CAM":
    summarize(b)}), one row per metric that any method has values for; "-" where one has none."""
    if not summaries:
        raise ValueError("no method to show: pass {method name: summarize(records)}")
    labels = list(dict.fromkeys(
        label for summary in summaries.values() for label, estimate in summary.items() if estimate.count
    ))  # fmt: skip
    header = ["metric", *summaries]
    rows = [[label, *(_cell(s[label]) if label in s else "-" for s in summaries.values())] for label in labels]
    widths = [max(len(row[column]) for row in [header, *rows]) for column in range(len(header))]
    lines = ["  ".join(text.ljust(width) for text, width in zip(row, widths)).rstrip() for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * width for width in widths))
    lines.append("mean [bootstrap interval] n=number of values")
    return "\n".join(lines)
