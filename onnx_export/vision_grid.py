"""The grid-dependent inputs of the Qwen2-VL / Qwen2.5-VL vision graph, computed on the host in NumPy (no torch).

The vision towers derive these from `grid_thw` with data-dependent Python (`.tolist()`, loops), which a graph cannot
hold for every image size. transformers lets a caller pass them precomputed (`transformers.vision_utils`); the
vision graph takes them as inputs, and these functions compute them exactly as those helpers do:

- `vision_position_ids`: each patch's (row, column) in the image, laid out block-major over m x m merge blocks;
- `vision_cu_seqlens`: the attention segments' boundaries, one segment per frame (h * w patches);
- `vision_window_index` (Qwen2.5-VL): the order that groups merged tokens by attention window, and the windows'
  boundaries in patches.
"""

import numpy as np


def _grids(grid_thw: np.ndarray) -> list[tuple[int, int, int]]:
    grid_thw = np.asarray(grid_thw)
    if grid_thw.ndim != 2 or grid_thw.shape[1] != 3:
        raise ValueError(f"grid_thw must have shape (num_images, 3), got {grid_thw.shape}.")
    return [(int(t), int(h), int(w)) for t, h, w in grid_thw]


def vision_position_ids(grid_thw: np.ndarray, spatial_merge_size: int) -> np.ndarray:
    """(total patches, 2) int64: each patch's (row, column), in the processor's block-major patch order."""
    rows = []
    for grid_t, grid_h, grid_w in _grids(grid_thw):
        height, width = np.meshgrid(np.arange(grid_h), np.arange(grid_w), indexing="ij")
        blocks = (grid_h // spatial_merge_size, spatial_merge_size, grid_w // spatial_merge_size, spatial_merge_size)
        height = height.reshape(blocks).transpose(0, 2, 1, 3).reshape(-1)
        width = width.reshape(blocks).transpose(0, 2, 1, 3).reshape(-1)
        rows.append(np.tile(np.stack([height, width], axis=-1), (grid_t, 1)))
    return np.concatenate(rows).astype(np.int64)


def vision_cu_seqlens(grid_thw: np.ndarray) -> np.ndarray:
    """(segments + 1,) int32: cumulative patch counts, one segment per frame of each image."""
    lengths = [grid_h * grid_w for grid_t, grid_h, grid_w in _grids(grid_thw) for _ in range(grid_t)]
    return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)


def vision_window_index(
    grid_thw: np.ndarray, spatial_merge_size: int, window_size: int, patch_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Qwen2.5-VL's window attention: the merged-token order that groups tokens by window (total tokens,) int64,
    and the windows' cumulative sizes in patches (windows + 1,) int32, empty windows dropped."""
    merged_window = window_size // spatial_merge_size // patch_size
    merge_unit = spatial_merge_size**2
    window_index, boundaries, offset = [], [0], 0
    for grid_t, grid_h, grid_w in _grids(grid_thw):
        tokens_h, tokens_w = grid_h // spatial_merge_size, grid_w // spatial_merge_size
        index = np.arange(grid_t * tokens_h * tokens_w).reshape(grid_t, tokens_h, tokens_w)
        pad_h = merged_window - tokens_h % merged_window
        pad_w = merged_window - tokens_w % merged_window
        windows_h, windows_w = (tokens_h + pad_h) // merged_window, (tokens_w + pad_w) // merged_window
        padded = np.pad(index, ((0, 0), (0, pad_h), (0, pad_w)), constant_values=-100)
        padded = padded.reshape(grid_t, windows_h, merged_window, windows_w, merged_window)
        padded = padded.transpose(0, 1, 3, 2, 4).reshape(grid_t, windows_h * windows_w, -1)
        sizes = (padded != -100).sum(axis=-1).reshape(-1)
        flat = padded.reshape(-1)
        window_index.append(flat[flat != -100] + offset)
        boundaries.extend((np.cumsum(sizes) * merge_unit + boundaries[-1]).tolist())
        offset += grid_t * tokens_h * tokens_w
    boundaries = np.asarray(boundaries, dtype=np.int32)
    kept = np.concatenate([[True], np.diff(boundaries) != 0])
    return np.concatenate(window_index).astype(np.int64), boundaries[kept]
