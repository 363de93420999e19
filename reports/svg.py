"""Line charts as inline SVG (no plotting library): axes, ticks, labels, CI error bars, legend."""

from __future__ import annotations

import math
from dataclasses import dataclass
from html import escape

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


def line_chart(series: list[Series], *, title: str, x_label: str, y_label: str,
               width: int = 460, height: int = 290) -> str:
    """An <svg> element; every text in it is escaped."""
    pts = [p for s in series for p in s.points if math.isfinite(p.x) and math.isfinite(p.y)]
    if not pts:
        return ""
    ys = [p.y for p in pts] + [v for p in pts for v in (p.lo, p.hi) if v is not None and math.isfinite(v)]
    xt = nice_ticks(min(p.x for p in pts), max(p.x for p in pts))
    yt = nice_ticks(min(ys), max(ys))
    x0, x1, y0, y1 = xt[0], xt[-1], yt[0], yt[-1]
    left, right, top, bottom = 62, 16, 34, 46
    legend_h = 16 * len(series) if len(series) > 1 else 0
    plot_w, plot_h = width - left - right, height - top - bottom - legend_h

    def sx(x: float) -> float:
        return left + (x - x0) / ((x1 - x0) or 1) * plot_w

    def sy(y: float) -> float:
        return top + plot_h - (y - y0) / ((y1 - y0) or 1) * plot_h

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" role="img" aria-label="{escape(title)}">',
           f'<text x="{width / 2:.1f}" y="18" text-anchor="middle" class="chart-title">{escape(title)}</text>']
    for t in yt:
        y = sy(t)
        out.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>')
        out.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end" class="tick">{escape(_tick_label(t))}</text>')
    for t in xt:
        x = sx(t)
        out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top + plot_h}" y2="{top + plot_h + 4}" class="axis"/>')
        out.append(f'<text x="{x:.1f}" y="{top + plot_h + 16}" text-anchor="middle" class="tick">'
                   f'{escape(_tick_label(t))}</text>')
    out.append(f'<line x1="{left}" x2="{left}" y1="{top}" y2="{top + plot_h}" class="axis"/>')
    out.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{top + plot_h}" y2="{top + plot_h}" class="axis"/>')
    out.append(f'<text x="{left + plot_w / 2:.1f}" y="{top + plot_h + 34}" text-anchor="middle" class="label">'
               f'{escape(x_label)}</text>')
    out.append(f'<text transform="translate(14 {top + plot_h / 2:.1f}) rotate(-90)" text-anchor="middle" '
               f'class="label">{escape(y_label)}</text>')
    for i, s in enumerate(series):
        color = PALETTE[i % len(PALETTE)]
        sp = [p for p in s.points if math.isfinite(p.x) and math.isfinite(p.y)]
        path = " ".join(f"{sx(p.x):.1f},{sy(p.y):.1f}" for p in sp)
        out.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="2"/>')
        for p in sp:
            cx = sx(p.x)
            if p.lo is not None and p.hi is not None and math.isfinite(p.lo) and math.isfinite(p.hi):
                a, b = sy(p.lo), sy(p.hi)
                out.append(f'<path d="M{cx:.1f},{a:.1f}V{b:.1f}M{cx - 4:.1f},{a:.1f}H{cx + 4:.1f}'
                           f'M{cx - 4:.1f},{b:.1f}H{cx + 4:.1f}" stroke="{color}" fill="none" class="errbar"/>')
            tip = p.tip or f"{s.label}: {_tick_label(p.x)} → {p.y:.4g}"
            out.append(f'<circle cx="{cx:.1f}" cy="{sy(p.y):.1f}" r="3.5" fill="{color}">'
                       f'<title>{escape(tip)}</title></circle>')
        if legend_h:
            ly = height - legend_h + 16 * i + 2
            out.append(f'<rect x="{left}" y="{ly}" width="12" height="10" fill="{color}"/>'
                       f'<text x="{left + 18}" y="{ly + 9}" class="legend">{escape(s.label)}</text>')
    out.append("</svg>")
    return "".join(out)
