"""Tests of the PIL line charts (alexnet/plot.py)."""

import numpy as np

from alexnet import plot

_BLUE, _RED, _GREY = (0, 0, 200), (200, 0, 0), (150, 150, 150)


def _pixels_of(picture, colour):
  return np.argwhere(np.all(picture == colour, axis=-1))


def test_ticks_are_round_and_cover_the_data():
  assert plot._ticks(8) == [0, 2, 4, 6, 8]
  assert plot._ticks(0.9) == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
  assert plot._ticks(2.1) == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5]


def test_draws_each_curve_where_its_points_are():
  # A falling solid line and a flat dashed one, on 0..2 x 0..1 axes.
  lines = [plot.Line('falling', [0.0, 2.0], [1.0, 0.0], _BLUE),
           plot.Line('flat', [0.0, 2.0], [0.5, 0.5], _RED, dashed=True)]
  picture = plot.line_chart(lines, x_label='x', y_label='y', hlines=[0.25],
                            size=(400, 300))
  assert picture.shape == (300, 400, 3) and picture.dtype == np.uint8
  left, top, right, bottom = plot._MARGIN
  height = 300 - top - bottom
  # The dashed line: at y = 0.5, in dashes (gaps inside the plot area).
  red = _pixels_of(picture, _RED)
  row = round(300 - bottom - 0.5 * height)
  on_row = red[np.abs(red[:, 0] - row) <= 1][:, 1]
  on_row = on_row[on_row < 400 - right - 160]  # Leave the legend out.
  assert on_row.min() <= left + 2
  assert len(np.unique(on_row)) < 0.75 * (on_row.max() - on_row.min())
  # The solid line falls from the top-left to the bottom-right corner.
  blue = _pixels_of(picture, _BLUE)
  blue = blue[blue[:, 0] > top + 20]  # Leave the legend out.
  rows, cols = blue[:, 0], blue[:, 1]
  assert np.corrcoef(rows, cols)[0, 1] > 0.99
  # The reference line at y = 0.25 is grey and spans the plot area.
  grey = _pixels_of(picture, _GREY)
  # Leave out antialiased text: tick labels and the legend.
  grey = grey[(grey[:, 1] > left) & (grey[:, 0] > top + 40)]
  assert np.all(np.abs(grey[:, 0] - round(300 - bottom - 0.25 * height)) <= 1)
  assert grey[:, 1].max() - grey[:, 1].min() >= 400 - left - right - 1
