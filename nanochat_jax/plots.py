"""Small self-contained SVG line charts for the report card (no plotting library needed).

    svg = render_svg("Base model training", [Panel("Training loss", "loss", (Series(...),))])

A chart is a column of panels that share a width; each panel has its own axes with "nice" ticks
(1, 2 or 5 times a power of ten), a legend, and one polyline per series. Series longer than
`max_points` are downsampled to the minimum and maximum of equal-count buckets, so loss spikes
survive; sparse series (evaluations) also get a dot per point, so a single point is visible.
Non-finite values (NaN, inf) are left out and the panel's title says how many. A constant series
(up to rounding) gets a band around its value; any finite values, up to +-1.7e308, can be drawn.
A panel whose legend needs more than two rows grows instead of squeezing its plot area.
"""

from __future__ import annotations

import math
import sys
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
_LEGEND_FREE_ROWS = 2  # legend rows that fit in panel_height; each further row adds _LEGEND_ROW
_FLAT = 1e-9  # a range narrower than this fraction of its values' magnitude is a constant
_MAX_FLOAT = sys.float_info.max


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
    """Round tick values (1, 2 or 5 times a power of ten apart) inside [lo, hi], distinct."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        raise ValueError(f"need finite lo < hi, got {lo}, {hi}")
    intervals = max(1, max_ticks - 1)
    raw = hi / intervals - lo / intervals  # not (hi - lo) / n: that overflows for +-1.7e308
    magnitude = 10.0 ** math.floor(math.log10(raw)) if raw > 0 else 0.0
    if magnitude <= 0:  # lo and hi are adjacent subnormal numbers
        return [lo, hi]
    spacing = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    first = math.ceil(lo / spacing - 1e-9)
    last = math.floor(hi / spacing + 1e-9)
    # multiply (not accumulate) and round to a few digits below the spacing, so 0.1 * 3 does not
    # print as 0.30000000000000004; ticks that round to the same float (a range at the edge of
    # float precision) are kept once
    digits = 2 - math.floor(math.log10(spacing))
    ticks = dict.fromkeys(round(i * spacing, digits) for i in range(first, last + 1))
    slack = spacing * 1e-6  # i * spacing can land a rounding error outside [lo, hi]
    return [t for t in ticks if lo - slack <= t <= hi + slack]


def _tick_label(value: float, ticks: Sequence[float]) -> str:
    spacing = ticks[1] - ticks[0] if len(ticks) > 1 else 0.0
    if not (spacing > 0 and math.isfinite(spacing)):  # one tick: nothing to align decimals to
        return f"{value:.6g}"
    decimals = max(0, -math.floor(math.log10(spacing) + 1e-9))
    largest = max(abs(t) for t in ticks)
    if largest >= 1e6 or decimals > 8:
        # significant digits down to the spacing's, so neighbouring ticks still differ
        digits = math.floor(math.log10(largest)) - math.floor(math.log10(spacing)) + 1
        return f"{value:.{min(15, max(3, digits))}g}"
    return f"{value:,.{decimals}f}"


def _clamp(value: float) -> float:
    return min(_MAX_FLOAT, max(-_MAX_FLOAT, value))


def _span(values: Sequence[float], pad_frac: float) -> tuple[float, float]:
    """A drawable range lo < hi around finite values (halves, so +-1.7e308 does not overflow)."""
    lo, hi = min(values), max(values)
    if hi / 2 - lo / 2 <= _FLAT * max(abs(lo), abs(hi)):  # one value, up to rounding: a band
        mid = lo / 2 + hi / 2
        half = abs(mid) * 0.05 or 1.0
        return _clamp(mid - half), _clamp(mid + half)
    pad = (hi / 2 - lo / 2) * (2 * pad_frac)  # 2 * pad_frac first: the half span * 2 overflows
    return _clamp(lo - pad), _clamp(hi + pad)


def _fraction(value: float, lo: float, hi: float) -> float:
    """(value - lo) / (hi - lo), without overflow for any finite floats."""
    return (value / 2 - lo / 2) / (hi / 2 - lo / 2)


def _legend_layout(labels: Sequence[str], x0: float, x1: float) -> tuple[list[tuple], int]:
    """Each legend item's (x, row) in rows of items between x0 and x1, and the number of rows."""
    places, lx, row = [], x0, 0
    for label in labels:
        item_width = 25 + 7 * len(label) + 18  # line, gap, ~7 px per character at 11 px
        if lx > x0 and lx + item_width > x1:
            lx, row = x0, row + 1
        places.append((lx, row))
        lx += item_width
    return places, row + 1 if labels else 0


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
    prepared: list[tuple[str, str, list[tuple[float, float]]]],
    skipped: int,
    x_span: tuple[float, float],
    top: float,
    size: tuple[int, int],
    max_points: int,
) -> list[str]:
    """One panel's elements: `prepared` holds each series' label, colour and finite points,
    `skipped` counts the rest; the x range is the chart's, so that the panels' steps line up."""
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
    places, rows = _legend_layout([label for label, _, _ in prepared], x0, x1)
    legend_top = top + _PANEL_TITLE_HEIGHT + 12
    y0, y1 = legend_top + (rows - 1) * _LEGEND_ROW + 10, top + height - _MARGIN_BOTTOM
    xlo, xhi = x_span
    ys = [y for _, _, points in prepared for _, y in points]
    ylo, yhi = _span(ys, 0.05)

    def sx(x: float) -> float:
        return x0 + _fraction(x, xlo, xhi) * (x1 - x0)

    def sy(y: float) -> float:
        return y1 - _fraction(y, ylo, yhi) * (y1 - y0)

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
    for _, color, points in prepared:
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
    for (label, color, _), (lx, row) in zip(prepared, places, strict=True):
        ly = legend_top + row * _LEGEND_ROW
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
    """One SVG document: the chart title above the panels, stacked top to bottom.

    A panel is `panel_height` tall, plus one legend row's height for each legend row past two.
    """
    if not panels:
        raise ValueError(f"chart {title!r} has no panels; give at least one")
    prepared, skipped, heights = [], [], []
    for panel in panels:
        finite = [(series.label, *finite_points(series)) for series in panel.series]
        # colours by the series' place in the panel, so a series with nothing finite to draw
        # does not hand its colour to the next one
        prepared.append(
            [
                (label, _COLORS[i % len(_COLORS)], points)
                for i, (label, points, _) in enumerate(finite)
                if points
            ]
        )
        skipped.append(sum(left_out for _, _, left_out in finite))
        labels = [label for label, _, _ in prepared[-1]]
        _, rows = _legend_layout(labels, _MARGIN_LEFT, width - _MARGIN_RIGHT)
        heights.append(panel_height + max(0, rows - _LEGEND_FREE_ROWS) * _LEGEND_ROW)
    height = _TITLE_HEIGHT + sum(heights)
    parts = [
        "<?xml version='1.0' encoding='UTF-8'?>",
        f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' "
        f"viewBox='0 0 {width} {height}' {_FONT}>",
        f"<title>{escape(title)}</title>",
        # white, not transparent: dark-mode viewers would otherwise draw black text on black
        f"<rect width='{width}' height='{height}' fill='white'/>",
        _text(width / 2, 22, title, size=16, font_weight="bold"),
    ]
    xs = [x for series in prepared for _, _, points in series for x, _ in points]
    x_span = _span(xs, 0.0) if xs else (0.0, 1.0)
    top = _TITLE_HEIGHT
    for panel, series, left_out, panel_h in zip(panels, prepared, skipped, heights, strict=True):
        size = (width, panel_h)
        parts += _panel_svg(panel, series, left_out, x_span, top, size, max_points)
        top += panel_h
    parts.append("</svg>")
    return "\n".join(parts) + "\n"
