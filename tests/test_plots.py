import math
import xml.etree.ElementTree as ET

import pytest

from nanochat_jax import plots
from nanochat_jax.plots import Panel, Series

NS = {"svg": "http://www.w3.org/2000/svg"}


def _parse(svg: str) -> ET.Element:
    root = ET.fromstring(svg.encode("utf-8"))  # raises on malformed XML
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    return root


def _polylines(root: ET.Element) -> list[list[tuple[float, float]]]:
    return [
        [tuple(map(float, pair.split(","))) for pair in line.get("points").split()]
        for line in root.iterfind(".//svg:polyline", NS)
    ]


def _texts(root: ET.Element) -> list[str]:
    return [t.text for t in root.iterfind(".//svg:text", NS)]


def test_downsample_keeps_extremes_and_order():
    points = [(float(i), math.sin(i / 50)) for i in range(10_001)]
    points[7777] = (7777.0, 25.0)  # a loss spike must survive
    points[1234] = (1234.0, -9.0)
    out = plots.downsample(points, 2000)
    assert len(out) == 2000
    assert [x for x, _ in out] == sorted(x for x, _ in out)  # still in step order
    assert set(out) <= set(points)
    assert (7777.0, 25.0) in out and (1234.0, -9.0) in out
    assert plots.downsample(points[:2000], 2000) == points[:2000]  # short enough: unchanged
    assert len(plots.downsample(points, 999)) == 998  # 499 buckets of two
    flat = [(float(i), 1.0) for i in range(100)]
    assert plots.downsample(flat, 10)[:2] == [(0.0, 1.0), (19.0, 1.0)]  # 5 buckets of 20
    with pytest.raises(ValueError, match="max_points must be at least 2"):
        plots.downsample(points, 1)


def test_nice_ticks():
    assert plots.nice_ticks(0, 199) == [0, 50, 100, 150]
    assert plots.nice_ticks(1.3, 3.7) == [1.5, 2.0, 2.5, 3.0, 3.5]
    assert plots.nice_ticks(0.093, 0.176) == [0.1, 0.12, 0.14, 0.16]
    assert plots.nice_ticks(-1, 1) == [-1.0, -0.5, 0.0, 0.5, 1.0]
    assert plots.nice_ticks(0, 2_000_000) == [0, 500_000, 1_000_000, 1_500_000, 2_000_000]
    with pytest.raises(ValueError, match="finite lo < hi"):
        plots.nice_ticks(1.0, 1.0)
    with pytest.raises(ValueError, match="finite lo < hi"):
        plots.nice_ticks(0.0, math.inf)
    # at the edges of float precision and range: distinct ticks inside [lo, hi], no overflow
    assert plots.nice_ticks(1.0, 1.0000000000000002) == [1.0, 1.0000000000000002]
    assert plots.nice_ticks(-1.7e308, 1.7e308) == [-1e308, 0.0, 1e308]
    assert plots.nice_ticks(0.0, 5e-324) == [0.0, 5e-324]


def test_tick_labels():
    ticks = plots.nice_ticks(0.093, 0.176)
    assert [plots._tick_label(t, ticks) for t in ticks] == ["0.10", "0.12", "0.14", "0.16"]
    ticks = plots.nice_ticks(0, 2_000_000)
    assert [plots._tick_label(t, ticks) for t in ticks][:3] == ["0", "5e+05", "1e+06"]
    ticks = plots.nice_ticks(1e-20, 3e-20)
    assert [plots._tick_label(t, ticks) for t in ticks][:2] == ["1e-20", "1.5e-20"]
    assert plots._tick_label(3.0, [3.0]) == "3"  # one tick: no spacing to take decimals from
    assert plots._tick_label(3.0, [3.0, 3.0]) == "3"


def test_chart_structure_axes_and_legend():
    steps = list(range(200))
    panels = [
        Panel(
            "Training loss",
            "loss (nats)",
            (
                Series("train loss", steps, [8 - s / 40 for s in steps]),
                Series("train loss (EMA)", steps, [8.1 - s / 40 for s in steps]),
            ),
        ),
        Panel(
            "Validation bits per byte", "bpb", (Series("val bpb", [0, 100, 200], [3.6, 1.6, 1.4]),)
        ),
    ]
    svg = plots.render_svg("Base model training (d3)", panels)
    root = _parse(svg)
    assert root.find("svg:title", NS).text == "Base model training (d3)"
    lines = _polylines(root)
    assert [len(line) for line in lines] == [200, 200, 3]
    texts = _texts(root)
    for expected in ("Training loss", "loss (nats)", "bpb", "train loss", "train loss (EMA)"):
        assert expected in texts
    assert texts.count("step") == 2  # each panel's x axis
    for tick in ("0", "50", "100", "150", "200", "3.5", "2.0"):
        assert tick in texts
    # steps go left to right, a lower loss is drawn lower (larger y) than a higher one
    first = lines[0]
    assert first[0][0] < first[-1][0] and first[0][1] < first[-1][1]
    assert all(72 <= x <= 720 - 24 for line in lines for x, _ in line)  # inside the plot area
    # the panels share the x range (0..200 here): the same step is drawn at the same x
    assert lines[0][0][0] == lines[2][0][0] == 72 and lines[2][-1][0] == 720 - 24
    # sparse series get a dot per point; dense ones do not
    assert len(root.findall(".//svg:circle", NS)) == 3


def test_huge_series_is_downsampled():
    steps = list(range(0, 3_000_000, 3))  # a million points
    svg = plots.render_svg(
        "big", [Panel("loss", "loss", (Series("train", steps, [1 / (1 + s) for s in steps]),))]
    )
    root = _parse(svg)
    assert [len(line) for line in _polylines(root)] == [2000]
    assert len(svg) < 100_000
    few = plots.render_svg(
        "big", [Panel("loss", "loss", (Series("train", steps, steps),))], max_points=100
    )
    assert [len(line) for line in _polylines(_parse(few))] == [100]


