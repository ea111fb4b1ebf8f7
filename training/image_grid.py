"""Tile uint8 NHWC images into one picture and save it (PNG etc. via PIL, written atomically)."""
import math
import os

import numpy as np
import PIL.Image

from dnnlib.util import atomic_write


def image_grid(images, cols=None):
    """uint8 [N,H,W,C] (numpy or torch) → one uint8 [rows·H, cols·W, C] array, row-major, unused cells
    black; cols defaults to ceil(sqrt(N)) for a near-square grid."""
    images = np.asarray(images.cpu() if hasattr(images, 'cpu') else images)
    if images.ndim != 4 or images.dtype != np.uint8 or images.shape[0] == 0:
        raise ValueError(f'image_grid expects a non-empty uint8 [N,H,W,C] array, '
                         f'got {images.dtype} {list(images.shape)}')
    n, h, w, c = images.shape
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.zeros([rows * cols, h, w, c], dtype=np.uint8)
    grid[:n] = images
    return grid.reshape(rows, cols, h, w, c).transpose(0, 2, 1, 3, 4).reshape(rows * h, cols * w, c)


def save_image_grid(images, path, cols=None):
    grid = image_grid(images, cols)
    image = PIL.Image.fromarray(grid[:, :, 0], 'L') if grid.shape[2] == 1 else PIL.Image.fromarray(grid, 'RGB')
    fmt = PIL.Image.registered_extensions().get(os.path.splitext(path)[1].lower())
    if fmt is None:
        raise ValueError(f'{path}: unknown image file extension (use e.g. .png)')
    with atomic_write(path) as f:
        image.save(f, format=fmt)
