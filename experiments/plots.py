"""Line charts for the experiments, drawn by matplotlib's Agg backend.

Agg renders to memory (no display needed); the figure is built with
`matplotlib.figure.Figure` rather than pyplot, so no global state is kept
between charts and nothing needs closing.
"""

from collections.abc import Sequence
import dataclasses

from matplotlib.backends import backend_agg
from matplotlib import figure as figure_lib
import numpy as np


@dataclasses.dataclass(frozen=True)
class Line:
  """One curve: points (x[i], y[i]).

  Attributes:
    x, y: the points.
    colour: any matplotlib colour, e.g. 'tab:blue'.
    label: legend entry; None leaves the line out of the legend (e.g. the
      second and later seeds of one setting).
    dashed: dashed instead of solid.
  """

  x: Sequence[float]
  y: Sequence[float]
  colour: str
  label: str | None = None
  dashed: bool = False


def line_chart(lines: Sequence[Line], *, x_label: str, y_label: str,
               hlines: Sequence[float] = (), title: str | None = None,
               size: tuple[float, float] = (6.4, 4.2),
               dpi: int = 100) -> figure_lib.Figure:
  """Draws curves on axes that start at 0, with grey reference lines.

  Args:
    lines: the curves, drawn in order.
    x_label, y_label: axis labels.
    hlines: y values marked with thin dotted grey lines (e.g. targets).
    title: optional title above the axes.
    size: (width, height) in inches.
    dpi: pixels per inch: the picture is size * dpi pixels.

  Returns:
    The figure, with an Agg canvas (see `to_rgb`, `save_png`).
  """
  figure = figure_lib.Figure(figsize=size, dpi=dpi)
  backend_agg.FigureCanvasAgg(figure)
  axes = figure.add_subplot()
  for y in hlines:
    axes.axhline(y, color='0.6', linewidth=0.8, linestyle=':', zorder=0)
  for line in lines:
    axes.plot(line.x, line.y, color=line.colour, label=line.label,
              linestyle='--' if line.dashed else '-', linewidth=1.5)
  axes.set_xlim(left=0)
  axes.set_ylim(bottom=0)
  axes.set_xlabel(x_label)
  axes.set_ylabel(y_label)
  if title:
    axes.set_title(title)
  if any(line.label for line in lines):
    axes.legend(frameon=False)
  figure.tight_layout()
  return figure


def to_rgb(figure: figure_lib.Figure) -> np.ndarray:
  """The rendered figure as uint8 RGB [height, width, 3] (for TensorBoard)."""
  figure.canvas.draw()
  return np.array(figure.canvas.buffer_rgba())[..., :3]


def save_png(figure: figure_lib.Figure, path: str) -> None:
  """Writes the figure as a PNG of size * dpi pixels."""
  figure.savefig(path, format='png')
