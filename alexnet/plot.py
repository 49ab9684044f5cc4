"""Line charts drawn with PIL (no plotting library needed).

Enough for the paper's Figure 1: a few curves of y against x, solid or
dashed, horizontal reference lines, ticks, axis labels and a legend.
"""

from collections.abc import Callable, Sequence
import dataclasses
import math

import numpy as np
from PIL import Image
from PIL import ImageDraw
from PIL import ImageFont

_MARGIN = (70, 30, 30, 50)  # left, top, right, bottom, in pixels.
_DASH = 8  # Length of each dash and each gap of a dashed line, in pixels.
_GREY = (150, 150, 150)
_WIDTH = 2  # Of every curve, in pixels.


@dataclasses.dataclass(frozen=True)
class Line:
  """One curve: points (x[i], y[i]), drawn in `colour`, solid or dashed."""

  label: str
  x: Sequence[float]
  y: Sequence[float]
  colour: tuple[int, int, int]
  dashed: bool = False


def _ticks(high: float, count: int = 5) -> list[float]:
  """Round tick values from 0 to at least `high`."""
  raw = high / count
  step = 10 ** math.floor(math.log10(raw))
  step = next(s * step for s in (1, 2, 2.5, 5, 10) if s * step >= raw)
  return [round(i * step, 12)
          for i in range(int(math.ceil(high / step - 1e-9)) + 1)]


def _dashed(draw: ImageDraw.ImageDraw, points: list[tuple[float, float]],
            colour: tuple[int, int, int]) -> None:
  """Draws a polyline as alternating dashes and gaps of _DASH pixels."""
  travelled = 0.0  # Along the whole polyline: dashes continue over joints.
  for (x0, y0), (x1, y1) in zip(points, points[1:]):
    length = math.hypot(x1 - x0, y1 - y0)
    at = 0.0
    while at < length:
      phase = (travelled + at) % (2 * _DASH)
      in_dash = phase < _DASH
      run = min((_DASH if in_dash else 2 * _DASH) - phase, length - at)
      if in_dash:
        t0, t1 = at / length, (at + run) / length
        draw.line([(x0 + t0 * (x1 - x0), y0 + t0 * (y1 - y0)),
                   (x0 + t1 * (x1 - x0), y0 + t1 * (y1 - y0))],
                  fill=colour, width=_WIDTH)
      at += run
    travelled += length


def _polyline(draw: ImageDraw.ImageDraw, points: list[tuple[float, float]],
              line: Line) -> None:
  if line.dashed:
    _dashed(draw, points, line.colour)
  else:
    draw.line(points, fill=line.colour, width=_WIDTH)


def _axes(draw: ImageDraw.ImageDraw,
          to_pixel: Callable[[float, float], tuple[float, float]],
          x_ticks: list[float], y_ticks: list[float]) -> None:
  """Draws both axes with their ticks and tick labels."""
  font = ImageFont.load_default()
  draw.line([to_pixel(0, y_ticks[-1]), to_pixel(0, 0),
             to_pixel(x_ticks[-1], 0)], fill='black')
  for x in x_ticks:
    px, py = to_pixel(x, 0)
    draw.line([(px, py), (px, py + 4)], fill='black')
    draw.text((px, py + 6), f'{x:g}', fill='black', font=font, anchor='ma')
  for y in y_ticks:
    px, py = to_pixel(0, y)
    draw.line([(px - 4, py), (px, py)], fill='black')
    draw.text((px - 6, py), f'{y:g}', fill='black', font=font, anchor='rm')


def line_chart(lines: Sequence[Line], *, x_label: str, y_label: str,
               hlines: Sequence[float] = (),
               size: tuple[int, int] = (640, 420)) -> np.ndarray:
  """Draws curves on axes that start at 0 and fit every point.

  Args:
    lines: the curves.
    x_label: text under the x axis.
    y_label: text over the y axis.
    hlines: y values marked with thin grey reference lines.
    size: (width, height) of the picture in pixels.

  Returns:
    uint8 RGB picture [height, width, 3].
  """
  width, height = size
  left, top, right, bottom = _MARGIN
  x_ticks = _ticks(max(max(line.x) for line in lines))
  y_ticks = _ticks(max([max(line.y) for line in lines] + list(hlines)))

  def to_pixel(x, y):
    return (left + x / x_ticks[-1] * (width - left - right),
            height - bottom - y / y_ticks[-1] * (height - top - bottom))

  image = Image.new('RGB', size, 'white')
  draw = ImageDraw.Draw(image)
  font = ImageFont.load_default()
  for y in hlines:
    draw.line([to_pixel(0, y), to_pixel(x_ticks[-1], y)], fill=_GREY)
  _axes(draw, to_pixel, x_ticks, y_ticks)
  draw.text((width / 2, height - 18), x_label, fill='black', font=font,
            anchor='ma')
  draw.text((left, top - 18), y_label, fill='black', font=font)
  for i, line in enumerate(lines):
    _polyline(draw, [to_pixel(x, y) for x, y in zip(line.x, line.y)], line)
    key_y = top + 16 * i  # The legend, top right.
    _polyline(draw, [(width - right - 150, key_y),
                     (width - right - 110, key_y)], line)
    draw.text((width - right - 104, key_y), line.label, fill='black',
              font=font, anchor='lm')
  return np.asarray(image)
