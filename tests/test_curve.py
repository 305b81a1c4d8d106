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
