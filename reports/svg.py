"""Line charts for inline SVG (no plotting library): the geometry of axes, ticks, labels, CI
error bars and legend. The markup itself is written by templates/chart.svg.j2 (autoescaped),
so every label that came from a run folder is escaped by the template engine."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"]


@dataclass
class Point:
    x: float
    y: float
    lo: float | None = None  # CI bounds of y; None when the metric has no CI
    hi: float | None = None
    tip: str = ""


@dataclass
class Series:
    label: str
    points: list[Point]


@dataclass
class Tick:
    pos: float  # pixel coordinate along its axis
    label: str


@dataclass
class Mark:
    """One drawn point: centre, optional error bar (pixel y of lo/hi), tooltip."""
    cx: float
    cy: float
    tip: str
    bar: tuple[float, float] | None = None


@dataclass
class Line:
    label: str
    color: str
    points: str  # the polyline's "x,y x,y" list
    marks: list[Mark] = field(default_factory=list)
    legend_y: float | None = None


@dataclass
class Chart:
    title: str
    x_label: str
    y_label: str
    width: int
    height: int
    left: int
    top: int
    plot_w: float
    plot_h: float
    x_ticks: list[Tick]
    y_ticks: list[Tick]
    lines: list[Line]


def nice_ticks(lo: float, hi: float, target: int = 5) -> list[float]:
    """Round-numbered ticks (1, 2, 2.5, 5 x 10^k) covering [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return []
    if hi < lo:
        lo, hi = hi, lo
    if hi == lo:  # one value: give the axis some room around it
        pad = abs(lo) * 0.1 or 0.5
        lo, hi = lo - pad, hi + pad
    raw = (hi - lo) / max(target, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.floor(lo / step) * step
    ticks, t = [], start
    while t <= hi + step * 1e-9:
        ticks.append(round(t, 12))
        t += step
    if ticks and ticks[-1] < hi - step * 1e-9:
        ticks.append(round(ticks[-1] + step, 12))
    return ticks


def _tick_label(v: float) -> str:
    return f"{round(v, 10):g}"


def _ok(v: float | None) -> bool:
    return v is not None and math.isfinite(v)


def line_chart(series: list[Series], *, title: str, x_label: str, y_label: str,
               width: int = 460, height: int = 290) -> Chart | None:
    """The chart's geometry; None when no series has a finite point."""
    pts = [p for s in series for p in s.points if _ok(p.x) and _ok(p.y)]
    if not pts:
        return None
    ys = [p.y for p in pts] + [v for p in pts for v in (p.lo, p.hi) if _ok(v)]
    xt = nice_ticks(min(p.x for p in pts), max(p.x for p in pts))
    yt = nice_ticks(min(ys), max(ys))
    x0, x1, y0, y1 = xt[0], xt[-1], yt[0], yt[-1]
    left, right, top, bottom = 62, 16, 34, 46
    legend_h = 16 * len(series) if len(series) > 1 else 0
    plot_w, plot_h = width - left - right, height - top - bottom - legend_h

    def sx(x: float) -> float:
        return round(left + (x - x0) / ((x1 - x0) or 1) * plot_w, 1)

    def sy(y: float) -> float:
        return round(top + plot_h - (y - y0) / ((y1 - y0) or 1) * plot_h, 1)

    lines = []
    for i, s in enumerate(series):
        sp = [p for p in s.points if _ok(p.x) and _ok(p.y)]
        marks = [Mark(sx(p.x), sy(p.y), p.tip or f"{s.label}: {_tick_label(p.x)} → {p.y:.4g}",
                      (sy(p.lo), sy(p.hi)) if _ok(p.lo) and _ok(p.hi) else None) for p in sp]
        lines.append(Line(s.label, PALETTE[i % len(PALETTE)], " ".join(f"{m.cx},{m.cy}" for m in marks), marks,
                          height - legend_h + 16 * i + 2 if legend_h else None))
    return Chart(title, x_label, y_label, width, height, left, top, plot_w, plot_h,
                 [Tick(sx(t), _tick_label(t)) for t in xt], [Tick(sy(t), _tick_label(t)) for t in yt], lines)
