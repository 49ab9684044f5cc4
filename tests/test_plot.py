"""Tests of the experiments' line charts (experiments/plots.py)."""

import numpy as np
from PIL import Image

from experiments import plots

_BLUE, _RED = (31, 119, 180), (214, 39, 40)  # matplotlib's tab:blue, tab:red.


def _chart():
  # A falling solid line and a flat dashed one, with a target at 0.25.
  lines = [plots.Line([0.0, 1.0, 2.0], [1.0, 0.5, 0.0], 'tab:blue',
                      label='falling'),
           plots.Line([0.0, 2.0], [0.5, 0.5], 'tab:red', label='flat',
                      dashed=True)]
  return plots.line_chart(lines, x_label='x', y_label='y', hlines=[0.25],
                          size=(4.0, 3.0), dpi=100)


def _pixel(figure, x, y):
  """(row, column) of data point (x, y) in the rendered picture."""
  column, up = figure.axes[0].transData.transform((x, y))
  return int(round(figure.bbox.height - up)), int(round(column))


def _near(picture, row, column, colour, radius=2):
  window = picture[row - radius:row + radius + 1,
                   column - radius:column + radius + 1].astype(int)
  return np.abs(window - colour).sum(-1).min() <= 30


def test_png_decodes_at_size_times_dpi_and_equals_the_rgb_render(tmp_path):
  figure = _chart()
  path = tmp_path / 'chart.png'
  plots.save_png(figure, str(path))
  decoded = np.asarray(Image.open(path).convert('RGB'))
  assert decoded.shape == (300, 400, 3)
  rendered = plots.to_rgb(figure)
  assert rendered.dtype == np.uint8
  np.testing.assert_array_equal(decoded, rendered)
  # Not blank: mostly white background, with some ink.
  white = np.all(decoded == 255, axis=-1).mean()
  assert 0.5 < white < 0.99


def test_draws_each_curve_through_its_points():
  figure = _chart()
  picture = plots.to_rgb(figure)
  for x, y in ((0.5, 0.75), (1.0, 0.5), (1.5, 0.25)):
    assert _near(picture, *_pixel(figure, x, y), _BLUE)
  # The flat dashed line: red along y = 0.5, with gaps between dashes.
  row = _pixel(figure, 0, 0.5)[0]
  start, stop = _pixel(figure, 0.1, 0.5)[1], _pixel(figure, 0.9, 0.5)[1]
  band = picture[row - 1:row + 2, start:stop].astype(int)
  red = (np.abs(band - _RED).sum(-1) <= 30).any(axis=0)
  assert 0.3 < red.mean() < 0.95
  # No red where there is no curve (below the flat line, away from text).
  assert not _near(picture, *_pixel(figure, 1.0, 0.1), _RED, radius=4)


def test_axes_start_at_zero_and_the_legend_lists_labelled_lines_only():
  unlabelled = plots.Line([1.0, 2.0], [0.4, 0.3], 'tab:red')
  labelled = plots.Line([1.0, 2.0], [0.6, 0.5], 'tab:blue', label='relu')
  figure = plots.line_chart([labelled, unlabelled], x_label='Epochs',
                            y_label='error', hlines=[0.1])
  axes = figure.axes[0]
  assert axes.get_xlim()[0] == 0 and axes.get_ylim()[0] == 0
  assert [t.get_text() for t in axes.get_legend().get_texts()] == ['relu']
  assert axes.get_xlabel() == 'Epochs'
  # No labels at all: no legend box.
  figure = plots.line_chart([unlabelled], x_label='x', y_label='y')
  assert figure.axes[0].get_legend() is None