def test_non_finite_values_are_skipped_and_noted():
    steps = list(range(10))
    values = [1.0, math.nan, 2.0, math.inf, 3.0, -math.inf, 4.0, 5.0, 6.0, 7.0]
    svg = plots.render_svg("nan", [Panel("loss", "loss", (Series("train", steps, values),))])
    root = _parse(svg)
    assert [len(line) for line in _polylines(root)] == [7]
    assert "loss (3 non-finite values skipped)" in _texts(root)
    assert "NaN" not in svg and "inf" not in svg.lower()
    # a series with nothing finite: the panel says so instead of drawing
    svg = plots.render_svg(
        "all nan", [Panel("loss", "loss", (Series("train", [0, 1], [math.nan, math.nan]),))]
    )
    root = _parse(svg)
    assert _polylines(root) == []
    assert "no finite values to plot" in _texts(root)
    assert "loss (2 non-finite values skipped)" in _texts(root)


def test_single_point_and_flat_series():
    root = _parse(plots.render_svg("one", [Panel("CORE", "CORE", (Series("CORE", [500], [0.2]),))]))
    assert _polylines(root) == []  # a line needs two points
    circles = root.findall(".//svg:circle", NS)
    assert len(circles) == 1
    assert 72 < float(circles[0].get("cx")) < 720 - 24  # in the middle, not on an edge
    flat = plots.render_svg("flat", [Panel("x", "y", (Series("s", [0, 1, 2], [5.0, 5.0, 5.0]),))])
    line = _polylines(_parse(flat))[0]
    assert len({y for _, y in line}) == 1


def test_text_is_escaped_and_bad_input_is_clear():
    label = 'a < b & "c"'
    root = _parse(plots.render_svg(label, [Panel(label, label, (Series(label, [0, 1], [0, 1]),))]))
    assert _texts(root).count(label) == 4  # chart title, panel title, y label, legend
    with pytest.raises(ValueError, match="has no panels"):
        plots.render_svg("empty", [])
    with pytest.raises(ValueError, match="3 steps but 2 values"):
        plots.render_svg("bad", [Panel("x", "y", (Series("s", [0, 1, 2], [0.0, 1.0]),))])


def _plot_area(root: ET.Element) -> list[tuple[float, float]]:
    """(top, height) of each panel's framed plot area."""
    return [
        (float(r.get("y")), float(r.get("height")))
        for r in root.iterfind(".//svg:rect", NS)
        if r.get("fill") == "none"
    ]


@pytest.mark.parametrize(
    "values",
    [
        [1.0, 1.0000000000000002],  # constant up to rounding
        [0.0, 5e-324],  # the smallest positive float
        [-1.7e308, 1.7e308],  # the span overflows a float
        [1.7e308, 1.7e308],
    ],
)
def test_degenerate_and_extreme_ranges_render(values):
    for steps in ([0, 1], [-1.7e308, 1.7e308]):
        svg = plots.render_svg("odd", [Panel("x", "y", (Series("s", steps, values),))])
        root = _parse(svg)
        (line,) = _polylines(root)
        ((top, height),) = _plot_area(root)
        assert all(72 <= x <= 720 - 24 and top <= y <= top + height for x, y in line)
        assert "nan" not in svg.lower() and "inf" not in svg.lower()
        texts = list(root.iterfind(".//svg:text", NS))
        for anchor in ("middle", "end"):  # the x and the y axis: distinct tick labels each
            labels = [
                t.text
                for t in texts
                if t.get("font-size") == "11" and t.get("text-anchor") == anchor
            ]
            assert len(labels) == len(set(labels)) >= 2, labels


def test_many_legend_rows_grow_the_panel():
    steps = [0, 1, 2]
    few = [Series(f"a fairly long series name {i:02d}", steps, [i, i, i]) for i in range(4)]
    many = [Series(f"a fairly long series name {i:02d}", steps, [i, i, i]) for i in range(14)]
    two_rows = _parse(plots.render_svg("few", [Panel("p", "y", tuple(few))]))
    grown = _parse(
        plots.render_svg("many", [Panel("p", "y", tuple(many)), Panel("q", "y", (few[0],))])
    )
    # 14 items of ~250 px in rows of 624 px: 7 rows, 5 past the two that fit
    assert float(grown.get("height")) == 30 + 240 + 5 * 18 + 240
    (_, area_two), (top, area), (top_q, area_q) = _plot_area(two_rows) + _plot_area(grown)
    assert area == area_two > 100  # the plot area keeps a two-row panel's height
    assert top_q > top + area + 44  # the next panel starts below the grown one
    assert area_q > area
    legend_y = [
        float(t.get("y"))
        for t in grown.iterfind(".//svg:text", NS)
        if (t.text or "").startswith("a fairly")
    ][:14]
    assert len(set(legend_y)) == 7 and max(legend_y) < top  # every row above the plot area


def test_series_keep_their_colour_when_one_has_nothing_finite():
    steps = [0, 1]
    panels = [
        Panel("all", "y", (Series("a", steps, [1, 2]), Series("b", steps, [3, 4]))),
        Panel("no a", "y", (Series("a", steps, [math.nan] * 2), Series("b", steps, [3, 4]))),
    ]
    root = _parse(plots.render_svg("colours", panels))
    colours = [line.get("stroke") for line in root.iterfind(".//svg:polyline", NS)]
    assert colours == [plots._COLORS[0], plots._COLORS[1], plots._COLORS[1]]
