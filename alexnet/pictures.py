"""Pictures of learned conv1 kernels, as in the paper's Figure 3.

The paper shows the 96 conv1 kernels with tower 0's 48 above tower 1's: one
tower tends to learn colour-agnostic kernels, the other colour-specific ones.
"""

import numpy as np
from PIL import Image


def kernel_grid(kernels: np.ndarray, *, columns: int = 8, zoom: int = 4,
                gap: int = 2) -> np.ndarray:
  """Tiles conv1 kernels into one RGB picture, one block of rows per tower.

  Each kernel is stretched to the full 0-255 range on its own, so that
  faint kernels stay visible (their relative magnitudes are not shown).

  Args:
    kernels: [towers, kh, kw, 3, n] conv1 kernels.
    columns: kernels per row.
    zoom: each weight becomes a zoom x zoom block of pixels.
    gap: pixels between kernels; towers are separated by 4 * gap.

  Returns:
    uint8 [height, width, 3].
  """
  towers, kh, kw, _, n = kernels.shape
  columns = min(columns, n)
  rows = -(-n // columns)
  cell_h, cell_w = kh * zoom + gap, kw * zoom + gap
  block_h = rows * cell_h
  height = towers * block_h + (towers - 1) * 4 * gap
  picture = np.full((height, columns * cell_w, 3), 255, np.uint8)
  for t in range(towers):
    for i in range(n):
      kernel = kernels[t, :, :, :, i]
      low, high = kernel.min(), kernel.max()
      scaled = (kernel - low) / max(high - low, 1e-12)
      tile = np.kron(scaled, np.ones((zoom, zoom, 1)))
      top = t * (block_h + 4 * gap) + (i // columns) * cell_h
      left = (i % columns) * cell_w
      picture[top:top + kh * zoom, left:left + kw * zoom] = np.round(
          tile * 255).astype(np.uint8)
  return picture


def save_png(picture: np.ndarray, path: str) -> None:
  """Writes a uint8 [H, W, 3] picture as PNG."""
  Image.fromarray(picture).save(path)
