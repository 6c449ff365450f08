"""Qwen2-VL / Qwen2.5-VL multimodal rotary positions (M-RoPE) in NumPy, for the ONNX Runtime host.

Each token gets three position ids (temporal, height, width). Text tokens count up by one on all three rows. An
image of `(t, h, w)` patches becomes `t * (h / m) * (w / m)` tokens (`m` the spatial merge size) laid out on a grid:
the rows hold `start + t_index`, `start + row` and `start + column`, and the text after the image continues at
`start + max(h, w) / m`. Padding (attention mask 0) is skipped and gets position 0. Decoding continues from the
last prompt position: each new token is one further on every row.
"""

import numpy as np

TEXT, IMAGE, VIDEO = 0, 1, 2


def _runs(token_types: np.ndarray) -> list[tuple[int, int, int]]:
    """Consecutive runs of equal values: `(value, start, end)` for each."""
    boundaries = np.flatnonzero(np.diff(token_types)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [len(token_types)]])
    return [(int(token_types[start]), int(start), int(end)) for start, end in zip(starts, ends, strict=True)]


def image_positions(start: int, grid_thw: np.ndarray, spatial_merge_size: int) -> np.ndarray:
    """Position ids (3, t * h' * w') of one image's tokens, `h' = h / m`, `w' = w / m`, offset by `start`."""
    grid_t = int(grid_thw[0])
    grid_h, grid_w = int(grid_thw[1]) // spatial_merge_size, int(grid_thw[2]) // spatial_merge_size
    temporal, height, width = np.meshgrid(np.arange(grid_t), np.arange(grid_h), np.arange(grid_w), indexing="ij")
    return np.stack([temporal.ravel(), height.ravel(), width.ravel()]).astype(np.int64) + start


def text_positions(attention_mask: np.ndarray) -> np.ndarray:
    """1-D position ids (B, S) int64: the running count of real tokens, 0 at padding (attention mask 0)."""
    attention_mask = np.asarray(attention_mask).astype(bool)
    return np.where(attention_mask, np.cumsum(attention_mask, axis=1) - 1, 0).astype(np.int64)


def rope_positions(
    attention_mask: np.ndarray,
    mm_token_type_ids: np.ndarray | None = None,
    image_grid_thw: np.ndarray | None = None,
    spatial_merge_size: int = 2,
) -> tuple[np.ndarray, np.ndarray]:
    """Prompt positions `(3, B, S)` int64 and each sample's offset `(B, 1)` (last position + 1 - real tokens).

    `attention_mask` (B, S) marks real tokens; `mm_token_type_ids` (B, S) marks text (0) and image (1) tokens, as
    the processor returns them; `image_grid_thw` (num_images, 3) holds each image's patch grid, images in batch
    order. Without images every row is the running count of real tokens.
    """
    attention_mask = np.asarray(attention_mask).astype(bool)
    batch_size, seq_len = attention_mask.shape
    if mm_token_type_ids is None or image_grid_thw is None:
        positions = np.broadcast_to(text_positions(attention_mask), (3, batch_size, seq_len)).copy()
        return positions, np.zeros((batch_size, 1), np.int64)
    mm_token_type_ids = np.asarray(mm_token_type_ids)
    if (mm_token_type_ids == VIDEO).any():
        raise ValueError("mm_token_type_ids mark video tokens (2); the ONNX runtime takes images only.")
    grids = iter(np.asarray(image_grid_thw).reshape(-1, 3))
    positions = np.zeros((3, batch_size, seq_len), dtype=np.int64)
    deltas = np.zeros((batch_size, 1), dtype=np.int64)
    for sample in range(batch_size):
        real = attention_mask[sample]
        pieces, current = [], 0
        for token_type, start, end in _runs(mm_token_type_ids[sample][real]):
            if token_type == TEXT:
                pieces.append(np.broadcast_to(np.arange(current, current + end - start), (3, end - start)))
                current += end - start
                continue
            grid = next(grids, None)
            if grid is None:
                raise ValueError(
                    f"mm_token_type_ids mark more images than image_grid_thw holds ({len(image_grid_thw)} rows)."
                )
            pieces.append(image_positions(current, grid, spatial_merge_size))
            current += max(int(grid[1]), int(grid[2])) // spatial_merge_size
        sample_positions = np.concatenate(pieces, axis=1)
        if sample_positions.shape[1] != real.sum():
            raise ValueError(
                f"Sample {sample} has {int(real.sum())} real tokens but its image grids give "
                f"{sample_positions.shape[1]} positions: image tokens and image_grid_thw disagree."
            )
        positions[:, sample, real] = sample_positions
        deltas[sample, 0] = sample_positions.max() + 1 - real.sum()
    return positions, deltas
