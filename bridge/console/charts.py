"""Stacked bar charts per day as plain geometry, drawn as inline SVG by the templates.

Pure: the counters come from ``console_daily`` (no decryption). Every chart also carries
its numbers as a table (the text alternative screen readers and keyboard users read).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

WIDTH = 640
HEIGHT = 200
LEFT = 44  # room for the y axis labels
BOTTOM = 22  # room for the x axis labels
TOP = 8
SERIES_CLASSES = 8  # s0..s7 in console.css
MAX_SERIES = 7  # more labels than this: the smallest are summed as "other"


@dataclass(frozen=True, slots=True)
class Bar:
    x: float
    y: float
    width: float
    height: float
    series: int  # the CSS class s<series>
    title: str  # day, label and count (a tooltip; the table has the same)


@dataclass(frozen=True, slots=True)
class Tick:
    pos: float
    text: str


@dataclass(frozen=True, slots=True)
class Chart:
    """One chart: bars, axes, legend and its data table."""

    id: str
    title: str
    bars: tuple[Bar, ...]
    x_ticks: tuple[Tick, ...]
    y_ticks: tuple[Tick, ...]
    legend: tuple[tuple[str, int], ...]  # (label, series)
    days: tuple[str, ...]
    columns: tuple[str, ...]
    rows: tuple[tuple[str, tuple[int, ...]], ...]  # (day, counts per column)
    total: int
    width: int = WIDTH
    height: int = HEIGHT


def day_label(day: int) -> str:
    """Days since the epoch → ISO date."""
    return (dt.date(1970, 1, 1) + dt.timedelta(days=day)).isoformat()


def _nice_max(value: int) -> int:
    if value <= 4:
        return 4
    magnitude = 10 ** (len(str(value)) - 1)
    for step in (1, 2, 2.5, 5, 10):
        top = int(step * magnitude)
        if top >= value:
            return top
    return value


def build_chart(
    chart_id: str,
    title: str,
    first_day: int,
    last_day: int,
    counts: Mapping[tuple[int, str], int],
    labels: Sequence[str] | None = None,
) -> Chart:
    """A stacked bar per day from ``counts[(day, label)]``, days ``first_day..last_day``."""
    days = list(range(first_day, last_day + 1))
    totals: dict[str, int] = {}
    for (_day, label), n in counts.items():
        totals[label] = totals.get(label, 0) + n
    order = list(labels) if labels is not None else sorted(totals, key=lambda k: (-totals[k], k))
    if len(order) > MAX_SERIES:
        keep, rest = order[: MAX_SERIES - 1], set(order[MAX_SERIES - 1 :])
        merged: dict[tuple[int, str], int] = {}
        for (day, label), n in counts.items():
            key = (day, "other" if label in rest else label)
            merged[key] = merged.get(key, 0) + n
        counts, order = merged, [*keep, "other"]
    per_day = [sum(counts.get((d, lab), 0) for lab in order) for d in days]
    top = _nice_max(max(per_day, default=0))
    plot_w = WIDTH - LEFT - 4
    plot_h = HEIGHT - TOP - BOTTOM
    slot = plot_w / max(1, len(days))
    bar_w = max(1.0, slot * 0.8)
    bars: list[Bar] = []
    for i, d in enumerate(days):
        y: float = TOP + plot_h
        for s, label in enumerate(order):
            n = counts.get((d, label), 0)
            if not n:
                continue
            h = plot_h * n / top
            y -= h
            bars.append(
                Bar(
                    round(LEFT + i * slot + (slot - bar_w) / 2, 2),
                    round(y, 2),
                    round(bar_w, 2),
                    round(h, 2),
                    s % SERIES_CLASSES,
                    f"{day_label(d)} {label}: {n}",
                )
            )
    step = max(1, len(days) // 6)
    x_ticks = tuple(
        Tick(round(LEFT + i * slot + slot / 2, 2), day_label(d)[5:])
        for i, d in enumerate(days)
        if i % step == 0
    )
    y_ticks = tuple(
        Tick(round(TOP + plot_h - plot_h * f, 2), f"{int(top * f):,}") for f in (0, 0.5, 1)
    )
    rows = tuple(
        (day_label(d), tuple(counts.get((d, lab), 0) for lab in order))
        for d in days
        if any(counts.get((d, lab), 0) for lab in order)
    )
    return Chart(
        id=chart_id,
        title=title,
        bars=tuple(bars),
        x_ticks=x_ticks,
        y_ticks=y_ticks,
        legend=tuple((lab, i % SERIES_CLASSES) for i, lab in enumerate(order)),
        days=tuple(day_label(d) for d in days),
        columns=tuple(order),
        rows=rows,
        total=sum(per_day),
    )
