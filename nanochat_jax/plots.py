"""Small self-contained SVG line charts for the report card (no plotting library needed).

    svg = render_svg("Base model training", [Panel("Training loss", "loss", (Series(...),))])

A chart is a column of panels that share a width; each panel has its own axes with "nice" ticks
(1, 2 or 5 times a power of ten), a legend, and one polyline per series. Series longer than
`max_points` are downsampled to the minimum and maximum of equal-count buckets, so loss spikes
survive; sparse series (evaluations) also get a dot per point, so a single point is visible.
Non-finite values (NaN, inf) are left out and the panel's title says how many.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from xml.sax.saxutils import escape, quoteattr

# tab10's first colours: distinguishable, and readable on the white background drawn below
_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2")
_MARGIN_LEFT, _MARGIN_RIGHT, _MARGIN_BOTTOM = 72, 24, 44
_PANEL_TITLE_HEIGHT, _LEGEND_ROW = 26, 18
_TITLE_HEIGHT = 30
_FONT = "font-family='DejaVu Sans, Helvetica, Arial, sans-serif'"
_MAX_DOTS = 60  # series with at most this many points also get a dot per point


@dataclass(frozen=True)
class Series:
    label: str
    steps: Sequence[float]
    values: Sequence[float]


@dataclass(frozen=True)
class Panel:
    title: str
    y_label: str
    series: tuple[Series, ...]
    x_label: str = "step"


def finite_points(series: Series) -> tuple[list[tuple[float, float]], int]:
    """The (step, value) pairs with both finite, and how many pairs were left out."""
    if len(series.steps) != len(series.values):
        raise ValueError(
            f"series {series.label!r}: {len(series.steps)} steps but {len(series.values)} values"
        )
    points = [
        (float(x), float(y))
        for x, y in zip(series.steps, series.values, strict=True)
        if math.isfinite(x) and math.isfinite(y)
    ]
    return points, len(series.steps) - len(points)


def downsample(points: Sequence[tuple[float, float]], max_points: int) -> list[tuple[float, float]]:
    """At most `max_points` points: the min and max (in step order) of max_points // 2 buckets.

    Shorter inputs come back unchanged; longer ones give exactly 2 * (max_points // 2) points.
    """
    if max_points < 2:
        raise ValueError(f"max_points must be at least 2, got {max_points}")
    n = len(points)
    if n <= max_points:
        return list(points)
    buckets = max_points // 2
    out = []
    for b in range(buckets):
        # n > 2 * buckets, so every bucket holds at least two points
        chunk = points[b * n // buckets : (b + 1) * n // buckets]
        lo = min(range(len(chunk)), key=lambda i: chunk[i][1])
        hi = max(range(len(chunk)), key=lambda i: chunk[i][1])
        if lo == hi:  # a flat bucket: its first and last point
            lo, hi = 0, len(chunk) - 1
        out += [chunk[min(lo, hi)], chunk[max(lo, hi)]]
    return out


def nice_ticks(lo: float, hi: float, max_ticks: int = 6) -> list[float]:
    """Round tick values (1, 2 or 5 times a power of ten apart) inside [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        raise ValueError(f"need finite lo < hi, got {lo}, {hi}")
    raw = (hi - lo) / max(1, max_ticks - 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    spacing = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    first = math.ceil(lo / spacing - 1e-9)
    last = math.floor(hi / spacing + 1e-9)
    # multiply (not accumulate) so 0.1 * 3 does not print as 0.30000000000000004
    return [round(i * spacing, 12) for i in range(first, last + 1)]


def _tick_label(value: float, ticks: Sequence[float]) -> str:
    spacing = ticks[1] - ticks[0] if len(ticks) > 1 else 1.0
    decimals = max(0, -math.floor(math.log10(spacing) + 1e-9))
    if max(abs(t) for t in ticks) >= 1e6:
        return f"{value:.3g}"
    return f"{value:,.{decimals}f}"


def _span(values: Sequence[float], pad_frac: float) -> tuple[float, float]:
    lo, hi = min(values), max(values)
    if hi == lo:  # one value: a band around it
        half = abs(lo) * 0.05 or 1.0
        return lo - half, hi + half
    pad = (hi - lo) * pad_frac
    return lo - pad, hi + pad


def _text(x: float, y: float, text: str, size: int = 12, anchor: str = "middle", **attrs) -> str:
    extra = "".join(f" {k.replace('_', '-')}={quoteattr(str(v))}" for k, v in attrs.items())
    return (
        f"<text x='{x:.1f}' y='{y:.1f}' font-size='{size}' text-anchor='{anchor}'{extra}>"
        f"{escape(text)}</text>"
    )


def _line(x1: float, y1: float, x2: float, y2: float, stroke: str, width: float = 1) -> str:
    return (
        f"<line x1='{x1:.1f}' y1='{y1:.1f}' x2='{x2:.1f}' y2='{y2:.1f}' stroke='{stroke}' "
        f"stroke-width='{width}'/>"
    )


def _panel_svg(
    panel: Panel,
    prepared: list[tuple[str, list[tuple[float, float]]]],
    skipped: int,
    x_span: tuple[float, float],
    top: float,
    size: tuple[int, int],
    max_points: int,
) -> list[str]:
    """One panel's elements: `prepared` holds each series' finite points, `skipped` counts the
    rest; the x range is the chart's, so that the panels' steps line up."""
    width, height = size
    title = panel.title
    if skipped:
        title += f" ({skipped} non-finite value{'s' if skipped > 1 else ''} skipped)"
    x0, x1 = _MARGIN_LEFT, width - _MARGIN_RIGHT
    out = [_text((x0 + x1) / 2, top + 20, title, size=14, font_weight="bold")]
    if not prepared:
        out.append(_text((x0 + x1) / 2, top + height / 2, "no finite values to plot", fill="#666"))
        return out
    # the legend: rows of items under the title, above the plot area, so it never hides data
    legend, lx, ly = [], x0, top + _PANEL_TITLE_HEIGHT + 12
    for label, _ in prepared:
        item_width = 25 + 7 * len(label) + 18  # line, gap, ~7 px per character at 11 px
        if lx > x0 and lx + item_width > x1:
            lx, ly = x0, ly + _LEGEND_ROW
        legend.append((lx, ly))
        lx += item_width
    y0, y1 = ly + 10, top + height - _MARGIN_BOTTOM  # the plot area's top and bottom
    xlo, xhi = x_span
    ys = [y for _, points in prepared for _, y in points]
    ylo, yhi = _span(ys, 0.05)

    def sx(x: float) -> float:
        return x0 + (x - xlo) / (xhi - xlo) * (x1 - x0)

    def sy(y: float) -> float:
        return y1 - (y - ylo) / (yhi - ylo) * (y1 - y0)

    out.append(
        f"<rect x='{x0}' y='{y0:.1f}' width='{x1 - x0}' height='{y1 - y0:.1f}' "
        "fill='none' stroke='#444'/>"
    )
    xticks, yticks = nice_ticks(xlo, xhi), nice_ticks(ylo, yhi)
    for t in xticks:
        out.append(_line(sx(t), y1, sx(t), y1 + 5, "#444"))
        out.append(_text(sx(t), y1 + 18, _tick_label(t, xticks), size=11))
    for t in yticks:
        out.append(_line(x0, sy(t), x1, sy(t), "#e4e4e4"))  # a grid line
        out.append(_line(x0 - 5, sy(t), x0, sy(t), "#444"))
        out.append(_text(x0 - 8, sy(t) + 4, _tick_label(t, yticks), size=11, anchor="end"))
    out.append(_text((x0 + x1) / 2, y1 + 36, panel.x_label))
    ymid = (y0 + y1) / 2
    out.append(_text(16, ymid, panel.y_label, transform=f"rotate(-90 16 {ymid:.1f})"))
    for i, (_, points) in enumerate(prepared):
        color = _COLORS[i % len(_COLORS)]
        shown = downsample(points, max_points)
        coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in shown)
        if len(shown) > 1:
            out.append(
                f"<polyline points='{coords}' fill='none' stroke='{color}' "
                "stroke-width='1.5' stroke-linejoin='round'/>"
            )
        if len(shown) <= _MAX_DOTS:
            out += [
                f"<circle cx='{sx(x):.1f}' cy='{sy(y):.1f}' r='2.5' fill='{color}'/>"
                for x, y in shown
            ]
    for i, ((label, _), (lx, ly)) in enumerate(zip(prepared, legend, strict=True)):
        color = _COLORS[i % len(_COLORS)]
        out.append(_line(lx, ly - 4, lx + 20, ly - 4, color, width=2))
        out.append(_text(lx + 25, ly, label, size=11, anchor="start"))
    return out


def render_svg(
    title: str,
    panels: Sequence[Panel],
    *,
    width: int = 720,
    panel_height: int = 240,
    max_points: int = 2000,
) -> str:
    """One SVG document: the chart title above the panels, stacked top to bottom."""
    if not panels:
        raise ValueError(f"chart {title!r} has no panels; give at least one")
    height = _TITLE_HEIGHT + panel_height * len(panels)
    parts = [
        "<?xml version='1.0' encoding='UTF-8'?>",
        f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' "
        f"viewBox='0 0 {width} {height}' {_FONT}>",
        f"<title>{escape(title)}</title>",
        # white, not transparent: dark-mode viewers would otherwise draw black text on black
        f"<rect width='{width}' height='{height}' fill='white'/>",
        _text(width / 2, 22, title, size=16, font_weight="bold"),
    ]
    prepared, skipped = [], []
    for panel in panels:
        finite = [(series.label, *finite_points(series)) for series in panel.series]
        prepared.append([(label, points) for label, points, _ in finite if points])
        skipped.append(sum(left_out for _, _, left_out in finite))
    xs = [x for series in prepared for _, points in series for x, _ in points]
    x_span = _span(xs, 0.0) if xs else (0.0, 1.0)
    for i, panel in enumerate(panels):
        top = _TITLE_HEIGHT + i * panel_height
        size = (width, panel_height)
        parts += _panel_svg(panel, prepared[i], skipped[i], x_span, top, size, max_points)
    parts.append("</svg>")
    return "\n".join(parts) + "\n"
