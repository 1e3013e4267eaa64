"""`cv2.resize` with `INTER_AREA` in numpy: the one OpenCV call rlsolo makes (common/envs.py's 84x84 frames).

For a machine without OpenCV whose wheel (54 MiB) is not worth carrying there: `benchmark/gpu_check.sh`
puts this directory's `cv2.py` on the path when `import cv2` fails. It reproduces OpenCV's area
interpolation bit for bit where OpenCV takes its general path, a downscale by a non-integer factor along at
least one axis (Atari's 210x160 to 84x84): each output pixel is the area-weighted mean of the source pixels
it covers, summed in float32 in OpenCV's order (along each row, then down the columns) and rounded half to
even. Other inputs raise ValueError rather than differ from OpenCV.
"""

from __future__ import annotations

import functools

import numpy as np

__version__ = "numpy INTER_AREA stand-in"
INTER_AREA = 3


@functools.lru_cache(maxsize=32)
def area_weights(src: int, dst: int) -> tuple[np.ndarray, np.ndarray]:
    """Source indices and float32 weights [K, dst] of the up to K source pixels of each output pixel, in order."""
    scale = src / dst
    terms: list[list[tuple[int, float]]] = []
    for d in range(dst):
        start = d * scale
        stop = start + scale
        cell = min(scale, src - start)
        last = min(int(np.floor(stop)), src - 1)
        first = min(int(np.ceil(start)), last)
        row = []
        if first - start > 1e-3:  # the partly covered pixel before the first whole one
            row.append((first - 1, (first - start) / cell))
        row += [(s, 1.0 / cell) for s in range(first, last)]
        if stop - last > 1e-3:  # the partly covered pixel after the last whole one
            row.append((last, min(stop - last, 1.0, cell) / cell))
        terms.append(row)
    index = np.zeros((max(map(len, terms)), dst), np.intp)
    weight = np.zeros(index.shape, np.float32)  # padding terms weigh 0: adding them changes no sum
    for d, row in enumerate(terms):
        for k, (s, w) in enumerate(row):
            index[k, d], weight[k, d] = s, np.float32(w)
    return index, weight


def resize(src: np.ndarray, dsize: tuple[int, int], interpolation: int = INTER_AREA) -> np.ndarray:
    """`src` [H, W] uint8 resized to `dsize` = (width, height) by area interpolation, as OpenCV's INTER_AREA."""
    src = np.asarray(src)
    width, height = dsize
    if interpolation != INTER_AREA or src.dtype != np.uint8 or src.ndim != 2:
        raise ValueError("this cv2 stand-in only resizes 2-D uint8 images with INTER_AREA: install opencv-python")
    if (height, width) == src.shape:
        return src.copy()
    scale_y, scale_x = src.shape[0] / height, src.shape[1] / width
    if scale_y < 1 or scale_x < 1 or (scale_y.is_integer() and scale_x.is_integer()):
        raise ValueError(f"this cv2 stand-in only downscales by a non-integer factor, not {src.shape} to "
                         f"{(height, width)}: install opencv-python")
    x_index, x_weight = area_weights(src.shape[1], width)
    y_index, y_weight = area_weights(src.shape[0], height)
    pixels = src.astype(np.float32)
    rows = pixels[:, x_index[0]] * x_weight[0]
    for k in range(1, len(x_index)):
        rows += pixels[:, x_index[k]] * x_weight[k]
    out = rows[y_index[0]] * y_weight[0][:, None]
    for k in range(1, len(y_index)):
        out += rows[y_index[k]] * y_weight[k][:, None]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)
