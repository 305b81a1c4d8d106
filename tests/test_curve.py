"""The toy base's learning curve: points read back once per step, in step order, and plotted."""

from __future__ import annotations

import json

from vilex.toyworld import curve
from vilex.toyworld.probe import ATTRIBUTES


def point(value: float) -> dict:
    return {**{name: value for name in ATTRIBUTES}, "center_error_px": 20 * (1 - value)}


def test_points_are_read_once_per_step_in_order_and_plotted(tmp_path):
    curve.log_point(tmp_path, 2000, point(0.5))
    curve.log_point(tmp_path, 0, point(0.1))
    curve.log_point(tmp_path, 2000, point(0.6))  # a resumed run logged step 2000 again: the last one counts
    lines = (tmp_path / curve.CURVE_FILE).read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [2000, 0, 2000]
    points = curve.read_points(tmp_path)
    assert [p["step"] for p in points] == [0, 2000] and points[1]["shape"] == 0.6
    png = tmp_path / curve.PLOT_FILE
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not list(tmp_path.glob("*.partial*"))


def test_a_curve_continued_with_finer_detail_words_keeps_both_points_of_the_step_where_it_continued(tmp_path):
    """The shipped curve is several runs' files, steps counted on: the last point of a run with one-digit detail
    words and the first of the next run, with two, share a step and are both kept (a line each in the plot)."""
    curve.log_point(tmp_path, 0, {**point(0.5), curve.DETAILED + "center_error_px": 14.0})
    curve.log_point(tmp_path, 1000, {**point(0.8), curve.DETAILED + "center_error_px": 3.0})
    curve.log_point(tmp_path, 1000, {**point(0.8), curve.DETAILED + "center_error_px": 7.5, curve.DIGITS: 2})
    curve.log_point(tmp_path, 2000, {**point(0.8), curve.DETAILED + "center_error_px": 2.5, curve.DIGITS: 2})
    points = curve.read_points(tmp_path)
    assert [(p["step"], p.get(curve.DIGITS, 1)) for p in points] == [(0, 1), (1000, 1), (1000, 2), (2000, 2)]
    assert [p[curve.DETAILED + "center_error_px"] for p in points] == [14.0, 3.0, 7.5, 2.5]
